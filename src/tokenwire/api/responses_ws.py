"""``GET /v1/responses`` (WebSocket): OpenAI's WebSocket mode for the Responses API.

The socket is a :class:`~tokenwire.api.ws_session.WSSession` (one writer, flow control, limits,
timeouts, close codes and authentication as on ``/v1/ws/chat``) that speaks the Responses
protocol (``wire/responses_ws.py``): each ``response.create`` waits its turn on its lane
(``stream_id``; none: the socket's one lane), then streams the same events as SSE through a
:class:`~tokenwire.wire.responses_frames.ResponsesEncoder`. A request that fails before it
begins is an ``error`` event (``status`` and ``error``); the socket stays open.

``previous_response_id`` may name a stored response, or one of the last responses of this
socket even with ``store: false`` (kept in memory while the socket lives, as OpenAI does).
"""

from __future__ import annotations

from typing import Any

from starlette.websockets import WebSocket

from tokenwire.accounting.keys import KeyRecord
from tokenwire.api.auth import client_address
from tokenwire.api.ws_accept import serve_socket
from tokenwire.api.ws_session import WSSession
from tokenwire.errors import AuthenticationError, GatewayError, InvalidRequest, NotFound
from tokenwire.state import AppState
from tokenwire.streams.source import StreamSource
from tokenwire.wire import ws as proto
from tokenwire.wire.frames import FrameLoop
from tokenwire.wire.responses_frames import ResponsesEncoder, request_error_message
from tokenwire.wire.responses_request import responses_request_from
from tokenwire.wire.responses_ws import ResponseCancel, ResponseCreate, parse_responses_message

REMEMBERED = 4
"""How many of a socket's latest responses it keeps for ``previous_response_id``."""


class ResponsesSession(WSSession):
    """One ``/v1/responses`` socket."""

    __slots__ = ("_remembered", "_running")

    def __init__(
        self, websocket: WebSocket, state: AppState, key: KeyRecord | None, *, envelope: bool
    ) -> None:
        super().__init__(websocket, state, key, envelope=envelope)
        self._running: dict[str | None, StreamSource] = {}  # per lane
        self._remembered: dict[str, list[dict[str, Any]]] = {}  # id → conversation

    def _parse(self, text: str, max_bytes: int) -> object:
        return parse_responses_message(text, max_bytes=max_bytes)

    def _speaks_envelope(self, message: object) -> bool:
        return False  # OpenAI's WebSocket mode has no session.closing: a drain closes 1001

    async def _dispatch(self, message: object) -> None:
        if isinstance(message, proto.PingMessage):
            await self._send(proto.PONG)
        elif isinstance(message, ResponseCreate):
            # Responses answer in order on their lane, so even a refusal waits for its turn.
            try:
                self._check_capacity(message.stream_id)
                self._enqueue(message.stream_id, message.body)
            except proto.RequestFailed as exc:
                self._enqueue(message.stream_id, exc.error)
        elif isinstance(message, ResponseCancel):
            self._cancel_response(message)
        else:  # AuthMessage after authentication
            raise InvalidRequest("Already authenticated.", code="already_authenticated")

    async def _serve_queued(self, lane: str | None, item: dict[str, Any] | GatewayError) -> None:
        self._set_mode("responses")
        if isinstance(item, GatewayError):
            raise item
        plan = responses_request_from(item, websocket=True)
        key = await self._live_key()
        started = await self._state.responses.start(
            key, plan, "ws", local=self._remembered, client=client_address(self._ws)
        )
        encoder = ResponsesEncoder(started.head, "ws", stream_id=lane)
        self._running[lane] = started.source
        try:
            # Never merged: OpenAI numbers events 0, 1, 2… without gaps, and clients may check.
            await self._stream(started.source, FrameLoop(encoder), 0)
        finally:
            self._running.pop(lane, None)
        if encoder.error is None:
            self._remember(started.source.id, started.conversation(encoder))

    async def _queued_failed(self, lane: str | None, error: GatewayError) -> None:
        await self._report(error, lane, compatible=False)

    async def _report(self, error: GatewayError, request_id: str | None, compatible: bool) -> None:
        """An ``error`` event (``request_id`` is the lane's ``stream_id``); a key found revoked
        then closes the socket (3000)."""
        await self._send(request_error_message(error, request_id))
        if isinstance(error, AuthenticationError):
            self._close_soon(proto.CLOSE_UNAUTHORIZED, "API key revoked or expired")

    def _cancel_response(self, message: ResponseCancel) -> None:
        source = self._running.get(message.stream_id)
        if source is None or message.response_id not in (None, source.id):
            lane = "" if message.stream_id is None else f" on stream_id {message.stream_id!r}"
            error = NotFound(
                f"No response in progress{lane} to cancel.",
                param="response_id" if message.response_id is not None else None,
                code="response_not_found",
            )
            raise proto.RequestFailed(error, message.stream_id)
        source.cancel("client_cancelled")

    def _remember(self, response_id: str, conversation: list[dict[str, Any]]) -> None:
        remembered = self._remembered
        remembered[response_id] = conversation
        while len(remembered) > REMEMBERED:
            del remembered[next(iter(remembered))]


async def ws_responses(websocket: WebSocket) -> None:
    """``/v1/responses`` over WebSocket: authenticate as on ``/v1/ws/chat``, then respond."""
    await serve_socket(websocket, ResponsesSession)
