"""``GET /v1/chat/completions/{stream_id}/stream``: resume a resumable stream over SSE.

The cursor is ``Last-Event-ID`` (what a browser ``EventSource`` sends on reconnect) or the
query parameter ``starting_after``; every event after it is replayed, then the stream goes on
live until ``[DONE]``. Only the key that created the stream may read it (404 for any other).
"""

from __future__ import annotations

from starlette.requests import Request

from tokenwire.api.auth import authenticate
from tokenwire.api.chat import RETRY_MS
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
    generation = await state.completions.streams.get(
        request.path_params["stream_id"], key.id, after
    )
    return SSEStream(
        generation,
        ChatSSEFrames(generation),
        heartbeat_s=state.settings.server.sse_heartbeat_s,
        read_after=after,
        retry_ms=RETRY_MS,
    )
