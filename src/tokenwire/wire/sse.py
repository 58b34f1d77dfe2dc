"""Server-Sent Events framing, both directions, without I/O (WHATWG HTML, "server-sent events").

The server side is a few byte templates; ``DONE`` (``data: [DONE]``) is defined here and only
here. The client side, :class:`SSEParser` (an incremental parser: feed it bytes as they
arrive, get whole events back), lives in the Python SDK (``tokenwire_client.sse``), which the
gateway depends on; it is re-exported here for the OpenAI-compatible upstream reader.
"""

from __future__ import annotations

from tokenwire_client.sse import MAX_EVENT_BYTES, SSEEvent, SSEParser, SSETooLarge

__all__ = ["DONE", "DONE_DATA", "MAX_EVENT_BYTES", "PING", "SSEEvent", "SSEParser", "SSETooLarge"]

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"
DONE_DATA = "[DONE]"


def event(data: bytes, *, event_id: int | None = None, name: bytes = b"") -> bytes:
    """One ``data:`` event, with an ``event:`` line (``name``, ASCII without newlines) and an
    ``id:`` line when given. ``data`` must hold no newline."""
    head = b"event: " + name + b"\n" if name else b""
    if event_id is None:
        return head + b"data: " + data + b"\n\n"
    return b"%sid: %d\ndata: %s\n\n" % (head, event_id, data)


def retry(milliseconds: int) -> bytes:
    """A ``retry:`` line telling reconnecting clients how long to wait, to put at the start of
    an event that has data: SDK parsers (openai's) dispatch a block holding only ``retry:`` as
    an event with empty data, which they then fail to decode."""
    return b"retry: %d\n" % milliseconds
