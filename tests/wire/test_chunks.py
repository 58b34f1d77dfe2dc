"""Chunk encoding: exact OpenAI chunk JSON from typed events, and non-streaming aggregation."""

from __future__ import annotations

import json

from tokenwire.errors import UpstreamError
from tokenwire.streams.events import Finish, StreamError, TextDelta, ToolCallDelta, Usage
from tokenwire.wire.chunks import ChunkEncoder, CompletionBuilder, error_json


def encoder(include_usage: bool = False) -> ChunkEncoder:
    return ChunkEncoder(
        completion_id="chatcmpl-1", created=5, model="sim", include_usage=include_usage
    )


def test_first_text_chunk_carries_role_and_later_ones_do_not() -> None:
    """The first delta has role 'assistant'; text is JSON-escaped exactly."""
    enc = encoder()
    first = json.loads(enc.text('He said "hi"\n'))
    second = json.loads(enc.text(" ünï"))
    assert first == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "sim",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": 'He said "hi"\n'},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    assert second["choices"][0]["delta"] == {"content": " ünï"}


def test_include_usage_adds_null_usage_then_a_usage_chunk() -> None:
    """With include_usage every chunk has usage null and the last has choices [] and usage."""
    enc = encoder(include_usage=True)
    assert json.loads(enc.text("a"))["usage"] is None
    assert json.loads(enc.finish("stop"))["choices"][0]["finish_reason"] == "stop"
    usage = json.loads(enc.usage(Usage(3, 4)))
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert enc.encode(Usage(3, 4), include_usage=False) is None


def test_finish_without_any_delta_still_sends_role() -> None:
    """A completion with no content sends the role in its finish chunk."""
    delta = json.loads(encoder().finish("length"))["choices"][0]["delta"]
    assert delta == {"role": "assistant"}


def test_tool_call_chunks_follow_openai_streaming_shape() -> None:
    """The first fragment has id, type and name; later ones only arguments."""
    enc = encoder()
    first = json.loads(enc.tool_call(ToolCallDelta(index=0, id="call_1", name="f", arguments="")))
    later = json.loads(enc.tool_call(ToolCallDelta(index=0, arguments='{"a"')))
    assert first["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    ]
    assert later["choices"][0]["delta"] == {
        "tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]
    }


def test_error_json_carries_status() -> None:
    """In-band errors are OpenAI error bodies plus the HTTP status they stand for."""
    body = json.loads(error_json(UpstreamError("upstream died")))
    assert body == {
        "error": {
            "message": "upstream died",
            "type": "api_error",
            "param": None,
            "code": "upstream_error",
            "status": 502,
        }
    }


def test_completion_builder_aggregates_text_tools_and_usage() -> None:
    """A chat.completion object holds the joined text, tool calls, finish reason and usage."""
    builder = CompletionBuilder()
    for event in [
        TextDelta("Hel"),
        TextDelta("lo"),
        ToolCallDelta(index=0, id="c", name="f", arguments="{"),
        ToolCallDelta(index=0, arguments="}"),
        Finish("tool_calls"),
        Usage(2, 3),
    ]:
        builder.add(event)
    result = builder.build(completion_id="chatcmpl-1", created=5, model="sim")
    message = result["choices"][0]["message"]
    assert message["content"] == "Hello"
    assert message["tool_calls"] == [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]
    assert result["choices"][0]["finish_reason"] == "tool_calls"
    assert result["usage"]["total_tokens"] == 5
    builder.add(StreamError(UpstreamError("x")))
    assert builder.error is not None
