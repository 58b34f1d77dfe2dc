"""The ``/v1/ws/chat`` protocol without I/O: client messages in, server messages out.

Two modes share one socket (see ``docs/websocket-protocol.md``):

* **compatible**: the client sends a plain chat-completions body; the server answers with the
  exact chunk JSON that SSE carries after ``data:``, one text message each, then ``[DONE]``.
* **envelope**: typed messages (``chat.completion.create`` / ``cancel`` / ``resume``, ``ping``,
  ``auth``) with a ``request_id``; server chunks keep the OpenAI chunk shape plus
  ``type``, ``request_id`` and ``sequence_number``.

:func:`parse_client_message` raises :class:`ProtocolViolation` (the socket must close with its
code), :class:`RequestFailed` (an error for one request, with its ``request_id`` when the
message had a usable one) or :class:`~tokenwire.errors.InvalidRequest` (an unknown ``type``).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from tokenwire.errors import GatewayError, InvalidRequest
from tokenwire.streams.events import Usage
from tokenwire.wire.chunks import usage_object
from tokenwire.wire.untrusted import (
    MAX_JSON_DEPTH,
    may_be_too_deep,
    param_from_message,
    too_deep_path,
)

# Close codes (RFC 6455 and the IANA registry), all documented in docs/websocket-protocol.md.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_UNAUTHORIZED = 3000
CLOSE_FORBIDDEN = 3003

SUBPROTOCOL = "tokenwire.v1"
TICKET_PREFIX = "tokenwire.ticket."
DONE = "[DONE]"

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class RequestFailed(Exception):
    """A gateway error that belongs to one request: reported with its ``request_id``."""

    def __init__(self, error: GatewayError, request_id: str | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.request_id = request_id


class ProtocolViolation(Exception):
    """The peer broke the protocol; the socket closes with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason[:120]  # a close reason is at most 123 bytes


class CreateMessage(msgspec.Struct, tag_field="type", tag="chat.completion.create"):
    request_id: RequestId
    body: dict[str, Any]
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    resumable: bool = False
    include_cost: bool = False


class CancelMessage(msgspec.Struct, tag_field="type", tag="chat.completion.cancel"):
    request_id: RequestId


class ResumeMessage(msgspec.Struct, tag_field="type", tag="chat.completion.resume"):
    stream_id: str
    starting_after: Annotated[int, msgspec.Meta(ge=0, lt=10**15)] = 0
    request_id: RequestId | None = None


class PingMessage(msgspec.Struct, tag_field="type", tag="ping"):
    pass


class AuthMessage(msgspec.Struct, tag_field="type", tag="auth"):
    api_key: str


class CompatibleRequest(msgspec.Struct):
    """A plain chat-completions body (compatible mode); ``body`` is the raw object."""

    body: dict[str, Any]


ClientMessage = (
    CreateMessage | CancelMessage | ResumeMessage | PingMessage | AuthMessage | CompatibleRequest
)
_ENVELOPES = CreateMessage | CancelMessage | ResumeMessage | PingMessage | AuthMessage
_MESSAGE_TYPES = (
    "chat.completion.create",
    "chat.completion.cancel",
    "chat.completion.resume",
    "ping",
    "auth",
)


def decode_client_object(text: str, *, max_bytes: int) -> dict[str, Any]:
    """One client message as a JSON object: size, JSON, object and nesting checked.

    Raises :class:`ProtocolViolation` (too big, not JSON, not an object) or
    :class:`RequestFailed` (nested too deep).
    """
    # Characters <= UTF-8 bytes <= 4 x characters: encode only when the length is ambiguous.
    if len(text) > max_bytes or (len(text) * 4 > max_bytes and len(text.encode()) > max_bytes):
        raise ProtocolViolation(CLOSE_TOO_BIG, f"message over {max_bytes} bytes")
    try:
        data = msgspec.json.decode(text)
    except msgspec.DecodeError:
        raise ProtocolViolation(CLOSE_INVALID_PAYLOAD, "message is not valid JSON") from None
    except RecursionError:  # nested ~1000 deep: an error for this message, as over HTTP
        raise RequestFailed(_too_deep(None), None) from None
    if not isinstance(data, dict):
        raise ProtocolViolation(CLOSE_INVALID_PAYLOAD, "message is not a JSON object")
    if may_be_too_deep(text) and (field := too_deep_path(data)) is not None:
        request_id = data.get("request_id")
        valid_id = isinstance(request_id, str) and 0 < len(request_id) <= 128
        raise RequestFailed(_too_deep(field or None), request_id if valid_id else None)
    return data


def parse_client_message(text: str, *, max_bytes: int) -> ClientMessage:
    """Parse one text message from a client."""
    data = decode_client_object(text, max_bytes=max_bytes)
    kind = data.get("type")
    if kind is None:
        return CompatibleRequest(body=data)
    if kind not in _MESSAGE_TYPES:
        raise InvalidRequest(
            f"Unknown message type {kind!r}; expected one of {', '.join(_MESSAGE_TYPES)}.",
            param="type",
            code="unknown_message_type",
        )
    try:
        message: ClientMessage = msgspec.convert(data, _ENVELOPES)
    except msgspec.ValidationError as exc:
        request_id = data.get("request_id")
        valid_id = isinstance(request_id, str) and 0 < len(request_id) <= 128
        raise invalid_message(kind, exc, request_id if valid_id else None) from None
    return message


def invalid_message(
    kind: str, exc: msgspec.ValidationError, request_id: str | None
) -> RequestFailed:
    """A message of a known ``type`` that does not validate: a 400 naming the field."""
    text = str(exc)
    error = InvalidRequest(f"Invalid {kind} message: {text}", param=param_from_message(text))
    return RequestFailed(error, request_id)


def _too_deep(param: str | None) -> InvalidRequest:
    return InvalidRequest(
        f"The message nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.",
        param=param,
        code="json_too_deep",
    )


_encode = msgspec.json.encode


def envelope_chunk(chunk: bytes, request_id: str, sequence_number: int) -> bytes:
    """An OpenAI chunk with ``type``, ``request_id`` and ``sequence_number`` added."""
    return b"".join(
        (
            chunk[:-1],
            b',"type":"chat.completion.chunk","request_id":',
            _encode(request_id),
            b',"sequence_number":%d}' % sequence_number,
        )
    )


def done_message(
    request_id: str, stream_id: str, finish_reason: str, usage: Usage | None, sequence_number: int
) -> bytes:
    """``chat.completion.done``: the request's end, with finish reason and usage."""
    return _encode(
        {
            "type": "chat.completion.done",
            "request_id": request_id,
            "stream_id": stream_id,
            "sequence_number": sequence_number,
            "finish_reason": finish_reason,
            "usage": None if usage is None else usage_object(usage),
        }
    )


def error_message(error: GatewayError, request_id: str | None = None) -> bytes:
    """``{"type": "error", "request_id"?, "error": {message, type, code, param, status}}``."""
    body = error.to_body()
    body["error"]["status"] = error.http_status
    retry_after = getattr(error, "retry_after_s", None)
    if isinstance(retry_after, int | float):
        body["error"]["retry_after_ms"] = int(retry_after * 1000)
    message: dict[str, Any] = {"type": "error"}
    if request_id is not None:
        message["request_id"] = request_id
    message["error"] = body["error"]
    return _encode(message)


def closing_message(reason: str, close_code: int, drain_ms: int) -> bytes:
    """``session.closing``: the server drains (``reason`` ``shutdown`` or ``restart``).

    Running requests go on for up to ``drain_ms``; new ones are refused; the socket closes
    with ``close_code`` once none runs (docs/websocket-protocol.md, "Server shutdown").
    """
    return _encode(
        {
            "type": "session.closing",
            "reason": reason,
            "close_code": close_code,
            "drain_ms": drain_ms,
        }
    )


PONG = _encode({"type": "pong"})
