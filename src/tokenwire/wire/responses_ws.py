"""The Responses API's WebSocket mode without I/O: client messages in (``GET /v1/responses``).

OpenAI's WebSocket mode: a client sends ``response.create`` messages (the create body's fields
at the top level, no ``stream``) and receives the same events as over SSE, one message each.
Responses on one socket run one after another; a ``stream_id`` names a lane of its own
(responses on different lanes run concurrently, each lane in order, and their events carry
the ``stream_id``). This gateway adds ``response.cancel`` (stop the response running on a
lane), and, as on ``/v1/ws/chat``, ``ping`` and ``auth`` messages.

:func:`parse_responses_message` raises :class:`~tokenwire.wire.ws.ProtocolViolation` (the
socket closes) or :class:`~tokenwire.wire.ws.RequestFailed` (an ``error`` event, with the
message's ``stream_id`` as its ``request_id``).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from tokenwire.errors import InvalidRequest
from tokenwire.wire import ws as proto

StreamId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
MESSAGE_TYPES = ("response.create", "response.cancel", "ping", "auth")


class ResponseCreate(msgspec.Struct):
    """``response.create``: the Responses body (validated when its turn comes) and its lane."""

    body: dict[str, Any]
    stream_id: str | None = None


class ResponseCancel(msgspec.Struct, tag_field="type", tag="response.cancel"):
    """Stop the response running on a lane (``response_id``, when given, must be it)."""

    stream_id: StreamId | None = None
    response_id: str | None = None


ResponsesClientMessage = ResponseCreate | ResponseCancel | proto.PingMessage | proto.AuthMessage
_OTHERS = ResponseCancel | proto.PingMessage | proto.AuthMessage


def parse_responses_message(text: str, *, max_bytes: int) -> ResponsesClientMessage:
    """Parse one text message from a client of ``/v1/responses``."""
    data = proto.decode_client_object(text, max_bytes=max_bytes)
    stream_id = data.get("stream_id")
    if stream_id is not None and not (isinstance(stream_id, str) and 0 < len(stream_id) <= 128):
        error = InvalidRequest(
            "stream_id must be a string of 1 to 128 characters.",
            param="stream_id",
            code="invalid_value",
        )
        raise proto.RequestFailed(error, None)
    kind = data.get("type")
    if kind == "response.create":
        body = {name: value for name, value in data.items() if name not in ("type", "stream_id")}
        return ResponseCreate(body, stream_id)
    if kind not in MESSAGE_TYPES:
        error = InvalidRequest(
            f"Unknown message type {kind!r}; expected one of {', '.join(MESSAGE_TYPES)}.",
            param="type",
            code="unknown_message_type",
        )
        raise proto.RequestFailed(error, stream_id)
    try:
        message: ResponsesClientMessage = msgspec.convert(data, _OTHERS)
    except msgspec.ValidationError as exc:
        raise proto.invalid_message(kind, exc, stream_id) from None
    return message
