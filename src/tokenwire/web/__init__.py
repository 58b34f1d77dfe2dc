"""The gateway's own web pages, served on the API's origin by ``tokenwire serve``.

``/`` the playground (both transports, a race between them, Stop, resume after a reload),
``/usage`` a key's balance, limits and usage, ``/admin`` keys, usage across keys and live
figures, and ``/static/…`` their files, among them ``tokenwire.js``, the browser client that
anyone's web app may load. Plain HTML, CSS and ES modules shipped inside the package: no build
step, no CDN, nothing fetched from elsewhere. See docs/web.md.
"""
