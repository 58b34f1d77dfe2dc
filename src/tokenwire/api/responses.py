"""The Responses API over HTTP: ``POST /v1/responses`` (JSON or SSE), ``GET`` and ``DELETE
/v1/responses/{id}``, and ``GET /v1/responses/{id}?stream=true`` (resume a stream).

Requests become chat completions (``tokenwire.responses``); keys, limits, credits, the ledger
and resumable streams work exactly as for ``/v1/chat/completions``. Errors before the first
event keep their HTTP status, as there.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from tokenwire.api.auth import authenticate, client_address
from tokenwire.api.chat import (
    RETRY_MS,
    JSONCompletion,
    asks_resumable,
    authenticated_json,
    bare_endpoint,
    idempotency_of,
    kept_for_resume,
)
from tokenwire.api.errors import error_response, json_response
from tokenwire.api.sse_stream import SSEStream
from tokenwire.api.streams import cursor
from tokenwire.errors import InvalidRequest
from tokenwire.responses import head_of
from tokenwire.state import AppState, get_state
from tokenwire.storage.responses import not_found
from tokenwire.streams.events import Event
from tokenwire.streams.source import StreamSource
from tokenwire.wire.frames import FrameLoop
from tokenwire.wire.responses_frames import ResponsesEncoder
from tokenwire.wire.responses_request import responses_request_from


async def create_response(request: Request) -> ASGIApp:
    """Run a response and answer as one JSON ``response`` object or as an SSE stream."""
    state, key, raw = await authenticated_json(request)
    plan = responses_request_from(raw)
    started = await state.responses.start(
        key,
        plan,
        "sse" if plan.stream else "json",
        resumable=asks_resumable(request),
        idempotency=idempotency_of(request, raw),
        client=client_address(request),
    )
    if not plan.stream:
        return JSONCompletion(started.source, lambda source, events: _json(state, source, events))
    source = started.source
    return SSEStream(
        source,
        ResponsesEncoder(started.head, "sse"),
        heartbeat_s=state.settings.server.sse_heartbeat_s,
        retry_ms=RETRY_MS if kept_for_resume(state, source) else None,
    )


responses_endpoint = bare_endpoint(create_response, "POST /v1/responses")


def _json(state: AppState, source: StreamSource, events: list[Event]) -> Response:
    """The finished ``response`` object, or the error it failed with."""
    encoder = ResponsesEncoder(head_of(source, state.responses.plan_of(source.id)), None)
    FrameLoop(encoder).frames(events)
    if encoder.error is not None:
        return error_response(encoder.error, source.response_headers)
    return json_response(encoder.response(), headers=source.response_headers)


async def get_response(request: Request) -> ASGIApp:
    """A stored response; a running one as it stands; with ``stream=true``, its events."""
    state = get_state(request)
    key = await authenticate(request)
    response_id = request.path_params["response_id"]
    stream = request.query_params.get("stream", "false").lower()
    if stream not in ("true", "false"):
        raise InvalidRequest("stream must be true or false.", param="stream")
    if stream == "true":
        return await _resume(state, request, key.id, response_id)
    running = state.completions.live.get(response_id)
    if running is not None and running.key_id == key.id:
        plan = state.responses.plan_of(response_id)
        if not running.finished and plan is not None and plan.store:
            encoder = ResponsesEncoder(head_of(running, plan), None)
            FrameLoop(encoder).frames(running.log.read_after(0))
            return json_response(encoder.response())
        await running.wait_settled()  # ended: it is being stored (or, store false, not)
    return json_response(await state.responses.store.get(response_id, key.id))


async def _resume(state: AppState, request: Request, key_id: str, response_id: str) -> SSEStream:
    """Replay a resumable response's events after the cursor, then follow it live.

    The cursor is a ``sequence_number`` (``starting_after`` or ``Last-Event-ID``); the log is
    replayed from its start so the events keep their numbers and content.
    """
    after = cursor(request)
    if not response_id.startswith("resp_"):
        raise not_found(response_id)
    source = await state.completions.resume(response_id, key_id, 0, "sse")
    encoder = ResponsesEncoder(
        await state.responses.head(source, key_id),
        "sse",
        starting_after=-1 if after is None else after,
    )
    return SSEStream(
        source,
        encoder,
        heartbeat_s=state.settings.server.sse_heartbeat_s,
        retry_ms=RETRY_MS,
    )


async def delete_response(request: Request) -> Response:
    """Forget a stored response (one still settling here is waited for, then deleted)."""
    state = get_state(request)
    key = await authenticate(request)
    response_id = request.path_params["response_id"]
    running = state.completions.live.get(response_id)
    if running is not None and running.key_id == key.id:
        await running.wait_settled()
    if not await state.responses.store.delete(response_id, key.id):
        raise not_found(response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})
