"""``POST /v1/chat/completions``: JSON (``stream: false``) and SSE (``stream: true``)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenwire.api.auth import authenticate
from tokenwire.api.disconnect import cancel_on_disconnect
from tokenwire.api.errors import error_response, internal_error_response, json_response
from tokenwire.api.sse_stream import SSEStream
from tokenwire.errors import BodyTooLarge, GatewayError, InvalidRequest
from tokenwire.state import AppState, get_state
from tokenwire.streams.generation import Generation
from tokenwire.streams.source import StreamSource
from tokenwire.streams.store import request_digest
from tokenwire.wire.chat_frames import ChatSSEFrames
from tokenwire.wire.chunks import CompletionBuilder
from tokenwire.wire.schema import chat_request_from
from tokenwire.wire.untrusted import decode_json_value, parse_count

RETRY_MS = 1000  # the ``retry:`` SSE field sent on resumable streams


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or ``BodyTooLarge`` (413) as soon as it exceeds ``limit`` bytes."""
    # A malformed length is left to the server's HTTP parser; the count below still holds.
    declared = parse_count(request.headers.get("content-length", ""), max_digits=30)
    if declared is not None and declared > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"The request body exceeds the limit of {limit} bytes.")


async def create_completion(request: Request) -> Response | SSEStream | JSONCompletion:
    """Run a chat completion and answer as JSON or as an SSE stream."""
    state = get_state(request)
    key = await authenticate(request)
    body = await read_body(request, state.settings.server.max_body_bytes)
    # Decoded once: plain JSON (nesting bounded: a 400, not a RecursionError), then validated
    # into typed values; the plain object is what an OpenAI-compatible upstream receives.
    raw = decode_json_value(body, what="JSON body of your request")
    chat_request = chat_request_from(raw)
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not 0 < len(idempotency_key) <= 256:
        raise InvalidRequest(
            "Idempotency-Key must be 1 to 256 characters.", param="Idempotency-Key"
        )
    generation = await state.completions.start(
        key,
        chat_request,
        raw,
        "sse" if chat_request.stream else "json",
        resumable=request.headers.get("x-tokenwire-resumable", "").lower() in ("1", "true"),
        idempotency=None if idempotency_key is None else (idempotency_key, request_digest(raw)),
    )
    if not chat_request.stream:
        return JSONCompletion(generation)
    return SSEStream(
        generation,
        ChatSSEFrames(generation),
        heartbeat_s=state.settings.server.sse_heartbeat_s,
        retry_ms=RETRY_MS if _resumable(state, generation) else None,
    )


def _resumable(state: AppState, stream: StreamSource) -> bool:
    """A stream kept for resuming (one from another process always is)."""
    return not isinstance(stream, Generation) or state.completions.streams.holds(stream)


async def completions_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """``create_completion`` as a bare ASGI endpoint, with the app's error rendering."""
    request = Request(scope, receive)
    response: Response | SSEStream | JSONCompletion
    try:
        response = await create_completion(request)
    except GatewayError as exc:
        response = error_response(exc)
    except Exception as exc:  # noqa: BLE001 - rendered as a 500 without a stack trace
        response = internal_error_response(exc, "POST /v1/chat/completions")
    await response(scope, receive, send)


class JSONCompletion:
    """Waits for the whole completion and answers one ``chat.completion`` object.

    If the client disconnects while waiting, the reader closes and the upstream is cancelled.
    """

    def __init__(self, generation: StreamSource) -> None:
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        generation = self._generation
        builder = CompletionBuilder()
        batches = generation.read()
        async with cancel_on_disconnect(receive) as disconnect:
            try:
                async for batch in batches:
                    for event in batch or ():
                        builder.add(event)
            finally:
                await batches.aclose()
        if disconnect.happened:
            return
        if builder.error is not None:
            response = error_response(builder.error, generation.response_headers)
        else:
            result = builder.build(
                completion_id=generation.id, created=generation.created, model=generation.model
            )
            response = json_response(result, headers=generation.response_headers)
        await response(scope, receive, send)
