"""Serving the web pages and their static files, with a strict Content-Security-Policy.

Everything is read from the package once, when the app is made: the pages are
``pages/layout.html`` around each page's ``pages/<name>.html``, in which ``{{> part k=v}}``
is replaced by ``pages/partials/part.html`` with each ``{{k}}`` set to ``v`` (markup the pages
share, written once); the static files are the flat directory ``static/``. A name outside
that set is a 404, so no path reaches the disk. Answers carry an ``ETag`` and
``Cache-Control: no-cache`` (a browser revalidates, so an upgrade is seen at once) and the
security headers of :data:`PAGE_HEADERS`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenwire.errors import NotFound

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",  # no inline script, no eval: model output can never run
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",  # the API and its WebSocket on this origin only
        "base-uri 'none'",
        "form-action 'none'",  # a form is never submitted by the browser (a key in a URL)
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True, slots=True)
class Page:
    """One page: its path, its file under ``pages/`` (and its module ``static/<name>.js``)."""

    path: str
    name: str
    title: str


PAGES = (
    Page("/", "playground", "Playground"),
    Page("/usage", "usage", "Usage"),
    Page("/admin", "admin", "Admin"),
)


@dataclass(frozen=True, slots=True)
class Asset:
    """A file as served: its bytes, media type and entity tag."""

    body: bytes
    media_type: str
    etag: str

    @classmethod
    def of(cls, body: bytes, suffix: str) -> Asset:
        digest = hashlib.sha256(body).hexdigest()[:24]
        return cls(body, MEDIA_TYPES[suffix], f'"{digest}"')

    def response(self, request: Request) -> Response:
        """200 with the body, or 304 when the client already holds this version."""
        headers = {**PAGE_HEADERS, "ETag": self.etag}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


_PARTIAL = re.compile(r"\{\{> ([\w-]+)((?: [\w-]+=[\w-]+)*)\}\}")


def expand_partials(text: str, partials: Traversable) -> str:
    """``text`` with each ``{{> name k=v ...}}`` replaced by the partial, ``{{k}}`` set to v."""

    def partial(match: re.Match[str]) -> str:
        body = (partials / f"{match.group(1)}.html").read_text("utf-8")
        for pair in match.group(2).split():
            name, _, value = pair.partition("=")
            body = body.replace("{{" + name + "}}", value)
        return body

    return _PARTIAL.sub(partial, text)


def render_page(layout: str, page: Page, main: str) -> str:
    """The layout with the page's title, body and module, its nav link marked current."""
    marker = f'data-nav="{page.name}"'
    return (
        layout.replace("{{title}}", page.title)
        .replace("{{page}}", page.name)
        .replace("{{main}}", main)
        .replace(marker, f'{marker} aria-current="page"')
    )


def load_site(root: Traversable | None = None) -> tuple[dict[str, Asset], dict[str, Asset]]:
    """The pages by path and the static files by name, read from the package."""
    root = root or resources.files(__package__ or "tokenwire.web")
    pages_dir = root / "pages"
    layout = (pages_dir / "layout.html").read_text(encoding="utf-8")
    partials = pages_dir / "partials"
    pages = {}
    for page in PAGES:
        main = expand_partials((pages_dir / f"{page.name}.html").read_text("utf-8"), partials)
        pages[page.path] = Asset.of(render_page(layout, page, main).encode(), ".html")
    files = {
        entry.name: Asset.of(entry.read_bytes(), "." + entry.name.rsplit(".", 1)[-1])
        for entry in (root / "static").iterdir()
        if entry.is_file() and "." + entry.name.rsplit(".", 1)[-1] in MEDIA_TYPES
    }
    return pages, files


def web_routes() -> list[Route]:
    """The routes of the pages and of ``/static/{name}``."""
    pages, files = load_site()

    def serve(asset: Asset) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return asset.response(request)

        return endpoint

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        asset = files.get(name)
        if asset is None:
            raise NotFound(f"No static file {name!r}.", param="name")
        return asset.response(request)

    return [
        *(Route(path, serve(asset), methods=["GET"]) for path, asset in pages.items()),
        Route("/static/{name}", static, methods=["GET"]),
    ]
