"""Streams over one WebSocket per client (the gateway's envelope mode), with ``websockets``.

Every request of the client is a ``chat.completion.create`` with its own ``request_id`` on
the same socket; a reader task routes the server's messages to each request by that id.
Keepalive pings (``ping_interval``) find a dead socket; when the socket goes, every request
on it is resumed on the next one (``chat.completion.resume`` after its last
``sequence_number``), or created again with its ``idempotency_key`` if no chunk had arrived.
Opening the socket is single-flight: requests waiting for it share one attempt, and each
request's retry policy spaces the next.

Close codes: 3000 (the key was refused) fails the requests with
:class:`~tokenwire_client.errors.AuthenticationError`; 1008 (policy) with
:class:`~tokenwire_client.errors.PermissionDeniedError`; any other close is a dropped
connection, resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tokenwire_client._transport import (
    ChunkFrame,
    Dropped,
    EndFrame,
    Frame,
    StatusAnswer,
    StreamRequest,
)
from tokenwire_client.errors import (
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    PermissionDeniedError,
    error_from_body,
)
from tokenwire_client.retry import retry_after_from_headers

log = logging.getLogger("tokenwire_client")
CLOSE_UNAUTHORIZED = 3000
CLOSE_POLICY = 1008
MAX_MESSAGE_BYTES = 1 << 22
_ENVELOPE_FIELDS = ("type", "request_id", "sequence_number")


def ws_url(api_root: str) -> str:
    """``http(s)://host/v1`` → ``ws(s)://host/v1/ws/chat``."""
    scheme, rest = api_root.split("://", 1)
    return ("wss" if scheme == "https" else "ws") + "://" + rest + "/ws/chat"


class _Lost:
    """Routed to every request of a socket that went away."""

    def __init__(self, reason: str, error: APIStatusError | None = None) -> None:
        self.reason = reason
        self.error = error


Routed = dict[str, Any] | _Lost


class WebSocketTransport:
    """One socket for all of a client's streamed requests."""

    cancel_needs_stream_id = False

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout_s: float,
        ping_interval_s: float,
        max_concurrent: int,
    ) -> None:
        self._url = url
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._ping_interval_s = ping_interval_s
        self._slots = asyncio.Semaphore(max_concurrent)
        self._socket: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._epoch = 0  # counts connection attempts (single flight: see ``_connected``)
        self._last_failure: Dropped | StatusAnswer | None = None
        self._routes: dict[str, asyncio.Queue[Routed]] = {}
        self.received = 0  # messages read from any socket (requests' liveness: see WSAttempt)

    def slot(self) -> asyncio.Semaphore:
        return self._slots

    async def aclose(self) -> None:
        socket, self._socket = self._socket, None
        if socket is not None:
            await socket.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    # -- the socket ------------------------------------------------------------------------------

    async def _connected(self) -> ClientConnection:
        """The open socket, opening it if needed; one attempt shared by concurrent callers."""
        epoch = self._epoch
        async with self._lock:
            if self._socket is not None:
                return self._socket
            if self._epoch != epoch and self._last_failure is not None:
                raise self._last_failure  # the attempt we waited on failed: back off first
            self._epoch += 1
            try:
                socket = await connect(
                    self._url,
                    additional_headers={"Authorization": f"Bearer {self._api_key}"},
                    open_timeout=self._timeout_s,
                    ping_interval=self._ping_interval_s,
                    ping_timeout=self._ping_interval_s,
                    close_timeout=min(self._timeout_s, 5.0),
                    max_size=MAX_MESSAGE_BYTES,
                    compression=None,
                )
            except websockets.InvalidStatus as exc:
                failure: Dropped | StatusAnswer = _refused(exc)
                self._last_failure = failure
                raise failure from exc
            except (TimeoutError, OSError, websockets.WebSocketException) as exc:
                failure = Dropped(f"could not open the WebSocket: {exc!r}")
                self._last_failure = failure
                raise failure from exc
            self._last_failure = None
            self._socket = socket
            self._reader = asyncio.get_running_loop().create_task(
                self._read(socket), name="tokenwire-ws-reader"
            )
            return socket

    async def _read(self, socket: ClientConnection) -> None:
        """Route every message to its request; on close, tell every request on the socket."""
        try:
            async for message in socket:
                self.received += 1
                if isinstance(message, bytes):
                    continue  # the gateway sends text only
                self._route(message)
        except ConnectionClosed:
            pass
        except Exception as exc:  # noqa: BLE001 - any failure of the socket loses its requests
            log.warning("WebSocket reader failed: %r", exc)
        finally:
            lost = _lost(socket.close_code, socket.close_reason)
            if self._socket is socket:
                self._socket = None
            routes = list(self._routes.values())
            self._routes.clear()
            for queue in routes:
                queue.put_nowait(lost)

    def _route(self, message: str) -> None:
        try:
            data = json.loads(message)
        except ValueError:
            log.warning("unreadable WebSocket message %r", message[:80])
            return
        if not isinstance(data, dict):
            return
        request_id = data.get("request_id")
        queue = self._routes.get(request_id) if isinstance(request_id, str) else None
        if queue is not None:
            queue.put_nowait(data)
        elif data.get("type") == "error":
            log.warning("WebSocket error for no running request: %s", data.get("error"))

    # -- requests --------------------------------------------------------------------------------

    async def open(self, request: StreamRequest, stream_id: str | None, after: int) -> WSAttempt:
        socket = await self._connected()
        queue: asyncio.Queue[Routed] = asyncio.Queue()
        self._routes[request.request_id] = queue
        message: dict[str, Any]
        if stream_id is None:
            message = {
                "type": "chat.completion.create",
                "request_id": request.request_id,
                "body": request.body,
                "idempotency_key": request.idempotency_key,
                "include_cost": True,
            }
        else:
            message = {
                "type": "chat.completion.resume",
                "request_id": request.request_id,
                "stream_id": stream_id,
                "starting_after": after,
            }
        attempt = WSAttempt(self, request, queue, stream_id, self._timeout_s)
        try:
            await socket.send(json.dumps(message))
        except ConnectionClosed as exc:
            self._forget(request.request_id, queue)
            lost = _lost(exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else _lost(None, "")
            if lost.error is not None:
                raise StatusAnswer(lost.error, generation_failed=False) from exc
            raise Dropped(lost.reason) from exc
        return attempt

    def _forget(self, request_id: str, queue: asyncio.Queue[Routed]) -> None:
        if self._routes.get(request_id) is queue:
            del self._routes[request_id]

    async def cancel(self, request: StreamRequest, stream_id: str | None) -> bool:
        socket = self._socket
        if socket is None or request.request_id not in self._routes:
            return False  # between two sockets: stopping the client stops the resume
        try:
            await socket.send(
                json.dumps({"type": "chat.completion.cancel", "request_id": request.request_id})
            )
        except ConnectionClosed:
            return False
        return True


class WSAttempt:
    """One request's messages on one socket."""

    def __init__(
        self,
        transport: WebSocketTransport,
        request: StreamRequest,
        queue: asyncio.Queue[Routed],
        stream_id: str | None,
        timeout_s: float,
    ) -> None:
        self._transport = transport
        self._request = request
        self._queue = queue
        self._timeout_s = timeout_s
        self._received_at_open = transport.received
        self.stream_id = stream_id

    @property
    def connection_progressed(self) -> bool:
        return self._transport.received > self._received_at_open

    async def frames(self) -> AsyncIterator[Frame]:
        while True:
            try:
                async with asyncio.timeout(self._timeout_s):
                    item = await self._queue.get()
            except TimeoutError:
                await self._transport.cancel(self._request, self.stream_id)
                raise APITimeoutError(
                    f"Nothing arrived for request {self._request.request_id} in "
                    f"{self._timeout_s:g} s; it was cancelled."
                ) from None
            if isinstance(item, _Lost):
                if item.error is not None:
                    raise StatusAnswer(item.error, generation_failed=False)
                raise Dropped(item.reason)
            kind = item.get("type")
            if kind == "chat.completion.chunk":
                self.stream_id = self.stream_id or _text(item.get("id"))
                seq = item.get("sequence_number")
                if not isinstance(seq, int):
                    raise Dropped("a chunk without a sequence number")
                yield ChunkFrame(seq, {k: v for k, v in item.items() if k not in _ENVELOPE_FIELDS})
            elif kind == "chat.completion.done":
                self.stream_id = self.stream_id or _text(item.get("stream_id"))
                usage = item.get("usage")
                yield EndFrame(
                    usage=usage if isinstance(usage, Mapping) else None,
                    finish_reason=_text(item.get("finish_reason")),
                )
                return
            elif kind == "error":
                error = _error(item)
                # A 5xx ends the generation the idempotency_key is bound to (a retry needs a
                # new key); a refusal (429, 409 in use, ...) started nothing.
                raise StatusAnswer(error, generation_failed=error.status >= 500)

    async def aclose(self) -> None:
        self._transport._forget(self._request.request_id, self._queue)


def _error(message: Mapping[str, Any]) -> APIStatusError:
    error = message.get("error")
    fields = error if isinstance(error, Mapping) else {}
    status = fields.get("status")
    retry_ms = fields.get("retry_after_ms")
    return error_from_body(
        status if isinstance(status, int) else 500,
        {"error": fields},
        retry_after=retry_ms / 1000 if isinstance(retry_ms, int | float) else None,
    )


def _lost(code: int | None, reason: str | None) -> _Lost:
    """What a closed socket (its close code and reason, if any) means for its requests."""
    if code is None:
        return _Lost("the WebSocket connection was lost")
    text = f"the WebSocket closed ({code} {reason or ''})".replace(" )", ")")
    if code == CLOSE_UNAUTHORIZED:
        error: APIStatusError = AuthenticationError(
            reason or "The API key was refused.", status=401, code="invalid_api_key"
        )
        return _Lost(text, error)
    if code == CLOSE_POLICY:
        error = PermissionDeniedError(reason or "Refused by policy.", status=403)
        return _Lost(text, error)
    return _Lost(text)


def _refused(exc: websockets.InvalidStatus) -> Dropped | StatusAnswer:
    """An HTTP answer instead of the upgrade (e.g. 503 while the gateway is full)."""
    response = exc.response
    try:
        body: object = json.loads(response.body or b"")
    except ValueError:
        body = None
    headers = {k.lower(): v for k, v in response.headers.raw_items()}
    error = error_from_body(
        response.status_code, body, headers=headers, retry_after=retry_after_from_headers(headers)
    )
    return StatusAnswer(error, generation_failed=False)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
