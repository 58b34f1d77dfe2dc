"""Anthropic Messages output: the SSE encoder, the message builder and the error shapes.

Frames are parsed back with the project's SSE parser and folded with the official
``anthropic`` SDK's own accumulator, so the shapes are the ones Anthropic's clients read.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from hypothesis import given
from hypothesis import strategies as st

from tokenwire.errors import (
    AuthenticationError,
    GatewayError,
    InsufficientQuota,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    UpstreamStatusError,
)
from tokenwire.streams.events import Event, Finish, StreamError, TextDelta, ToolCallDelta, Usage
from tokenwire.testing_fuzz import fuzz_settings
from tokenwire.wire import anthropic as wire
from tokenwire.wire.messages_stream import (
    MessageBuilder,
    MessagesEncoder,
    error_body,
)
from tokenwire.wire.sse import SSEEvent, SSEParser

TEXT: list[Event] = [TextDelta("Hello"), TextDelta(', "world"\n'), Finish("stop"), Usage(12, 2)]
TOOL: list[Event] = [
    TextDelta("Checking."),
    ToolCallDelta(0, id="call_1", name="get_weather", arguments=""),
    ToolCallDelta(0, arguments='{"city":'),
    ToolCallDelta(0, arguments='"Oslo"}'),
    ToolCallDelta(1, id="call_2", name="get_time", arguments="{}"),
    Finish("tool_calls"),
    Usage(30, 9),
]


def encode(events: list[Event], *, after: int = 0, start: bool = True) -> bytes:
    """The bytes an SSE client reads for ``events`` (numbered from 1), resumed after ``after``."""
    encoder = MessagesEncoder(message_id="msg_x", model="sim", prompt_tokens=lambda: 7, after=after)
    out: list[bytes] = []
    if start:
        encoder.start(out)
    for number, event in enumerate(events, 1):
        encoder.event(event, number, out)
    encoder.end(out)
    return b"".join(out)


def parse(data: bytes) -> list[SSEEvent]:
    """Every SSE event in ``data``; each one's ``event:`` equals its JSON ``type``."""
    events = SSEParser().feed(data)
    for event in events:
        assert json.loads(event.data)["type"] == event.event
    return events


def fold(data: bytes) -> Any:
    """The message the ``anthropic`` SDK builds from the stream."""
    snapshot = None
    buffers: dict[int, bytes] = {}
    for event in parse(data):
        payload = json.loads(event.data)
        if payload["type"] in ("ping", "error"):
            continue
        raw: RawMessageStreamEvent = payload  # type: ignore[assignment]
        snapshot = accumulate_event(event=raw, current_snapshot=snapshot, json_bufs=buffers)
    return snapshot


def test_a_text_stream_has_anthropics_event_sequence() -> None:
    """message_start, a text block, its deltas, message_delta with usage, message_stop."""
    events = parse(encode(TEXT))
    assert [e.event for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = json.loads(events[0].data)["message"]
    assert start == {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "sim",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": wire.usage(7, 0),
    }
    delta = json.loads(events[5].data)
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["input_tokens"] == 12 and delta["usage"]["output_tokens"] == 2
    message = fold(encode(TEXT))
    assert message.content[0].text == 'Hello, "world"\n'
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 2)


def test_the_text_template_is_the_documented_frame() -> None:
    """The hot-path text frame equals the builder's frame, byte for byte, at any index."""
    out: list[bytes] = []
    encoder = MessagesEncoder(message_id="msg_x", model="sim")
    for number, event in enumerate(TOOL[:5], 1):
        encoder.event(event, number, out)
    encoder.event(TextDelta("é\u2028\"'"), 9, out)
    assert out[-1] == b"id: 9\n" + wire.frame(wire.text_delta(3, "é\u2028\"'"))


def test_tool_calls_become_tool_use_blocks() -> None:
    """A text block, then one tool_use block per call with its input streamed as JSON."""
    message = fold(encode(TOOL))
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[1].id == "call_1" and message.content[1].name == "get_weather"
    assert message.content[1].input == {"city": "Oslo"}
    assert message.content[2].input == {}
    assert message.stop_reason == "tool_use"
    starts = [
        json.loads(e.data) for e in parse(encode(TOOL)) if e.event.startswith("content_block_st")
    ]
    assert [(s["type"], s["index"]) for s in starts] == [
        ("content_block_start", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_stop", 2),
    ]


def test_every_event_group_ends_with_its_number() -> None:
    """The last frame of each event's frames carries the event's number as its id."""
    events = parse(encode(TOOL))
    ids = [int(e.id) for e in events if e.id is not None]
    assert ids == sorted(ids) and ids[-1] == len(TOOL)
    assert events[-1].event == "message_stop" and events[-1].id == str(len(TOOL))


@pytest.mark.parametrize("events", [TEXT, TOOL], ids=["text", "tool"])
def test_a_resume_continues_exactly_where_the_client_stopped(events: list[Event]) -> None:
    """For every cursor: the frames up to it, then a resumed encoder's, are the whole stream."""
    whole = encode(events)
    for after in range(len(events) + 1):
        before = encode(events[:after]) if after else b""  # nothing was read yet
        assert before + encode(events, after=after) == whole, after


def test_an_error_mid_stream_is_an_error_event_without_id() -> None:
    """A StreamError ends the stream with Anthropic's error event; no message_stop."""
    error = UpstreamStatusError("Overloaded", status=529, error_type="overloaded_error")
    events = parse(encode([TextDelta("Hi"), StreamError(error)]))
    assert events[-1].event == "error"
    assert json.loads(events[-1].data) == wire.error("overloaded_error", "Overloaded")
    assert b"id: 2" not in encode([TextDelta("Hi"), StreamError(error)])
    assert "message_stop" not in [e.event for e in events]


def test_a_cancelled_answer_is_an_error_event() -> None:
    """Anthropic has no stop reason for a cut answer: an api_error event, no message_stop."""
    events = parse(encode([TextDelta("Hi"), Finish("cancelled"), Usage(3, 1)]))
    assert [e.event for e in events][-2:] == ["content_block_stop", "error"]
    assert json.loads(events[-1].data)["error"]["type"] == "api_error"


def test_ping_is_anthropics_ping_event() -> None:
    """The heartbeat is ``event: ping`` with its JSON."""
    out: list[bytes] = []
    MessagesEncoder(message_id="msg_x", model="sim").ping(out)
    assert out == [b'event: ping\ndata: {"type":"ping"}\n\n']


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [
        (InvalidRequest("Bad.", param="max_tokens"), 400, "invalid_request_error"),
        (AuthenticationError("No key."), 401, "authentication_error"),
        (InsufficientQuota("Top up."), 402, "billing_error"),
        (ModelNotFound("No such model.", param="model"), 404, "not_found_error"),
        (RateLimited("Slow down.", retry_after_s=2), 429, "rate_limit_error"),
        (GatewayError("Down.", status=503), 503, "api_error"),
        (
            UpstreamStatusError("Busy.", status=529, error_type="overloaded_error"),
            529,
            "overloaded_error",
        ),
        (UpstreamStatusError("Busy.", status=503, error_type="server_error"), 503, "api_error"),
        (UpstreamStatusError("Slow.", status=504), 504, "timeout_error"),
    ],
)
def test_errors_have_anthropics_types(error: GatewayError, status: int, error_type: str) -> None:
    """Each gateway error keeps its status and gets the Anthropic type for it."""
    body = error_body(error)
    assert error.http_status == status
    assert body["type"] == "error" and body["error"]["type"] == error_type
    if error.param:
        assert body["error"]["message"].startswith(f"{error.param}: ")


def test_the_builder_makes_one_message() -> None:
    """The non-streamed message: text block, tool_use blocks, stop reason and usage."""
    builder = MessageBuilder()
    for event in TOOL:
        builder.add(event)
    message = builder.build(message_id="msg_y", model="sim")
    assert message["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}},
        {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
    ]
    assert message["stop_reason"] == "tool_use" and message["usage"]["output_tokens"] == 9
    assert builder.error is None
    assert fold(encode(TOOL)).to_dict()["content"] == message["content"]


_EVENTS = st.lists(
    st.one_of(
        st.builds(TextDelta, st.text(max_size=5)),
        st.builds(
            ToolCallDelta,
            st.integers(0, 2),
            st.one_of(st.none(), st.just("c")),
            st.one_of(st.none(), st.just("f")),
            st.sampled_from(["", "{", '"a":1', "}"]),
        ),
    ),
    max_size=12,
).map(lambda body: [*body, Finish("stop"), Usage(1, len(body))])


@fuzz_settings(200)
@given(_EVENTS)
def test_any_event_sequence_is_a_well_formed_stream(events: list[Event]) -> None:
    """Blocks open and close in order, deltas name an opened block, the stream ends once."""
    started: list[int] = []
    stopped: list[int] = []
    parsed = parse(encode(events))
    for event in parsed:
        payload = json.loads(event.data)
        if payload["type"] == "content_block_start":
            assert payload["index"] == len(started) and len(stopped) == len(started)
            started.append(payload["index"])
        elif payload["type"] == "content_block_stop":
            stopped.append(payload["index"])
        elif payload["type"] == "content_block_delta":
            assert payload["index"] in started
    assert stopped == started
    assert [e.event for e in parsed][-2:] == ["message_delta", "message_stop"]
