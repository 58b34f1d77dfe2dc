"""Hypothesis over the sans-I/O parsers: the WebSocket client-message parser and the SSE parser.

CI budget (derandomized): 400 arbitrary texts + 400 arbitrary JSON values + 300 envelope-shaped
messages for ``parse_client_message``; 300 byte streams x arbitrary split points for
``SSEParser``. ``TOKENWIRE_FUZZ_SCALE`` multiplies them.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from tokenwire.errors import InvalidRequest
from tokenwire.testing_fuzz import fuzz_settings, json_values, shaped_like
from tokenwire.wire import ws
from tokenwire.wire.sse import SSEEvent, SSEParser

MAX_BYTES = 4096
DOCUMENTED_CLOSE_CODES = {ws.CLOSE_INVALID_PAYLOAD, ws.CLOSE_TOO_BIG}


def parse_outcome(text: str) -> object:
    """Parse one message; return the message or the documented exception, raise anything else."""
    try:
        return ws.parse_client_message(text, max_bytes=MAX_BYTES)
    except ws.ProtocolViolation as exc:
        assert exc.code in DOCUMENTED_CLOSE_CODES, exc.code
        assert len(exc.reason.encode()) <= 123
        return exc
    except ws.RequestFailed as exc:
        assert exc.error.http_status == 400 and exc.error.message
        request_id = exc.request_id
        assert request_id is None or (isinstance(request_id, str) and 0 < len(request_id) <= 128)
        return exc
    except InvalidRequest as exc:
        assert exc.param == "type" and exc.code == "unknown_message_type"
        return exc


MESSAGE_TYPES = st.sampled_from(
    [
        "chat.completion.create",
        "chat.completion.cancel",
        "chat.completion.resume",
        "ping",
        "auth",
    ]
)
ENVELOPES = shaped_like(
    {
        "type": MESSAGE_TYPES,
        "request_id": st.text(max_size=130),
        "body": st.dictionaries(st.text(max_size=8), json_values(6), max_size=3),
        "stream_id": st.text(max_size=20),
        "starting_after": st.integers(),
        "api_key": st.text(max_size=10),
        "idempotency_key": st.text(max_size=300),
        "resumable": st.booleans(),
    }
)


@fuzz_settings(400)
@given(st.text(max_size=200))
def test_any_text_parses_or_fails_as_documented(text: str) -> None:
    """Arbitrary text is a message, a documented close (1007/1009), a request error or an unknown-type error."""
    parse_outcome(text)


@fuzz_settings(400)
@given(json_values())
def test_any_json_parses_or_fails_as_documented(value: Any) -> None:
    """Any JSON value: non-objects close with 1007, objects parse or fail per message."""
    outcome = parse_outcome(msgspec.json.encode(value).decode())
    if not isinstance(value, dict):
        assert isinstance(outcome, ws.ProtocolViolation) and outcome.code == 1007


@fuzz_settings(300)
@given(ENVELOPES)
def test_envelope_shaped_messages_parse_or_fail_per_request(message: dict[str, Any]) -> None:
    """Messages shaped like envelopes are parsed or refused for that request alone (never a close)."""
    outcome = parse_outcome(msgspec.json.encode(message).decode())
    if len(msgspec.json.encode(message)) <= MAX_BYTES:
        assert not isinstance(outcome, ws.ProtocolViolation)
    if isinstance(outcome, ws.CreateMessage | ws.CancelMessage | ws.ResumeMessage):
        assert 0 < len(outcome.request_id or "x") <= 128


SSE_PIECES = st.lists(
    st.sampled_from(
        [
            b"data: ",
            b"data:",
            b"event: x",
            b"id: 7",
            b"id: \x00",
            b"retry: 15",
            b"retry: \xc2\xb2",
            b": ping",
            b"\n",
            b"\r",
            b"\r\n",
            b"\xef\xbb\xbf",
            b'{"a": 1}',
            b"\xff\xfe",
            "é€😀".encode(),
        ]
    )
    | st.binary(max_size=12),
    max_size=30,
).map(b"".join)
SSE_STREAMS = st.tuples(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xef\xbb"]), SSE_PIECES).map(
    b"".join
)


def feed_all(chunks: list[bytes]) -> tuple[list[SSEEvent], str | None]:
    parser = SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events, parser.last_event_id


@fuzz_settings(300)
@given(SSE_STREAMS, st.data())
def test_sse_split_anywhere_gives_the_same_events(stream: bytes, data: st.DataObject) -> None:
    """Any bytes, cut at any points, give the same events (and last id) as fed whole, and never raise."""
    whole = feed_all([stream])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert feed_all(pieces) == whole
    assert feed_all([bytes([b]) for b in stream]) == whole


WHOLE_DATA_EVENT = st.text(max_size=20).map(
    lambda text: b"data: " + text.replace("\r", "").replace("\n", "").encode() + b"\n\n"
)
SSE_LINES = st.sampled_from(
    [b"event: x\n", b"id: 7\n", b"retry: 15\n", b": ping\n", b"data: a\n", b"\n", b"data: \r\n"]
)


@fuzz_settings(300)
@given(st.lists(st.one_of(WHOLE_DATA_EVENT, WHOLE_DATA_EVENT, SSE_LINES), max_size=12), st.data())
def test_sse_chunks_of_whole_events_give_the_same_events_as_bytes(
    pieces: list[bytes], data: st.DataObject
) -> None:
    """Chunks that are whole ``data:`` events, as an upstream sends them (the parser's quick
    path), between ``event:``/``id:``/``retry:`` lines, comments and partial events (the line
    parser), give the same events and last id as the same stream fed one byte at a time."""
    stream = [b"data: first\n\n", *pieces]  # the first chunk goes through the line parser
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream)), max_size=len(stream)))))
    chunks = [b"".join(stream[a:b]) for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole = b"".join(stream)
    assert feed_all([c for c in chunks if c]) == feed_all([bytes([b]) for b in whole])


def test_sse_bom_split_across_chunks_is_still_skipped() -> None:
    """A UTF-8 BOM cut after its first or second byte is skipped as when it arrives whole (found by the fuzzer)."""
    stream = b"\xef\xbb\xbfdata: x\n\n"
    expected = feed_all([stream])
    assert expected[0] == [SSEEvent(data="x")]
    for cut in (1, 2):
        assert feed_all([stream[:cut], stream[cut:]]) == expected
    assert feed_all([b"", stream]) == expected
