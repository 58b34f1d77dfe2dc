"""HTTP/1.1 to the upstreams: a keep-alive pool whose connections stream one reply at a time.

Every completion is one ``POST`` whose reply is read as it arrives, chunk by chunk, for its
whole length; nothing else goes upstream. That is all this client does, on **httptools**
(the llhttp parser uvicorn serves with) and asyncio's transports:

* :meth:`UpstreamPool.post` writes the request (head and body in one ``write``) in the
  caller's own step, takes a pooled connection or opens one (TLS for ``https``), and returns
  once the reply's status and headers have come; the body is read with
  :meth:`UpstreamResponse.readany` (whatever has arrived, ``b""`` at its end);
* a connection goes back to the pool when its reply was read to the end and the upstream
  keeps it alive (:meth:`UpstreamResponse.release`), otherwise it is closed
  (:meth:`UpstreamResponse.close`: a cancel drops the upstream request with it);
* pooled connections idle longer than ``keepalive_timeout_s`` are closed (on checkout and by
  one sweep timer), before the upstream's own keep-alive timeout can close one under a request;
* ``max_connections`` bounds the connections open at once; past it a request waits for one;
* a silence of ``idle_timeout_s`` while a reply is awaited fails the read (:class:`ReadTimeout`),
  checked by one timer per reply that re-arms when it fires, not a timer per read.

Why not aiohttp's ``ClientSession`` (which the gateway used until issue 14): per streamed
reply it builds a request object, a response object, header multidicts, a timer context per
read, and on Python 3.11 it writes the body from a task of its own, one more trip round the
event loop for every request. Measured against the simulator (2-token replies, 50 at a time,
4,000 requests): **105 to 109 µs of client CPU per request with aiohttp, 54 to 60 µs with this**
(docs/performance.md). Errors are this module's own (:class:`ConnectFailed`,
:class:`ReplyBroken`, :class:`ReadTimeout`); ``providers/http.py`` turns them into the
gateway's :class:`~tokenwire.errors.UpstreamError` family.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import httptools
from yarl import URL

from tokenwire import __version__

_PAUSE_ABOVE = 256 * 1024  # unread reply bytes at which reading from the socket pauses
_DRAIN_S = 1.0  # how long a released reply's end may take to come before its connection closes
_DRAIN_BYTES = 64 * 1024  # how much of a released reply is read through to keep its connection
_USER_AGENT = f"user-agent: tokenwire/{__version__}\r\n".encode()


class ConnectFailed(ConnectionError):
    """No connection could be made (refused, unreachable, DNS, TLS, timeout): nothing was sent."""


class ReplyBroken(ConnectionError):
    """The connection failed, or the reply was malformed, after the request was written."""


class ReadTimeout(TimeoutError):
    """The upstream sent nothing for ``idle_timeout_s`` while a reply was awaited."""


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class _Target:
    origin: _Origin
    head: bytes  # the request line and the Host header


def _target(url: str) -> _Target:
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host or parsed.port is None:
        raise ValueError(f"not an http(s) URL: {url!r}")
    origin = _Origin(parsed.scheme, parsed.host, parsed.port)
    host = parsed.raw_host or parsed.host
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    if not parsed.is_default_port():
        host = f"{host}:{parsed.port}"
    head = f"POST {parsed.raw_path_qs or '/'} HTTP/1.1\r\nhost: {host}\r\n".encode("ascii")
    return _Target(origin, head)


def _header_block(headers: Mapping[str, str]) -> bytes:
    """``name: value`` lines; a CR or LF inside a name or value (header injection) is refused."""
    block = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    if block.count("\n") != len(headers) or block.count("\r") != len(headers):
        raise ValueError("an upstream request header contains a line break")
    return block.encode("latin-1")


class UpstreamResponse:
    """One reply: ``status`` and ``headers`` (lower-case names) at once, the body as it comes.

    Also the httptools parser's callback object (``on_header``, ``on_body``…).
    """

    __slots__ = (
        "_chunks",
        "_complete",
        "_connection",
        "_draining",
        "_error",
        "_idle_s",
        "_informational",
        "_keep_alive",
        "_last_read",
        "_paused",
        "_size",
        "_timer",
        "_waiter",
        "headers",
        "parser",
        "status",
    )

    def __init__(self, connection: _Connection, idle_timeout_s: float) -> None:
        self._connection = connection
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0  # set once the headers are complete
        self.headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._complete = False  # the whole body has arrived
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._draining = False  # released before its end: read through, then pooled
        self._informational = False  # parsing a 1xx reply that precedes the real one
        self._keep_alive = False  # the upstream keeps the connection open after the reply
        self._idle_s = idle_timeout_s
        loop = connection.loop
        self._last_read = loop.time()
        self._timer: asyncio.TimerHandle | None = None
        if idle_timeout_s > 0:
            self._timer = loop.call_at(self._last_read + idle_timeout_s, self._check_idle)

    # -- the parser's callbacks ------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 1xx (103 Early Hints…): the reply proper follows
            self._informational = True
            self.headers.clear()
            return
        self.status = status
        self._keep_alive = self.parser.should_keep_alive()  # llhttp forgets it at the end
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._draining:
            self._size += len(body)
            if self._size > _DRAIN_BYTES:
                self._connection.close()  # more than an end: not worth reading through
            return
        self._chunks.append(body)
        self._size += len(body)
        if self._size > _PAUSE_ABOVE and not self._paused:
            self._paused = True
            self._connection.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete = True
        self._stop_timer()
        if self._draining:
            self._reuse_or_close()
        else:
            self._wake()

    # -- what the connection tells it ------------------------------------------------------

    def received(self, data: bytes) -> None:
        self._last_read = self._connection.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(ReplyBroken(f"malformed reply: {exc}"))

    def ended(self, exc: Exception | None) -> None:
        """The connection closed: the end of a body delimited by closing, else a failure."""
        if self._complete:
            return
        if self.status and "content-length" not in self.headers and not self._chunked():
            self._complete = True  # HTTP/1.0 style: the body ran to the end of the connection
            self._stop_timer()
            self._wake()
            return
        detail = f": {exc}" if exc is not None else ""
        self.fail(ReplyBroken(f"the upstream closed the connection mid-reply{detail}"))

    def fail(self, error: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._stop_timer()
        self._wake()
        self._connection.close()

    # -- the reader's side -----------------------------------------------------------------

    async def wait_headers(self) -> None:
        """Return once the status and headers are in; raise what broke the reply."""
        while not self.status:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def readany(self) -> bytes:
        """What has arrived of the body (waiting for some), or ``b""`` once it has ended."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        if self._paused and not self._draining:
            self._paused = False
            self._last_read = self._connection.loop.time()  # the silence was ours
            self._connection.resume_reading()
        return data

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body (an error reply's), reading to its end if smaller."""
        parts: list[bytes] = []
        size = 0
        while size < limit:
            data = await self.readany()
            if not data:
                break
            parts.append(data)
            size += len(data)
        return b"".join(parts)[:limit]

    def release(self) -> None:
        """Done with the reply: its connection goes back to the pool once the body has ended,
        if the upstream keeps it alive, else it is closed.

        A reader that stops at the format's own end (``data: [DONE]``, ``message_stop``)
        often releases the reply a packet before the body's end (the chunked terminator): the
        rest is read through in the background, for at most ``_DRAIN_S``, and the connection
        pooled then, so the next request need not open one.
        """
        self._stop_timer()
        if self._error is not None:
            self._connection.close()
        elif self._complete:
            self._reuse_or_close()
        else:
            self._draining = True
            self._chunks.clear()
            self._size = 0
            if self._paused:
                self._paused = False
                self._connection.resume_reading()
            self._timer = self._connection.loop.call_later(_DRAIN_S, self._connection.close)

    def _reuse_or_close(self) -> None:
        if self._keep_alive:
            self._connection.reusable()
        else:
            self._connection.close()

    def close(self) -> None:
        """Done early (a cancel, an error): the connection closes, the upstream request with it."""
        self._stop_timer()
        if self._error is None and not self._complete:
            self._error = ReplyBroken("the reply was closed by the gateway")
        self._connection.close()

    @property
    def buffered_bytes(self) -> int:
        """Body bytes received and not yet read."""
        return self._size

    @property
    def reading_paused(self) -> bool:
        """Whether reading from the socket is paused because too much is unread."""
        return self._paused

    def _chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    async def _wait(self) -> None:
        waiter = self._waiter = self._connection.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_idle(self) -> None:
        self._timer = None
        if self._complete or self._error is not None:
            return
        loop = self._connection.loop
        now = loop.time()
        due = self._last_read + self._idle_s
        if now < due:
            self._timer = loop.call_at(due, self._check_idle)
        elif self._waiter is None and self.status:
            self._timer = loop.call_at(now + self._idle_s, self._check_idle)  # unread data
        else:
            self.fail(ReadTimeout(f"the upstream sent nothing for {self._idle_s:g} s"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to an origin; at most one reply at a time."""

    def __init__(self, pool: UpstreamPool, origin: _Origin, loop: asyncio.AbstractEventLoop):
        self.pool = pool
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.reply: UpstreamResponse | None = None
        self.idle_since = 0.0
        self.counted = True  # holds one of the pool's max_connections
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.reply is None:
            self.close()  # bytes on an idle connection: it cannot carry another request
        else:
            self.reply.received(data)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost ends the reply

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.reply is not None:
            self.reply.ended(exc)

    def send(self, request: bytes, idle_timeout_s: float) -> UpstreamResponse:
        assert self.transport is not None
        reply = self.reply = UpstreamResponse(self, idle_timeout_s)
        self.transport.write(request)
        return reply

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def reusable(self) -> None:
        self.reply = None
        if self.usable():
            self.pool.keep(self)
        else:
            self.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()


class UpstreamPool:
    """Keep-alive connections to the upstreams of one provider, and the upstream timeouts.

    ``connect_timeout_s`` bounds opening a connection (TCP and TLS), ``idle_timeout_s`` the
    silence while a reply is awaited (the mid-stream stall guard), ``keepalive_timeout_s`` how
    long an idle connection stays pooled, ``max_connections`` (0: no bound) how many may be
    open at once. ``tls`` verifies ``https`` upstreams (default: the system's trust store,
    which ``SSL_CERT_FILE`` can replace). The first-token timeout belongs to the provider's
    read loop, which knows what a first token is. Made outside an event loop; used inside one.
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        idle_timeout_s: float,
        max_connections: int,
        keepalive_timeout_s: float = 4.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._max_connections = max_connections
        self._keepalive_s = keepalive_timeout_s
        self._targets: dict[str, _Target] = {}  # parsed once: a provider posts to few URLs
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._counted = 0  # connections open or opening, against max_connections
        self._waiting: deque[asyncio.Future[None]] = deque()  # for a connection slot
        self._sweep: asyncio.TimerHandle | None = None
        self._tls = tls  # None: the system's trust store, made on first use

    async def post(self, url: str, payload: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        """POST ``payload``; the reply once its headers are in. Raises :class:`ConnectFailed`
        (nothing was sent), :class:`ReplyBroken` or :class:`ReadTimeout` (it was)."""
        target = self._target(url)
        request = b"".join(
            (
                target.head,
                _header_block(headers),
                _USER_AGENT,
                b"content-length: %d\r\n\r\n" % len(payload),
                payload,
            )
        )
        connection = await self._connection(target.origin)
        reply = connection.send(request, self._idle_timeout_s)
        try:
            await reply.wait_headers()
        except BaseException:
            reply.close()
            raise
        return reply

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 1024:  # per-model URLs (Gemini): bounded, not a leak
                self._targets.clear()
            target = self._targets[url] = _target(url)
        return target

    def _pooled(self, origin: _Origin) -> _Connection | None:
        """The most recently used idle connection to ``origin`` that is still good."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_allowed = asyncio.get_running_loop().time() - self._keepalive_s
        while idle:
            connection = idle.pop()
            if connection.usable() and connection.idle_since >= oldest_allowed:
                return connection
            connection.close()
        return None

    async def _connection(self, origin: _Origin) -> _Connection:
        """A pooled connection to ``origin``, or a new one once ``max_connections`` allows;
        at the limit an idle connection to another origin is closed to make room."""
        while True:
            connection = self._pooled(origin)
            if connection is not None:
                return connection
            limit = self._max_connections
            if not limit or self._counted < limit:
                return await self._connect(origin)
            idle = next((conns for conns in self._idle.values() if conns), None)
            if idle is not None:
                idle.pop(0).close()  # the longest idle: closing it frees its slot at once
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter  # a connection was pooled or closed
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken as it was cancelled: pass the turn on
                raise
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        self._counted += 1
        tls = self._tls_context() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self, origin, loop),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls is not None else None,
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError and socket.gaierror are OSErrors
            self._uncount()
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise ConnectFailed(f"{reason} connecting to {origin.host}:{origin.port}") from None
        except BaseException:
            self._uncount()
            raise
        if not protocol.usable():  # closed by the upstream as it opened: nothing was sent
            raise ConnectFailed(f"{origin.host}:{origin.port} closed the connection at once")
        self._open.add(protocol)
        return protocol

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def keep(self, connection: _Connection) -> None:
        """A connection whose reply ended cleanly: pooled until reused or too long idle."""
        loop = connection.loop
        connection.idle_since = loop.time()
        self._idle.setdefault(connection.origin, []).append(connection)
        if self._sweep is None and self._keepalive_s > 0:
            self._sweep = loop.call_later(self._keepalive_s, self._close_stale)
        self._wake_one()  # a request waiting for a slot may take it

    def forget(self, connection: _Connection) -> None:
        """A connection closed (by either side): its slot is free."""
        self._open.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
        if connection.counted:
            connection.counted = False
            self._uncount()

    def _uncount(self) -> None:
        self._counted -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close_stale(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        oldest_allowed = loop.time() - self._keepalive_s
        for idle in list(self._idle.values()):
            for connection in [c for c in idle if c.idle_since < oldest_allowed]:
                connection.close()
        if any(self._idle.values()):
            self._sweep = loop.call_later(self._keepalive_s, self._close_stale)

    @property
    def open_connections(self) -> int:
        """Connections open now (idle or carrying a reply)."""
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        """Pooled connections waiting for a request."""
        return sum(len(idle) for idle in self._idle.values())

    @property
    def waiting_requests(self) -> int:
        """Requests waiting for a connection (``max_connections`` are open)."""
        return len(self._waiting)

    async def aclose(self) -> None:
        """Close every connection (replies being read fail with :class:`ReplyBroken`)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
