"""``POST /v1/chat/completions``: JSON (``stream: false``) and SSE (``stream: true``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenwire.accounting.keys import KeyRecord
from tokenwire.api.auth import authenticate, client_address
from tokenwire.api.disconnect import cancel_on_disconnect
from tokenwire.api.errors import error_response, internal_error_response, json_response
from tokenwire.api.sse_stream import SSEStream
from tokenwire.errors import BodyTooLarge, GatewayError, InvalidRequest
from tokenwire.state import AppState, get_state
from tokenwire.streams.events import Event
from tokenwire.streams.generation import Generation
from tokenwire.streams.source import StreamSource
from tokenwire.streams.store import request_digest
from tokenwire.wire.chat_frames import ChatSSEFrames
from tokenwire.wire.chunks import CompletionBuilder
from tokenwire.wire.schema import chat_request_from
from tokenwire.wire.untrusted import decode_json_value, parse_count

RETRY_MS = 1000  # the ``retry:`` SSE field sent on resumable streams


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or ``BodyTooLarge`` (413) as soon as it exceeds ``limit`` bytes.

    Read from the ASGI channel directly (Starlette's ``request.stream()`` is an async
    generator per request); a client gone before the end is Starlette's ``ClientDisconnect``.
    """
    # A malformed length is left to the server's HTTP parser; the count below still holds.
    declared = parse_count(request.headers.get("content-length", ""), max_digits=30)
    if declared is not None and declared > limit:
        raise _too_large(limit)
    receive = request.receive
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        body: bytes = message.get("body", b"")  # the whole body in one message: most requests
        if len(body) > limit:
            raise _too_large(limit)
        return body
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"The request body exceeds the limit of {limit} bytes.")


async def authenticated_json(request: Request) -> tuple[AppState, KeyRecord, Any]:
    """The app's state, the caller's key and the request's JSON body: read within the size
    limit (413) and decoded once, its nesting bounded (a 400, not a RecursionError)."""
    state = get_state(request)
    key = await authenticate(request)
    body = await read_body(request, state.settings.server.max_body_bytes)
    return state, key, decode_json_value(body, what="JSON body of your request")


async def create_completion(request: Request) -> Response | SSEStream | JSONCompletion:
    """Run a chat completion and answer as JSON or as an SSE stream."""
    state, key, raw = await authenticated_json(request)
    # Validated into typed values; the plain object is what an OpenAI-compatible upstream gets.
    chat_request = chat_request_from(raw)
    generation = await state.completions.start(
        key,
        chat_request,
        raw,
        "sse" if chat_request.stream else "json",
        resumable=asks_resumable(request),
        idempotency=idempotency_of(request, raw),
        client=client_address(request),
        include_cost=asks_cost(request),
    )
    if not chat_request.stream:
        return JSONCompletion(generation, chat_completion_json)
    return SSEStream(
        generation,
        ChatSSEFrames(generation),
        heartbeat_s=state.settings.server.sse_heartbeat_s,
        retry_ms=RETRY_MS if kept_for_resume(state, generation) else None,
    )


def kept_for_resume(state: AppState, stream: StreamSource) -> bool:
    """A stream kept for resuming (one from another process always is)."""
    return not isinstance(stream, Generation) or state.completions.streams.holds(stream)


def asks_resumable(request: Request) -> bool:
    """Whether the request opts in to a resumable stream (``X-Tokenwire-Resumable``)."""
    return request.headers.get("x-tokenwire-resumable", "").lower() in ("1", "true")


def asks_cost(request: Request) -> bool:
    """Whether the request wants its charge in its usage (``X-Tokenwire-Include-Cost``)."""
    return request.headers.get("x-tokenwire-include-cost", "").lower() in ("1", "true")


def idempotency_of(request: Request, raw: dict[str, Any]) -> tuple[str, str] | None:
    """``(Idempotency-Key, body digest)``, or None without the header; a 400 if malformed."""
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is None:
        return None
    if not 0 < len(idempotency_key) <= 256:
        raise InvalidRequest(
            "Idempotency-Key must be 1 to 256 characters.", param="Idempotency-Key"
        )
    return idempotency_key, request_digest(raw)


Endpoint = Callable[[Request], Awaitable[ASGIApp]]


def bare_endpoint(create: Endpoint, what: str) -> ASGIApp:
    """``create`` as a bare ASGI endpoint (no Starlette router), with the app's error rendering."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response: ASGIApp
        try:
            response = await create(request)
        except GatewayError as exc:
            response = error_response(exc)
        except Exception as exc:  # noqa: BLE001 - rendered as a 500 without a stack trace
            response = internal_error_response(exc, what)
        await response(scope, receive, send)

    return endpoint


def chat_completion_json(generation: StreamSource, events: list[Event]) -> Response:
    """The ``chat.completion`` object of a finished completion (or its error)."""
    builder = CompletionBuilder()
    for event in events:
        builder.add(event)
    headers = {**generation.response_headers, "x-stream-id": generation.id}
    if builder.error is not None:
        return error_response(builder.error, headers)
    result = builder.build(
        completion_id=generation.id, created=generation.created, model=generation.model
    )
    return json_response(result, headers=headers)


class JSONCompletion:
    """Waits for the whole completion and answers one JSON object (``render`` makes it).

    If the client disconnects while waiting, the reader closes and the upstream is cancelled.
    """

    def __init__(
        self, generation: StreamSource, render: Callable[[StreamSource, list[Event]], Response]
    ) -> None:
        self._generation = generation
        self._render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        generation = self._generation
        events: list[Event] = []
        batches = generation.read()
        async with cancel_on_disconnect(scope, receive) as disconnect:
            try:
                async for batch in batches:
                    events.extend(batch or ())
            finally:
                await batches.aclose()
        if disconnect.happened:
            return
        await self._render(generation, events)(scope, receive, send)


completions_endpoint = bare_endpoint(create_completion, "POST /v1/chat/completions")
