"""The Responses encoder without I/O: OpenAI's event sequence, numbering, framing, resume."""

from __future__ import annotations

import json
from typing import Any

from tokenwire.errors import RateLimited, UpstreamError
from tokenwire.streams.events import Event, Finish, StreamError, TextDelta, ToolCallDelta, Usage
from tokenwire.wire.frames import FrameLoop
from tokenwire.wire.responses_frames import ResponseHead, ResponsesEncoder
from tokenwire.wire.sse import SSEParser

HEAD = ResponseHead("resp_abc", 7, "sim", {"instructions": None, "metadata": {}})
TEXT: list[Event] = [TextDelta("Hel"), TextDelta("lo"), Finish("stop"), Usage(5, 2)]


def run(events: list[Event], framing: Any = "ws", **kw: Any) -> tuple[list[dict[str, Any]], Any]:
    encoder = ResponsesEncoder(HEAD, framing, **kw)
    loop = FrameLoop(encoder)
    frames = loop.frames(events) + loop.end()
    if framing == "sse":
        parsed = SSEParser().feed(b"".join(frames))
        assert all(e.event == json.loads(e.data)["type"] for e in parsed)
        assert all(e.id == str(json.loads(e.data)["sequence_number"]) for e in parsed)
        return [json.loads(e.data) for e in parsed], encoder
    return [json.loads(f) for f in frames], encoder


def test_text_answer_is_the_documented_sequence() -> None:
    """created, in_progress, item and part added, deltas, text/part/item done, completed."""
    events, encoder = run(TEXT)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(10))
    assert events[4] == {
        "type": "response.output_text.delta",
        "item_id": "msg_abc_0",
        "output_index": 0,
        "content_index": 0,
        "delta": "Hel",
        "logprobs": [],
        "sequence_number": 4,
    }
    assert events[2]["item"]["status"] == "in_progress" and events[2]["item"]["content"] == []
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["total_tokens"] == 7
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert encoder.response() == final
    assert encoder.chat_messages() == [{"role": "assistant", "content": "Hello"}]


def test_sse_frames_are_named_and_numbered_like_the_ws_ones() -> None:
    """The SSE encoding carries the same JSON, with event: and id: lines."""
    assert run(TEXT, "sse")[0] == run(TEXT, "ws")[0]


def test_text_then_tool_calls_become_three_items() -> None:
    """The message closes before the first call; each call index is an item of its own."""
    events, encoder = run(
        [
            TextDelta("Let me check."),
            ToolCallDelta(0, id="call_1", name="lookup", arguments='{"q":'),
            ToolCallDelta(0, arguments='"a"}'),
            ToolCallDelta(1, id="call_2", name="clock", arguments="{}"),
            Finish("tool_calls"),
            Usage(3, 9),
        ]
    )
    kinds = [e["type"] for e in events]
    assert kinds.count("response.output_item.added") == 3
    assert kinds.count("response.output_item.done") == 3
    args = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [a["arguments"] for a in args] == ['{"q":"a"}', "{}"]
    output = events[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["message", "function_call", "function_call"]
    assert output[1]["call_id"] == "call_1" and output[1]["name"] == "lookup"
    assert encoder.chat_messages()[0]["tool_calls"][1]["function"]["name"] == "clock"


def test_length_and_cancel_are_incomplete() -> None:
    """length: incomplete with max_output_tokens; a cancel: status cancelled."""
    length, _ = run([TextDelta("a"), Finish("length"), Usage(1, 1)])
    assert length[-1]["type"] == "response.incomplete"
    assert length[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert length[-1]["response"]["output"][0]["status"] == "incomplete"
    cancelled, _ = run([TextDelta("a"), Finish("cancelled"), Usage(1, 1)])
    assert cancelled[-1]["response"]["status"] == "cancelled"


def test_failure_after_the_start_is_response_failed() -> None:
    """An error after the first event: the open item closes, then response.failed."""
    events, encoder = run([TextDelta("par"), StreamError(UpstreamError("down"))])
    assert events[-1]["type"] == "response.failed"
    error = events[-1]["response"]["error"]
    assert (error["code"], error["status"]) == ("upstream_error", 502)
    assert encoder.error is not None


def test_failure_before_the_start_is_one_error_event_over_websocket() -> None:
    """The request failed before it began: no response.created, one error with its status."""
    events, _ = run([StreamError(RateLimited("slow down", retry_after_s=3))], stream_id="lane")
    assert events == [
        {
            "type": "error",
            "status": 429,
            "error": {
                "message": "slow down",
                "type": "rate_limit_error",
                "param": None,
                "code": "rate_limit_exceeded",
                "headers": {"Retry-After": "3"},
            },
            "stream_id": "lane",
        }
    ]


def test_resume_skips_what_the_client_had_and_keeps_the_numbers() -> None:
    """starting_after=N: the same events after N, numbered as the first time."""
    whole, _ = run(TEXT)
    assert run(TEXT, starting_after=4)[0] == whole[5:]
    assert run(TEXT, starting_after=-1)[0] == whole


def test_lane_events_carry_the_stream_id() -> None:
    """Every event of a lane's response carries its stream_id."""
    events, _ = run(TEXT, stream_id="a")
    assert {e["stream_id"] for e in events} == {"a"}


def test_without_framing_it_only_builds_the_response() -> None:
    """framing=None (stream false, the stored copy): no frames, the same final response."""
    frames, encoder = run(TEXT, None)
    assert frames == []
    assert encoder.response() == run(TEXT)[0][-1]["response"]
