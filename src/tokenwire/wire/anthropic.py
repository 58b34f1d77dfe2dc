"""Anthropic's Messages API on the wire (sans-I/O): stream events, errors, stop reasons.

One module for the format, whichever side speaks it: the Messages API (``api/messages.py``)
writes these events to its clients, the Anthropic provider (``providers/anthropic.py``) reads
them from upstream, and the loopback fake (``testing_upstreams/anthropic_fake.py``) writes
them in tests. The builders return the JSON objects Anthropic documents for each stream event
(``message_start``, ``content_block_start``/``_delta``/``_stop``, ``message_delta``,
``message_stop``, ``ping``, ``error``); :func:`frame` writes one as a server-sent event
(``event:`` line naming its type, ``data:`` line with compact JSON, an optional ``id:``)::

    event: content_block_delta
    data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import msgspec

from tokenwire.streams.events import FinishReason

Block = dict[str, Any]

ANTHROPIC_VERSION = "2023-06-01"
"""The ``anthropic-version`` the provider sends (and the one every Anthropic SDK sends)."""

ImageType = Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
"""The media types of Anthropic's ``image`` blocks."""
IMAGE_TYPES = frozenset(get_args(ImageType))

ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
"""The HTTP status Anthropic uses for each error type."""

_TYPE_OF_STATUS = {
    status: error_type for error_type, status in ERROR_STATUS.items() if status < 500
} | {504: "timeout_error", 529: "overloaded_error"}

FINISH_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
"""Anthropic's ``stop_reason`` as the gateway's finish reason."""

STOP_REASONS: dict[FinishReason, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}
"""The gateway's finish reason as Anthropic's ``stop_reason`` (``cancelled`` has none)."""

_encode = msgspec.json.encode


def error_type(status: int, reported_type: str | None = None) -> str:
    """Anthropic's error ``type`` for an error reported with ``status``.

    A 4xx has the type Anthropic gives that status (any other 4xx is an
    ``invalid_request_error``); a 5xx keeps the type an upstream reported when it is one of
    Anthropic's specific server-side types (``overloaded_error`` from Anthropic itself), else
    has the type of its status (504, 529), else ``api_error``.
    """
    if status < 500:
        return _TYPE_OF_STATUS.get(status, "invalid_request_error")
    if reported_type != "api_error" and ERROR_STATUS.get(reported_type or "", 0) >= 500:
        return str(reported_type)
    return _TYPE_OF_STATUS.get(status, "api_error")


def error(error_type: str, message: str) -> Block:
    """Anthropic's error object: an HTTP error body, and the ``error`` stream event."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


def frame(data: Block, event_id: int | None = None) -> bytes:
    """One stream event as a server-sent event; its ``event:`` line is its ``type``."""
    head = b"event: %s\n" % data["type"].encode()
    if event_id is not None:
        head = b"id: %d\n" % event_id + head
    return head + b"data: " + _encode(data) + b"\n\n"


def usage(input_tokens: int, output_tokens: int) -> Block:
    """A ``usage`` object (the cache counts are the upstream's business: always zero here)."""
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def message(
    message_id: str,
    model: str,
    content: list[Block],
    *,
    stop_reason: str | None,
    stop_sequence: str | None,
    usage: Block,
) -> Block:
    """A ``message`` object: the non-streamed answer, and the one ``message_start`` carries."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


def message_start(message: Block) -> Block:
    """``message_start``: the message with no content yet and no stop reason."""
    return {"type": "message_start", "message": message}


def content_block_start(index: int, block: Block) -> Block:
    """``content_block_start``: an empty ``text`` block or a ``tool_use`` with ``input: {}``."""
    return {"type": "content_block_start", "index": index, "content_block": block}


def text_delta(index: int, text: str) -> Block:
    """``content_block_delta`` carrying a piece of text."""
    return {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "text_delta", "text": text},
    }


def input_json_delta(index: int, partial_json: str) -> Block:
    """``content_block_delta`` carrying a piece of a tool call's input JSON."""
    return {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "input_json_delta", "partial_json": partial_json},
    }


def content_block_stop(index: int) -> Block:
    """``content_block_stop``."""
    return {"type": "content_block_stop", "index": index}


def message_delta(stop_reason: str | None, stop_sequence: str | None, usage: Block) -> Block:
    """``message_delta``: the stop reason and the cumulative usage."""
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
        "usage": usage,
    }


MESSAGE_STOP: Block = {"type": "message_stop"}
PING: Block = {"type": "ping"}
PING_FRAME = frame(PING)
