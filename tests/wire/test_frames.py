"""The one events→frames loop: numbering, merging, start/ping/end calls, and Chat framing."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from tokenwire.errors import GatewayError, UpstreamError
from tokenwire.streams.events import Event, Finish, StreamError, TextDelta, ToolCallDelta, Usage
from tokenwire.wire.chat_frames import ChatCompatFrames, ChatEnvelopeFrames, ChatSSEFrames
from tokenwire.wire.frames import FrameLoop, merge_text


class Recorder:
    """A FrameEncoder that writes down every call it gets."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self, out: list[bytes]) -> None:
        self.calls.append("start")
        out.append(b"S")

    def event(self, event: Event, number: int, out: list[bytes]) -> None:
        self.calls.append(f"{type(event).__name__}:{number}")
        out.append(b"E%d" % number)

    def ping(self, out: list[bytes]) -> None:
        self.calls.append("ping")
        out.append(b"P")

    def end(self, out: list[bytes]) -> None:
        self.calls.append("end")
        out.append(b"D")


def source(**extra: Any) -> Any:
    fields = {
        "id": "chatcmpl-1",
        "created": 5,
        "model": "sim",
        "include_usage": True,
        "finish_reason": None,
        "usage": None,
        "error": None,
    }
    return SimpleNamespace(**{**fields, **extra})


def test_loop_starts_once_numbers_events_and_ends() -> None:
    """start before the first event, events numbered from after+1 across batches, then end."""
    encoder = Recorder()
    loop = FrameLoop(encoder, after=4)
    assert loop.frames([TextDelta("a"), TextDelta("b")]) == [b"S", b"E5", b"E6"]
    assert loop.frames([Finish("stop"), Usage(1, 2)]) == [b"E7", b"E8"]
    assert loop.end() == [b"D"]
    assert encoder.calls == ["start", "TextDelta:5", "TextDelta:6", "Finish:7", "Usage:8", "end"]
    assert loop.number == 8


def test_loop_does_not_start_a_stream_whose_first_event_is_an_error() -> None:
    """A log that begins with a StreamError: no start frames, the error, then end."""
    encoder = Recorder()
    loop = FrameLoop(encoder)
    loop.frames([StreamError(UpstreamError("down"))])
    loop.end()
    assert encoder.calls == ["StreamError:1", "end"]


def test_loop_pings_on_an_idle_heartbeat_after_starting() -> None:
    """A None batch (the heartbeat passed) starts the stream and pings."""
    encoder = Recorder()
    loop = FrameLoop(encoder)
    assert loop.frames(None) == [b"S", b"P"]
    assert loop.frames(None) == [b"P"]


def test_loop_with_nothing_read_still_starts_and_ends() -> None:
    """A resume after the last event reads nothing: start and end frames only."""
    encoder = Recorder()
    assert FrameLoop(encoder, after=9).end() == [b"S", b"D"]


def test_loop_merges_text_when_asked() -> None:
    """merge=True: consecutive deltas become one event numbered like its last delta."""
    encoder = Recorder()
    loop = FrameLoop(encoder, merge=True)
    loop.frames([TextDelta("a"), TextDelta("b"), Finish("stop")])
    assert encoder.calls == ["start", "TextDelta:2", "Finish:3"]


def test_chat_sse_frames_are_numbered_chunks_then_done() -> None:
    """Chat over SSE: id-numbered chunks, the in-band error without an id, [DONE] last."""
    loop = FrameLoop(ChatSSEFrames(source()))
    body = b"".join(loop.frames([TextDelta("hi"), StreamError(UpstreamError("x"))]))
    body += b"".join(loop.end())
    events = body.split(b"\n\n")
    assert events[0].startswith(b"id: 1\ndata: {")
    assert json.loads(events[0].split(b"data: ")[1])["choices"][0]["delta"]["content"] == "hi"
    assert events[1].startswith(b'data: {"error":')
    assert events[2] == b"data: [DONE]"


def test_chat_compat_frames_are_the_bare_chunks() -> None:
    """Compatible mode: the chunk JSON itself, the usage chunk included when asked."""
    loop = FrameLoop(ChatCompatFrames(source()), merge=True)
    frames = loop.frames([TextDelta("a"), TextDelta("b"), Finish("stop"), Usage(2, 2)])
    assert [json.loads(f)["object"] for f in frames] == ["chat.completion.chunk"] * 3
    assert json.loads(frames[0])["choices"][0]["delta"]["content"] == "ab"
    assert loop.end() == []


def test_chat_envelope_frames_end_with_done_unless_failed() -> None:
    """Envelope: chunks carry request_id and numbers; done after a finish, none after an error."""
    loop = FrameLoop(ChatEnvelopeFrames(source(), "r1"), merge=True)
    tool = ToolCallDelta(index=0, id="c", name="f", arguments="{}")
    frames = loop.frames([TextDelta("a"), tool, Finish("tool_calls"), Usage(3, 2)])
    assert [json.loads(f)["sequence_number"] for f in frames] == [1, 2, 3, 4]
    (done,) = loop.end()
    assert json.loads(done) == {
        "type": "chat.completion.done",
        "request_id": "r1",
        "stream_id": "chatcmpl-1",
        "sequence_number": 4,
        "finish_reason": "tool_calls",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    failed = source(error=GatewayError("boom"))
    loop = FrameLoop(ChatEnvelopeFrames(failed, "r2"))
    (error,) = loop.frames([StreamError(failed.error)])
    assert json.loads(error)["type"] == "error"
    assert loop.end() == []


def test_chat_envelope_resumed_after_the_end_reports_the_stream_s_finish() -> None:
    """A resume after the last event: done from the stream's own finish reason and usage."""
    ended = source(finish_reason="stop", usage=Usage(1, 1))
    (done,) = FrameLoop(ChatEnvelopeFrames(ended, "r", after=7), after=7).end()
    assert json.loads(done)["sequence_number"] == 7
    assert json.loads(done)["finish_reason"] == "stop"


# -- merge_text --------------------------------------------------------------------------------


def test_merge_text_merges_consecutive_deltas_with_the_last_number() -> None:
    """Consecutive text deltas become one, numbered like the last delta it contains."""
    batch: list[Event] = [TextDelta("a"), TextDelta("b"), TextDelta("c"), Finish("stop")]
    batch.append(Usage(1, 3))
    assert list(merge_text(batch, 0)) == [
        (TextDelta("abc"), 3),
        (Finish("stop"), 4),
        (Usage(1, 3), 5),
    ]


def test_merge_text_continues_from_start_seq() -> None:
    """Numbers continue after start_seq, so batches read one after another number correctly."""
    assert list(merge_text([TextDelta("x"), TextDelta("y")], 40)) == [(TextDelta("xy"), 42)]


def test_merge_text_keeps_non_text_events_apart() -> None:
    """A tool-call delta splits the text runs; every event keeps its own number."""
    tool = ToolCallDelta(index=0, id="c", name="f", arguments="{}")
    batch: list[Event] = [TextDelta("a"), tool, TextDelta("b"), TextDelta("c"), Finish("stop")]
    assert list(merge_text(batch, 10)) == [
        (TextDelta("a"), 11),
        (tool, 12),
        (TextDelta("bc"), 14),
        (Finish("stop"), 15),
    ]


def test_merge_text_passes_errors_through() -> None:
    """A StreamError after text keeps its number; the text before it is merged."""
    error = StreamError(GatewayError("upstream died"))
    assert list(merge_text([TextDelta("a"), TextDelta("b"), error], 0)) == [
        (TextDelta("ab"), 2),
        (error, 3),
    ]


def test_merge_text_single_and_empty_batches() -> None:
    """One delta stays as it is; an empty batch yields nothing."""
    assert list(merge_text([TextDelta("only")], 0)) == [(TextDelta("only"), 1)]
    assert list(merge_text([], 5)) == []


def test_merge_text_loses_and_repeats_nothing() -> None:
    """Over many batches, merged text equals the input and the last number is the event count."""
    events: list[Event] = [TextDelta(f"w{i} ") for i in range(100)]
    events += [Finish("length"), Usage(1, 100)]
    seq = 0
    out: list[tuple[Event, int]] = []
    for start in range(0, len(events), 7):
        batch = events[start : start + 7]
        out.extend(merge_text(batch, seq))
        seq += len(batch)
    text = "".join(e.text for e, _ in out if isinstance(e, TextDelta))
    assert text == "".join(f"w{i} " for i in range(100))
    numbers = [n for _, n in out]
    assert numbers == sorted(set(numbers))
    assert numbers[-1] == len(events)
    assert sum(isinstance(e, TextDelta) for e, _ in out) == 15  # ceil(100 / 7)
