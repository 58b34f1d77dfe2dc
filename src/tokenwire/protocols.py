"""uvicorn's HTTP and WebSocket protocols, with the guards a public server needs.

uvicorn has no header-read timeout, no cap on open connections, and waits for ever on a
client that stops reading. :func:`server_protocols` returns its ``httptools`` and
``websockets-sansio`` protocols (``server_options`` passes them as ``http=`` and ``ws=``) with:

* **a header-read timeout** (``server.header_timeout_s``): a connection has that long, from
  its first byte (from the connection itself for the first request), to complete a request's
  headers, else it is closed. Slowloris clients that trickle a header byte every few seconds
  no longer hold a connection for ever; an idle keep-alive connection is still governed by
  the keep-alive timeout.
* **a write-stall abort** (``server.sse_send_timeout_s`` for HTTP responses, SSE streams
  above all, and ``server.ws_send_timeout_s`` for WebSockets): when the transport's buffer
  stays above its high-water mark (the client reads nothing) that long, the connection is
  aborted. A ``close`` would wait for the buffer to drain, which never happens; the abort
  frees the socket, and the app sees a disconnect (its reader detaches, the generation
  cancels if nobody else reads it).
* **a connection cap** (``server.max_connections``): a connection over it gets an immediate
  ``503`` and is closed, so the process keeps file descriptors for its upstreams, database
  and Redis instead of failing ``accept`` with ``EMFILE``.

Everything here is per connection and per server (:class:`ConnectionGuard`); nothing runs per
token except two attribute checks in ``data_received``.

The HTTP protocol gives every request an :class:`~tokenwire.http_exchange.HttpExchange` in
``scope["extensions"]["tokenwire.http"]`` (a callback when the connection is lost, so that
watching for a disconnect needs no task) and writes each response's head together with its
first body part (:class:`~tokenwire.http_exchange.ResponseWriter`). The WebSocket protocol
gives the app :class:`FastWebSocket` in ``scope["extensions"]["tokenwire.ws"]``: text
messages framed here and written several per system call, and pings whose pong the app can
await (compatible mode's ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import secrets
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.frames import Frame
from websockets.http11 import Request
from websockets.protocol import State

from tokenwire.config import ServerConfig
from tokenwire.http_exchange import HTTP_EXTENSION, ConnectionWatch, HttpExchange, ResponseWriter

log = logging.getLogger("tokenwire.server")

FD_RESERVE = 2048  # descriptors kept for upstream pools, the database, Redis and files
OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 28\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n\r\n"
    b"Too many open connections.\r\n"
)


def default_max_connections() -> int:
    """The cap when ``server.max_connections`` is 0: below the process's descriptor limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(soft // 2, soft - FD_RESERVE)


@dataclass
class ConnectionGuard:
    """The limits of one server, and when it last warned about refused connections."""

    header_timeout_s: float
    http_send_timeout_s: float
    ws_send_timeout_s: float
    max_connections: int  # 0: no cap
    refused: int = 0
    _warned_at: float = field(default=-1e9, repr=False)

    @classmethod
    def from_config(cls, server: ServerConfig) -> ConnectionGuard:
        return cls(
            header_timeout_s=server.header_timeout_s,
            http_send_timeout_s=server.sse_send_timeout_s,
            ws_send_timeout_s=server.ws_send_timeout_s,
            max_connections=server.max_connections or default_max_connections(),
        )

    def over_capacity(self, open_connections: int) -> bool:
        """Whether a new connection (counted in ``open_connections``) is one too many."""
        if not self.max_connections or open_connections <= self.max_connections:
            return False
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= 60.0:
            self._warned_at = now
            log.warning(
                "%d open connections reached server.max_connections; refusing new ones "
                "(%d refused so far)",
                self.max_connections,
                self.refused,
            )
        return True


class _StallTimer:
    """Aborts a transport whose writes stay paused (the peer reads nothing) for too long."""

    __slots__ = ("_handle", "_timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._handle: asyncio.TimerHandle | None = None

    def paused(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> None:
        if self._handle is None and self._timeout_s > 0:
            self._handle = loop.call_later(self._timeout_s, self._expired, transport)

    def resumed(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _expired(self, transport: asyncio.Transport) -> None:
        self._handle = None
        if not transport.is_closing() or transport.get_write_buffer_size():
            log.info("aborting a connection whose client read nothing for %g s", self._timeout_s)
            transport.abort()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header-read timeout, a stall abort and a cap, and
    for each request an :class:`HttpExchange` and a :class:`ResponseWriter`."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self._header_timer: asyncio.TimerHandle | None = None
        self._stall = _StallTimer(guard.http_send_timeout_s)
        self._watch = ConnectionWatch()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if self.guard.over_capacity(len(self.connections)):
            self.transport.write(OVER_CAPACITY)
            self.transport.close()
            return
        self._arm_header_timer()  # the first request's headers are due from now

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._stall.resumed()
        super().connection_lost(exc)
        self._watch.connection_lost()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()  # the first byte of a keep-alive connection's next request
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not previous:  # a request (not an upgrade): its task has not run yet
            scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
            cycle_ref = weakref.ref(cycle)
            if scope["method"] != "HEAD":  # a HEAD answer has no body to join its head
                cycle.transport = ResponseWriter(self.transport, self.loop, cycle_ref)  # type: ignore[assignment]
            scope.setdefault("extensions", {})[HTTP_EXTENSION] = HttpExchange(
                self._watch, cycle_ref
            )

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stall.paused(self.loop, self.transport)

    def resume_writing(self) -> None:
        self._stall.resumed()
        super().resume_writing()

    def _arm_header_timer(self) -> None:
        if self.guard.header_timeout_s > 0:
            self._header_timer = self.loop.call_later(
                self.guard.header_timeout_s, self._headers_too_slow
            )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still being written: its own guards apply
        if not self.transport.is_closing():
            log.debug("closing a connection that sent no complete request headers in time")
            self.transport.close()


def text_frame_header(size: int) -> bytes:
    """RFC 6455 header of a final, unmasked text frame of ``size`` payload bytes."""
    if size < 126:
        return bytes((0x81, size))
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big")
    return b"\x81\x7f" + size.to_bytes(8, "big")


class FastWebSocket:
    """What the app may do on a socket besides ASGI: ``scope["extensions"]["tokenwire.ws"]``.

    * :meth:`write_texts`: several text messages framed here and written in one system call,
      without a dict, a ``str`` round trip and websockets' frame objects per message (the
      per-message cost of a streamed chunk through ASGI);
    * :attr:`writable`: set while the transport takes more (the stall guard aborts a client
      that reads nothing for ``ws_send_timeout_s``, which sets it too);
    * :meth:`ping`: a ping whose answer the app can await (a closing peer sends none).
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: GuardedWebSocketProtocol) -> None:
        self._protocol = protocol

    @property
    def writable(self) -> asyncio.Event:
        return self._protocol.writable

    def open(self) -> bool:
        """Whether messages can still be sent (no close sent or received, transport up)."""
        protocol = self._protocol
        return not (
            protocol.disconnected
            or protocol.close_sent
            or protocol.transport.is_closing()
            or protocol.conn.state is not State.OPEN
        )

    def write_texts(self, texts: list[bytes]) -> bool:
        """Write UTF-8 ``texts`` as text messages, in order, in one write; False if closed."""
        if not self.open():
            return False
        protocol = self._protocol
        if protocol.conn.extensions:  # permessage-deflate: its compressor must see each one
            for text in texts:
                protocol.conn.send_text(text)
            data = b"".join(protocol.conn.data_to_send())
        else:
            parts: list[bytes] = []
            for text in texts:
                parts.append(text_frame_header(len(text)))
                parts.append(text)
            data = b"".join(parts)
        protocol.transport.write(data)
        return True

    def ping(self) -> asyncio.Future[bool]:
        """Send a ping now; the future says True when its pong arrives, False if the
        connection closes (or has closed) first."""
        return self._protocol.app_ping()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with a stall abort (``ws_send_timeout_s``) and
    :class:`FastWebSocket` for the app."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._stall = _StallTimer(guard.ws_send_timeout_s)
        self._app_pings: dict[bytes, asyncio.Future[bool]] = {}

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the handshake was accepted: the app runs on this scope
            scope["extensions"]["tokenwire.ws"] = FastWebSocket(self)

    def app_ping(self) -> asyncio.Future[bool]:
        answered: asyncio.Future[bool] = self.loop.create_future()
        if not FastWebSocket(self).open():
            answered.set_result(False)
            return answered
        payload = b"tw" + secrets.token_bytes(6)
        self._app_pings[payload] = answered
        self.conn.send_ping(payload)
        self.transport.write(b"".join(self.conn.data_to_send()))
        return answered

    def handle_pong(self, event: Frame) -> None:
        answered = self._app_pings.pop(bytes(event.data), None)
        if answered is None:
            super().handle_pong(event)  # uvicorn's keepalive
        elif not answered.done():
            answered.set_result(True)

    def handle_close(self, event: Frame) -> None:
        self._end_pings()  # a peer that closes answers no ping
        super().handle_close(event)

    def _end_pings(self) -> None:
        pings, self._app_pings = self._app_pings, {}
        for answered in pings.values():
            if not answered.done():
                answered.set_result(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stall.resumed()
        self._end_pings()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stall.paused(self.loop, self.transport)

    def resume_writing(self) -> None:
        self._stall.resumed()
        super().resume_writing()


def server_protocols(server: ServerConfig) -> tuple[Any, Any]:
    """uvicorn's ``http=`` and ``ws=`` protocol factories for these settings."""
    guard = ConnectionGuard.from_config(server)
    return (
        functools.partial(GuardedHttpProtocol, guard=guard),
        functools.partial(GuardedWebSocketProtocol, guard=guard),
    )
