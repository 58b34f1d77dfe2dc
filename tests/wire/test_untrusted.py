"""``wire/untrusted.py``: whole numbers from ASCII digits only, JSON nested at most 100 deep."""

from __future__ import annotations

import msgspec
import pytest

from tokenwire.errors import InvalidRequest
from tokenwire.wire import ws
from tokenwire.wire.sse import SSEParser
from tokenwire.wire.untrusted import (
    MAX_JSON_DEPTH,
    decode_json,
    decode_json_value,
    parse_count,
    too_deep_path,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("42", 42),
        ("007", 7),
        ("9" * 18, 10**18 - 1),
        ("9" * 19, None),
        ("9" * 5000, None),
        ("", None),
        ("²", None),
        ("\u0661", None),  # ARABIC-INDIC DIGIT ONE: isdigit() and int() both accept it
        ("\uff11", None),  # FULLWIDTH DIGIT ONE
        ("-1", None),
        ("+1", None),
        (" 1", None),
        ("1.0", None),
        ("1_000", None),
    ],
)
def test_parse_count_takes_ascii_digits_only(text: str, expected: int | None) -> None:
    """Only 1 to 18 ASCII digits are a count; signs, spaces, underscores and Unicode digits are not."""
    assert parse_count(text) == expected


def test_parse_count_length_cap() -> None:
    """``max_digits`` caps the length before ``int`` runs."""
    assert parse_count("123", max_digits=3) == 123
    assert parse_count("1234", max_digits=3) is None


def nest(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_too_deep_path_names_the_top_level_field() -> None:
    """The depth walk reports the top-level field that nests too deeply, '' for a bare array."""
    assert too_deep_path({"a": 1, "b": nest(3)}, limit=4) is None
    assert too_deep_path({"a": 1, "b": nest(4)}, limit=4) == "b"
    assert too_deep_path(nest(5), limit=4) == ""
    assert too_deep_path(nest(50_000)) == ""  # iterative: no RecursionError


def test_decode_json_value_refuses_deep_nesting() -> None:
    """Nesting past MAX_JSON_DEPTH is a 400 json_too_deep, both under and over msgspec's own limit."""
    at_limit = b'{"x": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert isinstance(decode_json_value(at_limit), dict)
    for depth in (MAX_JSON_DEPTH, 5_000):
        body = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(InvalidRequest) as caught:
            decode_json_value(body)
        assert caught.value.code == "json_too_deep"
        assert caught.value.http_status == 400


def test_decode_json_typed_refuses_deep_any_fields() -> None:
    """A typed decode whose struct has an ``Any`` field is depth-checked too."""

    class Event(msgspec.Struct):
        data: dict[str, object]

    body = b'{"data": {"x": ' + b"[" * 150 + b"]" * 150 + b"}}"
    with pytest.raises(InvalidRequest) as caught:
        decode_json(body, Event)
    assert caught.value.code == "json_too_deep" and caught.value.param == "data"
    assert decode_json(b'{"data": {"x": [[1]]}}', Event).data == {"x": [[1]]}
    with pytest.raises(InvalidRequest) as caught:  # past msgspec's own limit: no path to name
        decode_json(b'{"data": ' + b"[" * 5000 + b"]" * 5000 + b"}", Event)
    assert caught.value.code == "json_too_deep" and caught.value.param is None


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 10_000])
def test_ws_message_nested_too_deep_is_a_request_error(depth: int) -> None:
    """A WebSocket message nested too deeply fails that request (with its id), without closing the socket."""
    text = '{"type": "chat.completion.create", "request_id": "r1", "body": {"x": ' + (
        "[" * depth + "]" * depth + "}}"
    )
    with pytest.raises(ws.RequestFailed) as caught:
        ws.parse_client_message(text, max_bytes=1 << 20)
    assert caught.value.error.code == "json_too_deep"
    if depth < 1000:
        assert caught.value.request_id == "r1"


@pytest.mark.parametrize(
    "value", ["²", "9" * 5000, "\u0661"], ids=["superscript", "5000-digits", "arabic-digit"]
)
def test_sse_retry_field_ignores_non_ascii_digits(value: str) -> None:
    """An upstream ``retry:`` field of '²' or 5000 digits is ignored, not a ValueError."""
    parser = SSEParser()
    (event,) = parser.feed(f"retry: {value}\ndata: x\n\n".encode())
    assert event.data == "x" and event.retry is None
