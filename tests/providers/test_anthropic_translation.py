"""Anthropic translation without a network: OpenAI requests into Anthropic bodies, compared with
golden files in ``golden/anthropic/`` (regenerate with ``TOKENWIRE_UPDATE_GOLDEN=1``, then
review the diff) and accepted by the fake's validator; parameters and messages Anthropic cannot
take refused with a 400 naming them; and recorded byte streams (``*.sse`` there) fed through
the SSE parser and the stream translator into events, stop reasons and errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tests.providers.anthropic_common import REQUESTS, WEATHER_TOOL, make_call

from tokenwire.errors import (
    InvalidRequest,
    UnsupportedParameter,
    UpstreamAuthError,
    UpstreamStatusError,
)
from tokenwire.providers.anthropic import StreamTranslator, stream_error, to_anthropic
from tokenwire.providers.http import credentials_refused
from tokenwire.streams.events import Event, Finish, PromptUsage, TextDelta, ToolCallDelta, Usage
from tokenwire.testing_upstreams.anthropic_fake import validate
from tokenwire.wire.sse import SSEParser

GOLDEN = Path(__file__).parent / "golden" / "anthropic"
UPDATE = os.environ.get("TOKENWIRE_UPDATE_GOLDEN") == "1"


# -- request translation: golden files ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_request_translation_matches_golden(name: str) -> None:
    """Each OpenAI request becomes exactly the stored Anthropic body, which the fake accepts."""
    body = to_anthropic(make_call(REQUESTS[name]))
    path = GOLDEN / f"{name}.json"
    if UPDATE:
        path.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    assert body == json.loads(path.read_text())
    assert validate(body) is None


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ],
)
def test_tool_choice_mapping(choice: Any, expected: dict[str, Any]) -> None:
    """OpenAI tool_choice values map to Anthropic's auto / any / none / tool."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": choice,
    }
    assert to_anthropic(make_call(body))["tool_choice"] == expected


def test_defaults_max_tokens_and_forces_streaming() -> None:
    """Without a limit max_tokens is the provider default; stream is always true."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": False}
    translated = to_anthropic(make_call(body), default_max_tokens=123)
    assert translated["max_tokens"] == 123 and translated["stream"] is True
    assert translated["model"] == "claude-sonnet-4-5"


@pytest.mark.parametrize(
    ("extra", "error", "param"),
    [
        ({"presence_penalty": 0.5}, UnsupportedParameter, "presence_penalty"),
        ({"frequency_penalty": -1}, UnsupportedParameter, "frequency_penalty"),
        ({"logprobs": True}, UnsupportedParameter, "logprobs"),
        ({"top_logprobs": 2}, UnsupportedParameter, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, UnsupportedParameter, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, UnsupportedParameter, "response_format"),
        (
            {"tools": [{"type": "custom", "custom": {"name": "x"}}]},
            UnsupportedParameter,
            "tools[0].type",
        ),
        (
            {"tools": [{"type": "function", "function": {}}]},
            InvalidRequest,
            "tools[0].function.name",
        ),
        ({"tool_choice": "required"}, InvalidRequest, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, InvalidRequest, "tool_choice"),
    ],
)
def test_refused_parameters_name_the_param(
    extra: dict[str, Any], error: type[Exception], param: str
) -> None:
    """What Anthropic cannot honour is a 400 naming the parameter."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(error) as info:
        to_anthropic(make_call(body))
    assert isinstance(info.value, InvalidRequest)
    assert info.value.http_status == 400 and info.value.param == param


@pytest.mark.parametrize(
    ("message", "param"),
    [
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                ],
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
                ],
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {
                "role": "user",
                "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}],
            },
            "messages[1].content[0]",
        ),
        (
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}
                ],
            },
            "messages[1].content[0].image_url.url",
        ),
        (
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}],
            },
            "messages[1].content[0].image_url.url",
        ),
        (
            {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]},
            "messages[1].content[0]",
        ),
    ],
)
def test_untranslatable_messages_name_the_param(message: dict[str, Any], param: str) -> None:
    """Bad tool-call JSON, audio, unsupported images and files are a 400 with the message path."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}, message]}
    with pytest.raises(InvalidRequest) as info:
        to_anthropic(make_call(body))
    assert info.value.http_status == 400 and info.value.param == param


def test_only_system_messages_is_a_400() -> None:
    """A conversation with nothing but system text cannot be sent to Anthropic."""
    body = {
        "model": "m",
        "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": ""}],
    }
    with pytest.raises(InvalidRequest) as info:
        to_anthropic(make_call(body))
    assert info.value.param == "messages"


def test_deeply_nested_tool_arguments_are_a_400_not_a_crash() -> None:
    """Tool-call arguments nested 5,000 deep are refused with a 400 naming the field."""
    deep = "[" * 5000 + "]" * 5000
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}],
    }
    with pytest.raises(InvalidRequest) as info:
        to_anthropic(make_call(body))
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"


# -- stream translation: recorded byte streams ----------------------------------------------


def translate(raw: bytes, chunk_size: int | None = None) -> tuple[list[Event], StreamTranslator]:
    """Feed a recorded stream through the SSE parser and the translator, in chunks."""
    parser, translator = SSEParser(), StreamTranslator("anthropic")
    events: list[Event] = []
    size = chunk_size or len(raw)
    for start in range(0, len(raw), size):
        for sse in parser.feed(raw[start : start + size]):
            events.extend(translator.feed(sse.data))
    return events, translator


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_text_stream_translation(chunk_size: int | None) -> None:
    """message_start (with cache usage), ping, text blocks and message_stop, however chunked."""
    events, translator = translate((GOLDEN / "text_stream.sse").read_bytes(), chunk_size)
    assert events == [
        # from message_start, before any text: 25 uncached, 100 written to the cache, 2000 read
        PromptUsage(25 + 100 + 2000, cache_write_tokens=100, cache_read_tokens=2000),
        TextDelta("Hi"),
        TextDelta("Hello"),
        TextDelta("!"),
        TextDelta(" Again."),
        Usage(
            prompt_tokens=25 + 100 + 2000,
            completion_tokens=15,
            cache_write_tokens=100,
            cache_read_tokens=2000,
        ),
        Finish("stop"),
    ]
    assert translator.done


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_tool_stream_translation(chunk_size: int | None) -> None:
    """tool_use blocks become indexed ToolCallDeltas; an argument-less call gets '{}'."""
    events, _ = translate((GOLDEN / "tool_stream.sse").read_bytes(), chunk_size)
    assert events[0] == PromptUsage(472)
    assert events[1:] == [
        TextDelta("Okay"),
        TextDelta(", let me check."),
        ToolCallDelta(
            index=0, id="toolu_01T1x1fJ34qAmk2tNTrN7Up6", name="get_weather", arguments=""
        ),
        ToolCallDelta(index=0, arguments='{"city": '),
        ToolCallDelta(index=0, arguments='"San Francisco, CA"}'),
        ToolCallDelta(index=1, id="toolu_02", name="now", arguments=""),
        ToolCallDelta(index=1, arguments="{}"),
        Usage(prompt_tokens=472, completion_tokens=89),
        Finish("tool_calls"),
    ]


def test_thinking_and_unknown_events_are_ignored() -> None:
    """Thinking blocks, signature deltas and unknown event types produce nothing."""
    events, _ = translate((GOLDEN / "thinking_stream.sse").read_bytes())
    assert events == [
        PromptUsage(12),
        TextDelta("27 * 453 = 12,231"),
        Usage(12, 40),
        Finish("stop"),
    ]


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
    ],
)
def test_stop_reasons(stop_reason: str, finish: str) -> None:
    """Every Anthropic stop_reason maps to an OpenAI finish reason."""
    translator = StreamTranslator("anthropic")
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason},
        "usage": {"output_tokens": 3},
    }
    translator.feed(json.dumps(delta))
    assert translator.feed('{"type": "message_stop"}') == [Usage(0, 3), Finish(finish)]  # type: ignore[arg-type]


def test_error_event_keeps_anthropic_status() -> None:
    """An overloaded_error event is a retryable 529 UpstreamStatusError of Anthropic's type."""
    events, translator = [], StreamTranslator("anthropic")
    with pytest.raises(UpstreamStatusError) as info:
        for sse in SSEParser().feed((GOLDEN / "error_stream.sse").read_bytes()):
            events.extend(translator.feed(sse.data))
    assert [e for e in events if not isinstance(e, PromptUsage)] == [TextDelta("Par")]
    error = info.value
    assert error.http_status == 529 and error.is_retryable
    assert error.to_body()["error"]["type"] == "overloaded_error" and "Overloaded" in error.message


def test_malformed_event_raises_decode_error() -> None:
    """Data that is not an Anthropic event is reported, not skipped."""
    with pytest.raises(msgspec.DecodeError):
        StreamTranslator("anthropic").feed("{not json")
    with pytest.raises(msgspec.DecodeError):
        StreamTranslator("anthropic").feed('{"no_type": 1}')


def test_authentication_error_event_is_an_upstream_auth_error() -> None:
    """An in-stream ``authentication_error`` event also becomes UpstreamAuthError (502)."""
    error = credentials_refused(
        "anthropic", stream_error("anthropic", "authentication_error", "invalid x-api-key")
    )
    assert isinstance(error, UpstreamAuthError) and error.http_status == 502
    assert error.upstream_status == 401
