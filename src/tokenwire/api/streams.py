"""Resumable streams over HTTP: resume one over SSE, or cancel one.

``GET /v1/chat/completions/{stream_id}/stream``: the cursor is ``Last-Event-ID`` (what a
browser ``EventSource`` sends on reconnect) or the query parameter ``starting_after``; every
event after it is replayed, then the stream goes on live until ``[DONE]``.

``POST /v1/chat/completions/{stream_id}/cancel``: stop the generation now (its upstream
request is closed, on whichever process runs it); its readers get the usage so far with
``finish_reason: "cancelled"``, then ``[DONE]``. Closing the connection is enough to cancel a
stream that is not resumable; a resumable one outlives its reader by ``stream_grace_s``, so
the SSE counterpart of the WebSocket ``chat.completion.cancel`` is this call.

Only the key that created a stream may read or cancel it (404 for any other).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tokenwire.api.auth import authenticate
from tokenwire.api.chat import RETRY_MS
from tokenwire.api.errors import json_response
from tokenwire.api.sse_stream import SSEStream
from tokenwire.errors import InvalidRequest
from tokenwire.state import get_state
from tokenwire.wire.chat_frames import ChatSSEFrames
from tokenwire.wire.untrusted import parse_count

MAX_CURSOR_DIGITS = 15  # event numbers stay far below 10**15 (and 2**53, for JavaScript clients)


def cursor(request: Request) -> int | None:
    """The client's cursor: ``Last-Event-ID`` or ``starting_after`` (None: neither was sent)."""
    header = request.headers.get("last-event-id")
    raw = header or request.query_params.get("starting_after")
    if raw is None:
        return None
    number = parse_count(raw, max_digits=MAX_CURSOR_DIGITS)
    if number is None:
        raise InvalidRequest(
            "The cursor (Last-Event-ID or starting_after) must be a whole number "
            f"of at most {MAX_CURSOR_DIGITS} digits.",
            param="Last-Event-ID" if header else "starting_after",
        )
    return number


async def resume_stream(request: Request) -> SSEStream:
    """Replay a stream's events after the cursor, then follow it live."""
    state = get_state(request)
    key = await authenticate(request)
    after = cursor(request) or 0
    generation = await state.completions.resume(
        request.path_params["stream_id"], key.id, after, "sse"
    )
    return SSEStream(
        generation,
        ChatSSEFrames(generation),
        heartbeat_s=state.settings.server.sse_heartbeat_s,
        read_after=after,
        retry_ms=RETRY_MS,
    )


async def cancel_stream(request: Request) -> Response:
    """Cancel a resumable stream of the caller's; ``already_ended`` if it had finished."""
    state = get_state(request)
    key = await authenticate(request)
    stream_id = request.path_params["stream_id"]
    source = await state.completions.streams.get(stream_id, key.id, 0)
    ended = source.finish_reason is not None or source.error is not None
    if not ended:
        source.cancel("client_cancelled")
    return json_response(
        {"object": "chat.completion.cancel", "id": stream_id, "already_ended": ended}
    )
