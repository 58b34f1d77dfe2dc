"""``/v1/ws/chat``: chat completions over WebSocket, the same generations as SSE.

The socket is a :class:`~tokenwire.api.ws_session.WSSession` (one writer, flow control,
limits, drain); this module is its chat protocol, :class:`ChatSession`. Two modes, chosen per
message: **envelope** requests (``chat.completion.create`` with a ``request_id``) run
concurrently and can be cancelled and resumed; **compatible** requests (a plain Chat
Completions body, as an OpenAI client sends over a socket) run one after another on one lane,
their chunks carry no request id, and ``[DONE]`` ends each.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Literal

from starlette.websockets import WebSocket

from tokenwire.api.auth import client_address
from tokenwire.api.ws_accept import serve_socket
from tokenwire.api.ws_session import Ping, WSSession, as_gateway_error
from tokenwire.errors import AuthenticationError, GatewayError, InvalidRequest, NotFound
from tokenwire.streams.source import StreamSource
from tokenwire.streams.store import request_digest
from tokenwire.wire import ws as proto
from tokenwire.wire.chat_frames import ChatCompatFrames, ChatEnvelopeFrames
from tokenwire.wire.frames import FrameLoop
from tokenwire.wire.schema import convert_chat_request


class ChatSession(WSSession):
    """One ``/v1/ws/chat`` socket: envelope and compatible chat requests."""

    __slots__ = ()

    def _parse(self, text: str, max_bytes: int) -> object:
        """One client message, typed (the protocol's own parser)."""
        return proto.parse_client_message(text, max_bytes=max_bytes)

    def _speaks_envelope(self, message: object) -> bool:
        """Whether a client sending ``message`` speaks envelope mode (gets ``session.closing``)."""
        return not isinstance(message, proto.CompatibleRequest)

    async def _dispatch(self, message: object) -> None:
        if isinstance(message, proto.PingMessage):
            await self._send(proto.PONG)
        elif isinstance(message, proto.CompatibleRequest):
            # Compatible requests answer in order, so even a refusal waits for its turn.
            try:
                self._check_capacity(None)
                self._enqueue(None, message.body)
            except proto.RequestFailed as exc:
                self._enqueue(None, exc.error)
        elif isinstance(message, proto.CreateMessage):
            await self._create(message)
        elif isinstance(message, proto.CancelMessage):
            self._cancel(message.request_id)
        elif isinstance(message, proto.ResumeMessage):
            await self._resume(message)
        else:  # AuthMessage after authentication
            raise InvalidRequest("Already authenticated.", code="already_authenticated")

    def _check_new_request_id(self, request_id: str) -> None:
        if request_id in self._requests:
            error = InvalidRequest(
                f"request_id {request_id!r} is already running on this socket.",
                param="request_id",
                code="duplicate_request_id",
            )
            raise proto.RequestFailed(error, request_id)
        self._check_capacity(request_id)

    def _serve(self, request_id: str, generation: StreamSource, after: int) -> None:
        task = asyncio.get_running_loop().create_task(
            self._serve_envelope(request_id, generation, after)
        )
        self._requests[request_id] = (task, generation)
        task.add_done_callback(lambda _t: self._request_done(request_id))

    async def _create(self, message: proto.CreateMessage) -> None:
        request_id = message.request_id
        self._check_new_request_id(request_id)
        idempotency = None
        if message.idempotency_key is not None:
            idempotency = (message.idempotency_key, request_digest(message.body))
        try:
            generation = await self._start(
                message.body, "ws-envelope", message.resumable, idempotency, message.include_cost
            )
        except Exception as exc:  # noqa: BLE001 - logged; fails this request only
            raise proto.RequestFailed(as_gateway_error(exc, request_id), request_id) from None
        self._serve(request_id, generation, 0)

    async def _resume(self, message: proto.ResumeMessage) -> None:
        request_id = message.request_id or message.stream_id
        self._set_mode("envelope")
        self._check_new_request_id(request_id)
        try:
            key = await self._live_key()
            generation = await self._state.completions.resume(
                message.stream_id, key.id, message.starting_after, "ws-envelope"
            )
        except Exception as exc:  # noqa: BLE001 - logged; fails this request only
            raise proto.RequestFailed(as_gateway_error(exc, request_id), request_id) from None
        self._serve(request_id, generation, message.starting_after)

    def _cancel(self, request_id: str) -> None:
        entry = self._requests.get(request_id)
        if entry is None:
            error = NotFound(
                f"No running request with request_id {request_id!r} on this socket.",
                param="request_id",
                code="unknown_request_id",
            )
            raise proto.RequestFailed(error, request_id)
        entry[1].cancel("client_cancelled")

    async def _start(
        self,
        body: dict[str, Any],
        transport: Literal["ws", "ws-envelope"],
        resumable: bool = False,
        idempotency: tuple[str, str] | None = None,
        include_cost: bool = False,
    ) -> StreamSource:
        self._set_mode("envelope" if transport == "ws-envelope" else "compatible")
        request = convert_chat_request(body)
        key = await self._live_key()
        return await self._state.completions.start(
            key,
            request,
            body,
            transport,
            resumable=resumable,
            idempotency=idempotency,
            client=client_address(self._ws),
            include_cost=include_cost,
        )

    async def _serve_envelope(self, request_id: str, generation: StreamSource, after: int) -> None:
        try:
            await self._stream_envelope(request_id, generation, after)
        except Exception as exc:  # noqa: BLE001 - logged; ends this request, not the socket
            await self._report(as_gateway_error(exc, request_id), request_id, compatible=False)

    async def _stream_envelope(self, request_id: str, generation: StreamSource, after: int) -> None:
        encoder = ChatEnvelopeFrames(generation, request_id, after)
        await self._stream(generation, FrameLoop(encoder, after=after, merge=True), after)

    async def _serve_queued(self, lane: str | None, item: dict[str, Any] | GatewayError) -> None:
        """Serve one queued request (compatible mode: its lane is None)."""
        await self._serve_compatible(item)

    async def _queued_failed(self, lane: str | None, error: GatewayError) -> None:
        """Report a queued request's failure, in its turn."""
        await self._report(error, None, compatible=True)
        if not isinstance(error, AuthenticationError):  # else the socket closes
            await self._finish_compatible()

    async def _serve_compatible(self, item: dict[str, Any] | GatewayError) -> None:
        """Stream one compatible-mode request; a refusal or a failure raises (the worker
        reports it in order)."""
        if isinstance(item, GatewayError):
            raise item
        generation = await self._start(item, "ws")
        await self._stream(generation, FrameLoop(ChatCompatFrames(generation), merge=True), 0)
        await self._finish_compatible()

    async def _finish_compatible(self) -> None:
        """Send ``[DONE]``, unless the client is closing the socket.

        Some clients close as soon as they see a finish reason and fail on any later message
        (Node ``ws`` delivers messages that arrive after ``close()``). Under ``tokenwire
        serve`` the writer pings once the last chunk is written and ``[DONE]`` follows the
        pong: a closing client sends its close frame before that pong could come (it answers
        no ping once closing), one that reads on answers at once, so nobody waits longer
        than a round trip. Elsewhere (no :class:`FastWebSocket`) the server waits
        ``ws_done_grace_ms`` for the client's close instead.
        """
        if self._fast is not None:
            if self._closing:
                return
            answered: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            await self._send(Ping(answered))
            if await answered and not self._client_closed:
                await self._send(proto.DONE.encode())
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._config.ws_done_grace_ms / 1000):
                if not self._client_closed:
                    self._closed_event = self._closed_event or asyncio.Event()
                    await self._closed_event.wait()
        if not self._client_closed:
            await self._send(proto.DONE.encode())


async def ws_chat(websocket: WebSocket) -> None:
    """``/v1/ws/chat``: authenticate (header, ticket, or an ``auth`` message), then chat."""
    await serve_socket(websocket, ChatSession)
