"""The ``/v1/ws/chat`` protocol without I/O: client message parsing, server message encoding."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokenwire.errors import GatewayError, InvalidRequest, RateLimited, UpstreamStatusError
from tokenwire.streams.events import ToolCallDelta, Usage
from tokenwire.wire import ws
from tokenwire.wire.chunks import ChunkEncoder

MAX = 1_048_576
BODY = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}


def parse(message: Any, *, max_bytes: int = MAX) -> ws.ClientMessage:
    """Parse a message given as a Python value (encoded to JSON) or as raw text."""
    text = message if isinstance(message, str) else json.dumps(message)
    return ws.parse_client_message(text, max_bytes=max_bytes)


# -- parse_client_message: every message type ------------------------------------------------


def test_parse_create() -> None:
    """A create message yields CreateMessage with request_id, body and idempotency_key."""
    message = parse(
        {
            "type": "chat.completion.create",
            "request_id": "r1",
            "body": BODY,
            "idempotency_key": "k-9",
        }
    )
    assert isinstance(message, ws.CreateMessage)
    assert message.request_id == "r1"
    assert message.body == BODY
    assert message.idempotency_key == "k-9"


def test_parse_create_without_idempotency_key() -> None:
    """idempotency_key is optional and defaults to None."""
    message = parse({"type": "chat.completion.create", "request_id": "r", "body": {}})
    assert isinstance(message, ws.CreateMessage)
    assert message.idempotency_key is None
    assert message.body == {}


def test_parse_cancel() -> None:
    """A cancel message yields CancelMessage with its request_id."""
    message = parse({"type": "chat.completion.cancel", "request_id": "r7"})
    assert isinstance(message, ws.CancelMessage)
    assert message.request_id == "r7"


def test_parse_resume_with_defaults() -> None:
    """A resume message needs only stream_id; starting_after defaults to 0, request_id to None."""
    message = parse({"type": "chat.completion.resume", "stream_id": "chatcmpl-x"})
    assert isinstance(message, ws.ResumeMessage)
    assert message.stream_id == "chatcmpl-x"
    assert message.starting_after == 0
    assert message.request_id is None


def test_parse_resume_with_all_fields() -> None:
    """A resume message keeps starting_after and request_id."""
    message = parse(
        {
            "type": "chat.completion.resume",
            "stream_id": "chatcmpl-x",
            "starting_after": 41,
            "request_id": "again",
        }
    )
    assert isinstance(message, ws.ResumeMessage)
    assert (message.starting_after, message.request_id) == (41, "again")


def test_parse_ping() -> None:
    """{"type": "ping"} yields PingMessage."""
    assert isinstance(parse({"type": "ping"}), ws.PingMessage)


def test_parse_auth() -> None:
    """An auth message yields AuthMessage with the api_key."""
    message = parse({"type": "auth", "api_key": "tw-secret"})
    assert isinstance(message, ws.AuthMessage)
    assert message.api_key == "tw-secret"


def test_parse_plain_body_is_compatible_mode() -> None:
    """An object without "type" is a compatible-mode request carrying the raw body."""
    body = {**BODY, "stream": True, "max_tokens": 3, "vendor_field": {"x": [1]}}
    message = parse(body)
    assert isinstance(message, ws.CompatibleRequest)
    assert message.body == body


def test_parse_request_id_limits() -> None:
    """request_id may be 1 and 128 characters long."""
    for request_id in ("a", "x" * 128):
        message = parse({"type": "chat.completion.cancel", "request_id": request_id})
        assert isinstance(message, ws.CancelMessage)
        assert message.request_id == request_id


# -- parse_client_message: protocol violations (the socket closes) ---------------------------


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", ws.CLOSE_INVALID_PAYLOAD),
        ('{"type": "ping"', ws.CLOSE_INVALID_PAYLOAD),
        ("", ws.CLOSE_INVALID_PAYLOAD),
        ("[DONE]", ws.CLOSE_INVALID_PAYLOAD),
        ("[1, 2]", ws.CLOSE_INVALID_PAYLOAD),
        ('[{"type": "ping"}]', ws.CLOSE_INVALID_PAYLOAD),
        ('"ping"', ws.CLOSE_INVALID_PAYLOAD),
        ("42", ws.CLOSE_INVALID_PAYLOAD),
        ("null", ws.CLOSE_INVALID_PAYLOAD),
        ("true", ws.CLOSE_INVALID_PAYLOAD),
    ],
    ids=[
        "not-json",
        "truncated",
        "empty",
        "done-literal",
        "array",
        "array-of-objects",
        "string",
        "number",
        "null",
        "bool",
    ],
)
def test_non_object_messages_violate_the_protocol(text: str, code: int) -> None:
    """Text that is not JSON, or JSON that is not an object, raises ProtocolViolation(1007)."""
    with pytest.raises(ws.ProtocolViolation) as info:
        parse(text)
    assert info.value.code == code == 1007
    assert info.value.reason


def test_message_over_the_limit_is_too_big() -> None:
    """A message longer than max_bytes raises ProtocolViolation(1009) before any parsing."""
    text = json.dumps({"type": "ping", "pad": "x" * 200})
    with pytest.raises(ws.ProtocolViolation) as info:
        parse(text, max_bytes=100)
    assert info.value.code == ws.CLOSE_TOO_BIG == 1009
    assert "100" in info.value.reason


def test_message_exactly_at_the_limit_is_accepted() -> None:
    """A message of exactly max_bytes bytes is parsed."""
    text = json.dumps({"type": "ping", "pad": "x" * 50})
    assert isinstance(parse(text, max_bytes=len(text.encode())), ws.PingMessage)


def test_limit_counts_utf8_bytes_not_characters() -> None:
    """The limit is in bytes: 600 two-byte characters (1,200+ bytes) exceed a 1,000-byte limit."""
    text = json.dumps({"type": "ping", "pad": "é" * 600}, ensure_ascii=False)
    assert len(text) < 1000 < len(text.encode())
    with pytest.raises(ws.ProtocolViolation) as info:
        parse(text, max_bytes=1000)
    assert info.value.code == ws.CLOSE_TOO_BIG


def test_protocol_violation_reason_fits_a_close_frame() -> None:
    """A ProtocolViolation's reason is cut so that it fits a close frame (at most 123 bytes)."""
    violation = ws.ProtocolViolation(ws.CLOSE_POLICY, "r" * 500)
    assert violation.code == 1008
    assert len(violation.reason.encode()) <= 123
    assert violation.reason == "r" * len(violation.reason)


def test_close_code_constants() -> None:
    """The close codes are the documented numbers."""
    assert (
        ws.CLOSE_NORMAL,
        ws.CLOSE_UNSUPPORTED_DATA,
        ws.CLOSE_INVALID_PAYLOAD,
        ws.CLOSE_POLICY,
        ws.CLOSE_TOO_BIG,
        ws.CLOSE_TRY_AGAIN_LATER,
        ws.CLOSE_UNAUTHORIZED,
    ) == (1000, 1003, 1007, 1008, 1009, 1013, 3000)


# -- parse_client_message: errors for one message (the socket stays open) --------------------


@pytest.mark.parametrize(
    ("message", "param", "code"),
    [
        ({"type": "chat.completion.stream"}, "type", "unknown_message_type"),
        ({"type": "PING"}, "type", "unknown_message_type"),
        ({"type": 5}, "type", "unknown_message_type"),
        ({"type": ""}, "type", "unknown_message_type"),
        ({"type": "chat.completion.create", "body": BODY}, "request_id", None),
        ({"type": "chat.completion.create", "request_id": "", "body": BODY}, "request_id", None),
        (
            {"type": "chat.completion.create", "request_id": "x" * 129, "body": BODY},
            "request_id",
            None,
        ),
        ({"type": "chat.completion.create", "request_id": 5, "body": BODY}, "request_id", None),
        ({"type": "chat.completion.create", "request_id": "r"}, "body", None),
        ({"type": "chat.completion.create", "request_id": "r", "body": "hi"}, "body", None),
        ({"type": "chat.completion.create", "request_id": "r", "body": [BODY]}, "body", None),
        ({"type": "chat.completion.cancel"}, "request_id", None),
        ({"type": "chat.completion.cancel", "request_id": ""}, "request_id", None),
        ({"type": "chat.completion.resume"}, "stream_id", None),
        (
            {"type": "chat.completion.resume", "stream_id": "c", "starting_after": -1},
            "starting_after",
            None,
        ),
        (
            {"type": "chat.completion.resume", "stream_id": "c", "request_id": ""},
            "request_id",
            None,
        ),
        ({"type": "auth"}, "api_key", None),
        ({"type": "auth", "api_key": 42}, "api_key", None),
    ],
    ids=[
        "unknown-type",
        "type-wrong-case",
        "type-not-a-string",
        "type-empty",
        "create-missing-request-id",
        "create-empty-request-id",
        "create-request-id-too-long",
        "create-request-id-not-a-string",
        "create-missing-body",
        "create-body-a-string",
        "create-body-an-array",
        "cancel-missing-request-id",
        "cancel-empty-request-id",
        "resume-missing-stream-id",
        "resume-negative-starting-after",
        "resume-empty-request-id",
        "auth-missing-key",
        "auth-key-not-a-string",
    ],
)
def test_invalid_envelopes_are_request_errors(
    message: dict[str, Any], param: str | None, code: str | None
) -> None:
    """A malformed envelope is a 400 for that message naming the field, not a violation."""
    with pytest.raises((InvalidRequest, ws.RequestFailed)) as info:
        parse(message)
    error = info.value.error if isinstance(info.value, ws.RequestFailed) else info.value
    if isinstance(info.value, ws.RequestFailed):
        request_id = message.get("request_id")
        usable = isinstance(request_id, str) and 0 < len(request_id) <= 128
        assert info.value.request_id == (request_id if usable else None)
    assert error.http_status == 400
    assert error.type == "invalid_request_error"
    assert error.param == param
    assert error.code == code
    assert error.message


def test_unknown_type_lists_the_known_ones() -> None:
    """The unknown-type error names the type it got and every valid one."""
    with pytest.raises(InvalidRequest) as info:
        parse({"type": "subscribe"})
    for name in (
        "'subscribe'",
        "chat.completion.create",
        "chat.completion.cancel",
        "chat.completion.resume",
        "ping",
        "auth",
    ):
        assert name in info.value.message


# -- envelope_chunk ----------------------------------------------------------------------------


def encoder(include_usage: bool = False) -> ChunkEncoder:
    return ChunkEncoder(
        completion_id="chatcmpl-abc", created=7, model="sim", include_usage=include_usage
    )


@pytest.mark.parametrize(
    "chunk",
    [
        encoder().text('He said "hi"\n'),
        encoder(include_usage=True).text("ünï"),
        encoder().tool_call(ToolCallDelta(index=0, id="call_1", name="f", arguments='{"a"')),
        encoder().finish("stop"),
        encoder(include_usage=True).usage(Usage(3, 4)),
    ],
    ids=["text", "text-with-null-usage", "tool-call", "finish", "usage"],
)
def test_envelope_chunk_keeps_every_field_and_adds_three(chunk: bytes) -> None:
    """envelope_chunk is the original chunk plus type, request_id and sequence_number."""
    original = json.loads(chunk)
    wrapped = json.loads(ws.envelope_chunk(chunk, "req-1", 12))
    assert wrapped == {
        **original,
        "type": "chat.completion.chunk",
        "request_id": "req-1",
        "sequence_number": 12,
    }
    assert list(wrapped)[: len(original)] == list(original)


def test_envelope_chunk_escapes_the_request_id() -> None:
    """A request_id with quotes, backslashes and non-ASCII is JSON-escaped, not injected."""
    request_id = 'a"b\\c ü\n}'
    wrapped = json.loads(ws.envelope_chunk(encoder().text("x"), request_id, 1))
    assert wrapped["request_id"] == request_id
    assert wrapped["choices"][0]["delta"]["content"] == "x"


# -- done_message, error_message, PONG ---------------------------------------------------------


def test_done_message_with_usage() -> None:
    """done carries type, request_id, stream_id, sequence_number, finish_reason and usage."""
    done = json.loads(ws.done_message("r1", "chatcmpl-abc", "length", Usage(5, 7), 9))
    assert done == {
        "type": "chat.completion.done",
        "request_id": "r1",
        "stream_id": "chatcmpl-abc",
        "sequence_number": 9,
        "finish_reason": "length",
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


def test_done_message_cancelled_with_estimated_usage() -> None:
    """An estimated usage is reported in the same shape (no 'estimated' field leaks out)."""
    done = json.loads(
        ws.done_message("r2", "chatcmpl-z", "cancelled", Usage(3, 2, estimated=True), 2)
    )
    assert done["finish_reason"] == "cancelled"
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_done_message_without_usage_has_null_usage() -> None:
    """Without usage the key is still present, as null."""
    done = json.loads(ws.done_message("r", "chatcmpl-q", "stop", None, 3))
    assert "usage" in done
    assert done["usage"] is None


def test_error_message_for_a_request() -> None:
    """error_message has type, request_id and the OpenAI error body plus status."""
    error = InvalidRequest("bad max_tokens", param="max_tokens", code="invalid_value")
    message = json.loads(ws.error_message(error, "r9"))
    assert message == {
        "type": "error",
        "request_id": "r9",
        "error": {
            "message": "bad max_tokens",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "invalid_value",
            "status": 400,
        },
    }


def test_error_message_without_a_request_omits_request_id() -> None:
    """An error for a message without a request has no request_id key at all."""
    message = json.loads(ws.error_message(GatewayError("boom")))
    assert message["type"] == "error"
    assert "request_id" not in message
    assert message["error"]["status"] == 500
    assert message["error"]["type"] == "api_error"
    assert "retry_after_ms" not in message["error"]


def test_error_message_rate_limited_has_retry_after_ms() -> None:
    """A RateLimited error carries status 429 and retry_after_ms in milliseconds."""
    error = RateLimited("slow down", retry_after_s=1.5, code="too_many_concurrent_requests")
    message = json.loads(ws.error_message(error, "r3"))
    assert message["request_id"] == "r3"
    assert message["error"]["status"] == 429
    assert message["error"]["code"] == "too_many_concurrent_requests"
    assert message["error"]["type"] == "rate_limit_error"
    assert message["error"]["retry_after_ms"] == 1500


def test_error_message_upstream_status_keeps_status_and_retry_after() -> None:
    """An upstream error keeps its status and type; retry_after_ms only when one was given."""
    with_retry = UpstreamStatusError(
        "busy", status=503, error_type="overloaded_error", retry_after_s=2.0
    )
    without = UpstreamStatusError("bad gateway", status=502)
    first = json.loads(ws.error_message(with_retry, "a"))["error"]
    second = json.loads(ws.error_message(without, "b"))["error"]
    assert (first["status"], first["type"], first["retry_after_ms"]) == (
        503,
        "overloaded_error",
        2000,
    )
    assert second["status"] == 502
    assert "retry_after_ms" not in second


def test_pong() -> None:
    """PONG is {"type": "pong"}."""
    assert json.loads(ws.PONG) == {"type": "pong"}
