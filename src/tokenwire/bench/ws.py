"""The WebSocket client for ``/v1/ws/chat`` (docs/websocket-protocol.md), and idle sockets.

- :class:`EnvelopeSocket`: envelope mode. ``chat.completion.create`` messages with a
  ``request_id``; one reader task demultiplexes chunks, ``chat.completion.done`` and ``error``
  by request id, stamping each message on arrival. With one user per socket it is the ``ws``
  scenario (requests in sequence); with several it is ``ws-mux`` (concurrent requests).
- :class:`CompatSocket`: compatible mode (``--ws-mode compat``): a plain chat body in, the SSE
  chunk JSON out, then ``[DONE]``; one request at a time (the server sends ``[DONE]`` after its
  ``ws_done_grace_ms``, which the client waits for before its next request, outside E2E).
- :func:`hold_idle`: N authenticated sockets that send nothing, for the server's memory per
  connection.

Messages are decoded with the same msgspec decoder as SSE chunks. Unlike SSE, the client
library hands over whole messages, not network reads, so ``chunks_per_read`` is not reported
for WebSocket rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.version import version as websockets_version

from tokenwire.bench.workload import StreamState, decode_message

ENVELOPE_END = "chat.completion.done"
COMPAT_END = "[DONE]"
_encode = msgspec.json.encode
# websockets >= 15 honours proxy environment variables unless told not to; loopback has none.
_NO_PROXY: dict[str, Any] = {"proxy": None} if int(websockets_version.split(".")[0]) >= 15 else {}


def ws_url(base: str) -> str:
    """``http(s)://host:port`` → ``ws(s)://host:port/v1/ws/chat``."""
    return "ws" + base.removeprefix("http") + "/v1/ws/chat"


async def open_socket(
    url: str, headers: dict[str, str], *, compression: bool, open_timeout: float = 60.0
) -> ClientConnection:
    """Connect and authenticate with the ``Authorization`` header of ``headers``."""
    return await connect(
        url,
        additional_headers=headers,
        compression="deflate" if compression else None,
        open_timeout=open_timeout,
        ping_interval=None,  # the server pings; a client ping would only add traffic
        max_size=None,
        max_queue=None,
        **_NO_PROXY,
    )


def unsupported_reason(exc: BaseException) -> str | None:
    """Why a failed handshake means "this server has no such WebSocket endpoint", else None."""
    if isinstance(exc, InvalidStatus):
        return f"WebSocket upgrade refused: HTTP {exc.response.status_code}"
    if isinstance(exc, InvalidHandshake | InvalidURI):
        return f"WebSocket handshake failed: {type(exc).__name__}: {exc}"
    return None


def negotiated_compression(conn: ClientConnection) -> bool:
    """Whether permessage-deflate was agreed on this connection."""
    extensions = getattr(conn.protocol, "extensions", [])
    return any(getattr(ext, "name", "") == "permessage-deflate" for ext in extensions)


async def _wait_with_inactivity_timeout(
    done: asyncio.Future[None], state: StreamState, timeout_s: float
) -> bool:
    """Wait for ``done``; False when nothing arrived for the request for ``timeout_s``."""
    while not done.done():
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except TimeoutError:
            if time.perf_counter() - max(state.sent, state.last_seen) >= timeout_s:
                return False
    return True


class EnvelopeSocket:
    """One socket in envelope mode; its requests run concurrently, told apart by request id."""

    def __init__(self, conn: ClientConnection, timeout_s: float) -> None:
        self.conn = conn
        self._timeout_s = timeout_s
        self._pending: dict[str, tuple[StreamState, asyncio.Future[None]]] = {}
        self._closed: str | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        perf_counter = time.perf_counter
        try:
            while True:
                raw = await self.conn.recv(decode=False)
                now = perf_counter()
                message = decode_message(raw)
                rid = message.request_id
                entry = self._pending.get(rid) if rid is not None else None
                if entry is None:
                    continue  # pong, or an error that belongs to no running request
                state, done = entry
                state.last_seen = now
                state.apply(message, now)
                if message.type == ENVELOPE_END:
                    state.done = True
                if message.type in (ENVELOPE_END, "error") and not done.done():
                    done.set_result(None)
        except ConnectionClosed as exc:
            self._fail_all(f"socket closed: code {exc.rcvd.code if exc.rcvd else 1006}")
        except msgspec.DecodeError as exc:
            self._fail_all(f"undecodable message: {exc}")
            await self.conn.close()

    def _fail_all(self, reason: str) -> None:
        self._closed = reason
        for state, done in self._pending.values():
            if state.error is None and not state.done:
                state.error = reason
            if not done.done():
                done.set_result(None)

    async def request(self, state: StreamState, request_id: str) -> None:
        """Run one request to its end (done, error or timeout); never raises."""
        if self._closed is not None:
            state.sent = time.perf_counter()
            state.error = self._closed
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (state, done)
        payload = b"".join(
            (
                b'{"type":"chat.completion.create","request_id":',
                _encode(request_id),
                b',"body":',
                state.body,
                b"}",
            )
        )
        try:
            state.sent = time.perf_counter()
            await self.conn.send(payload, text=True)
            if not await _wait_with_inactivity_timeout(done, state, self._timeout_s):
                state.error = f"no message for {self._timeout_s:g} s"
                cancel = {"type": "chat.completion.cancel", "request_id": request_id}
                await self.conn.send(_encode(cancel), text=True)
        except ConnectionClosed as exc:
            state.error = state.error or f"socket closed: {exc}"
        finally:
            self._pending.pop(request_id, None)

    async def close(self) -> None:
        """Close the socket and stop its reader."""
        await self.conn.close()
        self._reader.cancel()


class CompatSocket:
    """One socket in compatible mode: requests one after another, each ending with ``[DONE]``."""

    def __init__(self, conn: ClientConnection, timeout_s: float) -> None:
        self.conn = conn
        self._timeout_s = timeout_s

    async def request(self, state: StreamState) -> None:
        """Send the plain body; read chunks until ``[DONE]``; never raises."""
        perf_counter = time.perf_counter
        try:
            state.sent = perf_counter()
            await self.conn.send(state.body, text=True)
            while True:
                raw = await asyncio.wait_for(self.conn.recv(decode=False), self._timeout_s)
                now = perf_counter()
                if raw == b"[DONE]":
                    state.done = True
                    return
                state.apply(decode_message(raw), now)
        except TimeoutError:
            state.error = f"no message for {self._timeout_s:g} s"
            await self.conn.close()
        except ConnectionClosed as exc:
            state.error = f"socket closed: {exc}"
        except msgspec.DecodeError as exc:
            state.error = f"undecodable message: {exc}"
            await self.conn.close()

    async def close(self) -> None:
        await self.conn.close()


@dataclass(frozen=True, slots=True)
class IdleResult:
    """Idle authenticated WebSockets held open at once, and the server's RSS around them."""

    requested: int
    opened: int
    failed: int
    first_error: str | None
    rss_before_mib: float | None
    rss_after_mib: float | None

    @property
    def kib_per_connection(self) -> float | None:
        if self.rss_before_mib is None or self.rss_after_mib is None or not self.opened:
            return None
        return (self.rss_after_mib - self.rss_before_mib) * 1024 / self.opened


async def hold_idle(
    url: str,
    headers: dict[str, str],
    count: int,
    server_rss_mib: Callable[[], float | None],
    *,
    compression: bool = False,
    batch: int = 100,
) -> IdleResult:
    """Open ``count`` sockets (``batch`` at a time), confirm each with a ping, read the RSS.

    The ping's pong proves the server finished the handshake and reads the socket, so the
    RSS is read after every connection exists on the server. Then all sockets are closed.
    """
    before = server_rss_mib()
    sockets: list[ClientConnection] = []
    failed = 0
    first_error: str | None = None
    try:
        for start in range(0, count, batch):
            results = await asyncio.gather(
                *(
                    open_socket(url, headers, compression=compression)
                    for _ in range(min(batch, count - start))
                ),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, ClientConnection):
                    sockets.append(result)
                else:
                    failed += 1
                    first_error = first_error or f"{type(result).__name__}: {result}"
        for start in range(0, len(sockets), batch):
            pongs = [await s.ping() for s in sockets[start : start + batch]]
            await asyncio.gather(*pongs, return_exceptions=True)
        after = server_rss_mib()
    finally:
        for start in range(0, len(sockets), batch):
            await asyncio.gather(
                *(s.close() for s in sockets[start : start + batch]), return_exceptions=True
            )
    return IdleResult(
        requested=count,
        opened=len(sockets),
        failed=failed,
        first_error=first_error,
        rss_before_mib=before,
        rss_after_mib=after,
    )
