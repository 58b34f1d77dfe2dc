"""The Anthropic provider: request and stream translation, faults, cancellation, end to end.

Request translations are compared with golden files in ``golden/anthropic/`` (regenerate with
``TOKENWIRE_UPDATE_GOLDEN=1``, then review the diff); recorded byte streams (``*.sse`` there)
are fed to the stream translator. Provider and gateway tests run against the loopback fake
in :mod:`tokenwire.testing_upstreams.anthropic_fake`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import openai
import pytest
import requests

from tokenwire.accounting.budget import estimate_prompt_tokens
from tokenwire.accounting.ledger import LedgerRow
from tokenwire.errors import (
    GatewayError,
    InvalidRequest,
    UnsupportedParameter,
    UpstreamAuthError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from tokenwire.providers.anthropic import (
    AnthropicProvider,
    StreamTranslator,
    stream_error,
    to_anthropic,
)
from tokenwire.providers.base import ProviderCall
from tokenwire.providers.http import credentials_refused
from tokenwire.streams.events import Event, Finish, PromptUsage, TextDelta, ToolCallDelta, Usage
from tokenwire.testing import GatewayServer, eventually
from tokenwire.testing_upstreams.anthropic_fake import AnthropicFake, plan_reply, validate
from tokenwire.wire.schema import decode_chat_request
from tokenwire.wire.sse import SSEParser

GOLDEN = Path(__file__).parent / "golden" / "anthropic"
UPDATE = os.environ.get("TOKENWIRE_UPDATE_GOLDEN") == "1"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


def make_call(body: dict[str, Any], upstream_model: str = "claude-sonnet-4-5") -> ProviderCall:
    request = decode_chat_request(json.dumps(body).encode())
    return ProviderCall(request, upstream_model, body)


# -- request translation: golden files ------------------------------------------------------

REQUESTS: dict[str, dict[str, Any]] = {
    "basic": {
        "model": "claude-sonnet-4.5",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello"},
        ],
    },
    "sampling_and_limits": {
        "model": "claude-sonnet-4.5",
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Rule one."}]},
            {"role": "system", "content": "Rule two."},
            {"role": "user", "content": "Count", "name": "ann"},
        ],
        "max_tokens": 50,
        "max_completion_tokens": 64,
        "temperature": 1.7,
        "top_p": 0.9,
        "stop": ["\n\n", "END"],
        "user": "user-1234",
        "seed": 7,
        "presence_penalty": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    "multimodal": {
        "model": "claude-sonnet-4.5",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare these."},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"},
                    },
                    {
                        "type": "file",
                        "file": {
                            "filename": "a.pdf",
                            "file_data": "data:application/pdf;base64,JVBERi0x",
                        },
                    },
                ],
            }
        ],
        "stop": "STOP",
    },
    "tool_conversation": {
        "model": "claude-sonnet-4.5",
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city": "Rome", "days": 2}',
                        },
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "21C"}],
            },
            {"role": "user", "content": "And tomorrow?"},
        ],
        "tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "now"}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    },
    "merged_turns": {
        "model": "claude-sonnet-4.5",
        "messages": [
            {"role": "user", "content": "First."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Second."}, {"type": "text", "text": ""}],
            },
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": [{"type": "text", "text": "Reply."}]},
            {"role": "system", "content": "Late system note."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "now", "arguments": ""}}
                ],
            },
            {"role": "tool", "tool_call_id": "c", "content": ""},
        ],
        "tools": [
            {"type": "function", "function": {"name": "now", "parameters": {"properties": {}}}}
        ],
        "tool_choice": "none",
    },
}


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


# -- the provider against the fake -----------------------------------------------------------

USER = {
    "model": "claude-sonnet-4.5",
    "messages": [{"role": "user", "content": "hello there world"}],
}


@pytest.fixture
async def fake() -> AsyncIterator[AnthropicFake]:
    async with AnthropicFake(api_key="sk-ant-secret") as server:
        yield server


@pytest.fixture
async def provider(fake: AnthropicFake) -> AsyncIterator[Callable[..., AnthropicProvider]]:
    made: list[AnthropicProvider] = []

    def make(**options: Any) -> AnthropicProvider:
        settings: dict[str, Any] = {
            "base_url": fake.base_url,
            "api_key": "sk-ant-secret",
            "first_token_timeout_s": 5.0,
            "idle_timeout_s": 5.0,
        }
        made.append(AnthropicProvider("anthropic", **{**settings, **options}))
        return made[-1]

    yield make
    for item in made:
        await item.aclose()


async def collect(
    provider: AnthropicProvider, body: dict[str, Any]
) -> tuple[list[Event], GatewayError | None]:
    """The stream's events but PromptUsage (checked on its own), and the error that ended it."""
    events: list[Event] = []
    try:
        async for event in provider.stream(make_call(body)):
            if not isinstance(event, PromptUsage):
                events.append(event)
    except GatewayError as exc:
        return events, exc
    return events, None


def with_text(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4.5", "messages": [{"role": "user", "content": text}], **extra}


async def test_streams_text_and_sends_the_headers(
    fake: AnthropicFake, provider: Callable[..., AnthropicProvider]
) -> None:
    """Text arrives as TextDeltas, then the fake's usage and finish; key and version are sent."""
    events, error = await collect(provider(), USER)
    assert error is None
    received = fake.requests[-1]
    plan = plan_reply(received.body)
    assert events == [
        *(TextDelta(t) for t in plan.tokens),
        Usage(plan.input_tokens, len(plan.tokens)),
        Finish("stop"),
    ]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Echo: hello there world"
    assert received.headers["x-api-key"] == "sk-ant-secret"
    assert received.headers["anthropic-version"] == "2023-06-01"
    assert received.body == to_anthropic(make_call(USER))


async def test_base_url_with_v1_suffix(
    fake: AnthropicFake, provider: Callable[..., AnthropicProvider]
) -> None:
    """A base URL ending in /v1 is not doubled."""
    events, error = await collect(provider(base_url=fake.base_url + "/v1/"), USER)
    assert error is None and isinstance(events[-1], Finish)


@pytest.mark.parametrize(
    ("extra", "text", "finish"),
    [
        ({"max_tokens": 2}, "Echo: one", "length"),
        ({"stop": ["three"]}, "Echo: one two ", "stop"),
    ],
)
async def test_limits_and_stop_sequences(
    provider: Callable[..., AnthropicProvider], extra: dict[str, Any], text: str, finish: str
) -> None:
    """max_tokens ends with length, a stop sequence with stop, the text cut accordingly."""
    events, error = await collect(provider(), with_text("one two three four", **extra))
    assert error is None
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == text
    assert events[-1] == Finish(finish)  # type: ignore[arg-type]


async def test_streams_a_forced_tool_call(
    fake: AnthropicFake, provider: Callable[..., AnthropicProvider]
) -> None:
    """tool_choice required streams one tool call whose argument fragments join into JSON."""
    body = with_text("Paris", tools=[WEATHER_TOOL], tool_choice="required")
    events, error = await collect(provider(), body)
    assert error is None
    plan = plan_reply(fake.requests[-1].body)
    assert plan.tool_use is not None
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert calls[0] == ToolCallDelta(index=0, id=plan.tool_use.id, name="get_weather", arguments="")
    assert len(calls) > 2 and all(c.index == 0 and c.id is None for c in calls[1:])
    assert json.loads("".join(c.arguments for c in calls)) == {"city": "Paris"}
    assert events[-2:] == [Usage(plan.input_tokens, plan.output_tokens), Finish("tool_calls")]


async def test_tool_result_round_trip(provider: Callable[..., AnthropicProvider]) -> None:
    """A conversation with a tool call and its result is accepted by the strict fake."""
    body = dict(REQUESTS["tool_conversation"])
    events, error = await collect(provider(), body)
    assert error is None
    assert isinstance(events[-1], Finish) and events[-1].reason == "tool_calls"


@pytest.mark.parametrize(
    ("fault", "error_type", "status", "deltas"),
    [
        ("500", UpstreamStatusError, 500, 0),
        ("529", UpstreamStatusError, 529, 0),
        ("429:3", UpstreamStatusError, 429, 0),
        ("reset", UpstreamError, 502, 0),
        ("reset:2", UpstreamError, 502, 2),
        ("malformed", UpstreamError, 502, 0),
        ("malformed:2", UpstreamError, 502, 2),
        ("truncate", UpstreamError, 502, 0),
        ("truncate:2", UpstreamError, 502, 2),
        ("error", UpstreamStatusError, 529, 0),
        ("error:2", UpstreamStatusError, 529, 2),
    ],
)
async def test_faults_become_gateway_errors(
    provider: Callable[..., AnthropicProvider],
    fault: str,
    error_type: type[Exception],
    status: int,
    deltas: int,
) -> None:
    """Each fault, before or after the first token, ends in the right error after the right events."""
    events, error = await collect(provider(), with_text(f"one two three [[fault:{fault}]]"))
    assert type(error) is error_type
    assert isinstance(error, UpstreamError) and error.retryable
    assert error.http_status == status
    assert "'anthropic'" in error.message and "sk-ant-secret" not in error.message
    assert events == [TextDelta(t) for t in ["Echo:", " one"][:deltas]]


async def test_rate_limit_keeps_retry_after_and_error_type(
    provider: Callable[..., AnthropicProvider],
) -> None:
    """A 429 carries Retry-After and Anthropic's error type and message."""
    _, error = await collect(provider(), with_text("x [[fault:429:3]]"))
    assert isinstance(error, UpstreamStatusError)
    assert error.retry_after_s == 3.0 and error.headers() == {"Retry-After": "3"}
    assert error.to_body()["error"]["type"] == "rate_limit_error"
    assert "rate limit" in error.message


async def test_wrong_key_is_a_502_upstream_auth_error_without_the_key(
    provider: Callable[..., AnthropicProvider],
) -> None:
    """Anthropic's 401 is the gateway's key: a 502 upstream_auth_error; the key is never echoed."""
    _, error = await collect(provider(api_key="sk-ant-wrong"), USER)
    assert isinstance(error, UpstreamAuthError) and error.http_status == 502
    assert error.upstream_status == 401 and error.retryable
    assert error.to_body()["error"]["code"] == "upstream_auth_error"
    assert "'anthropic'" in error.message and "sk-ant-wrong" not in error.message


def test_authentication_error_event_is_an_upstream_auth_error() -> None:
    """An in-stream ``authentication_error`` event also becomes UpstreamAuthError (502)."""
    error = credentials_refused(
        "anthropic", stream_error("anthropic", "authentication_error", "invalid x-api-key")
    )
    assert isinstance(error, UpstreamAuthError) and error.http_status == 502
    assert error.upstream_status == 401


@pytest.mark.parametrize(("fault", "events_before"), [("stall", 0), ("hang", 0), ("stall:1", 1)])
async def test_silence_is_a_timeout(
    provider: Callable[..., AnthropicProvider], fault: str, events_before: int
) -> None:
    """No first token within first_token_timeout_s, or silence mid-stream past idle_timeout_s."""
    events, error = await collect(
        provider(first_token_timeout_s=0.3, idle_timeout_s=0.3), with_text(f"a [[fault:{fault}]]")
    )
    assert isinstance(error, UpstreamTimeout) and error.http_status == 504
    assert len(events) == events_before


async def test_invalid_request_is_raised_by_the_iterator(
    fake: AnthropicFake, provider: Callable[..., AnthropicProvider]
) -> None:
    """A translation 400 surfaces from the iterator and nothing is sent upstream."""
    iterator = provider().stream(make_call(with_text("x", logprobs=True)))
    with pytest.raises(UnsupportedParameter):
        await anext(iterator)
    assert fake.requests == []


async def test_connection_refused_is_an_upstream_error() -> None:
    """Nothing listening: a retryable UpstreamError that names the upstream."""
    provider = AnthropicProvider("gone", base_url="http://127.0.0.1:9", api_key="k")
    try:
        _, error = await collect(provider, USER)
        assert isinstance(error, UpstreamError) and error.retryable and "'gone'" in error.message
    finally:
        await provider.aclose()


async def test_closing_the_iterator_closes_the_upstream_connection(
    fake: AnthropicFake, provider: Callable[..., AnthropicProvider]
) -> None:
    """aclose() mid-stream drops the connection: the fake sees its stream cancelled."""
    iterator = provider().stream(make_call(with_text("one two [[fault:stall:1]]")))
    assert isinstance(await anext(iterator), PromptUsage)  # message_start, before any text
    assert await anext(iterator) == TextDelta("Echo:")
    assert fake.stats.streams_open == 1 and fake.stats.connections_open == 1
    await iterator.aclose()  # type: ignore[attr-defined]
    assert await eventually(
        lambda: fake.stats.streams_cancelled == 1 and fake.stats.connections_open == 0
    )
    assert fake.stats.streams_open == 0


async def test_completed_streams_reuse_the_pooled_connection(
    fake: AnthropicFake, provider: Callable[..., AnthropicProvider]
) -> None:
    """Two completions in a row go over one keep-alive connection."""
    anthropic = provider()
    for _ in range(2):
        _, error = await collect(anthropic, USER)
        assert error is None
    assert fake.stats.streams_completed == 2 and fake.stats.connections_opened == 1


# -- end to end through a real gateway -------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayServer, AnthropicFake]]:
    with AnthropicFake(api_key="test-key") as fake:
        overrides = f"""
[providers.anthropic]
kind = "anthropic"
base_url = "{fake.base_url}"
api_key_env = "ANTHROPIC_API_KEY"
first_token_timeout_s = 5.0
idle_timeout_s = 5.0

[plans.cached.models."claude-sonnet-4.5"]
input_usd_per_mtok = "6.00"
output_usd_per_mtok = "30.00"
cache_write_usd_per_mtok = "7.50"
cache_read_usd_per_mtok = "0.60"
"""
        env = {"ANTHROPIC_API_KEY": "test-key"}
        with GatewayServer(
            tmp_path_factory.mktemp("anthropic"), overrides=overrides, env=env
        ) as gateway:
            yield gateway, fake


TOOLS: Any = [WEATHER_TOOL]


def sdk(gateway: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.base_url + "/v1", api_key=gateway.api_key, max_retries=0, timeout=20
    )


def test_gateway_streams_the_fake_text(gateway_pair: tuple[GatewayServer, AnthropicFake]) -> None:
    """The openai SDK streams claude-sonnet-4.5 through the gateway: the fake's echo and usage."""
    gateway, fake = gateway_pair
    stream = sdk(gateway).chat.completions.create(
        model="claude-sonnet-4.5",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "stream me please"},
        ],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: stream me please"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    received = fake.requests[-1]
    assert received.body["model"] == "claude-sonnet-4-5" and received.body["system"] == "Be brief."
    assert received.headers["x-api-key"] == "test-key"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 4
    assert usage.prompt_tokens == plan_reply(received.body).input_tokens


def test_gateway_aggregates_a_tool_call(gateway_pair: tuple[GatewayServer, AnthropicFake]) -> None:
    """A non-streaming request gets the streamed tool call as one message with parsed arguments."""
    gateway, _ = gateway_pair
    completion = sdk(gateway).chat.completions.create(
        model="claude-sonnet-4.5",
        messages=[{"role": "user", "content": "Rome"}],
        tools=TOOLS,
        tool_choice="required",
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Rome"}


def test_gateway_reports_errors_before_and_after_the_first_token(
    gateway_pair: tuple[GatewayServer, AnthropicFake],
) -> None:
    """Overloaded before the first token is an HTTP 529; an error event after it ends the stream in-band."""
    gateway, _ = gateway_pair
    client = sdk(gateway)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="claude-sonnet-4.5", messages=[{"role": "user", "content": "x [[fault:529]]"}]
        )
    assert info.value.status_code == 529
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="claude-sonnet-4.5",
            messages=[{"role": "user", "content": "x"}],
            presence_penalty=1,
        )
    assert bad.value.body["param"] == "presence_penalty"  # type: ignore[index]
    text = ""
    stream = client.chat.completions.create(
        model="claude-sonnet-4.5",
        messages=[{"role": "user", "content": "a b [[fault:error:2]]"}],
        stream=True,
    )
    with pytest.raises(openai.APIError):
        for chunk in stream:
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert text == "Echo: a"


def test_gateway_client_hangup_closes_the_upstream(
    gateway_pair: tuple[GatewayServer, AnthropicFake],
) -> None:
    """A streaming client that leaves mid-stream cancels the Anthropic request."""
    gateway, fake = gateway_pair
    before = fake.stats.streams_cancelled
    stream = sdk(gateway).chat.completions.create(
        model="claude-sonnet-4.5",
        messages=[{"role": "user", "content": "go [[fault:stall:1]]"}],
        stream=True,
    )
    text = ""
    for chunk in stream:
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        if text:
            break
    assert text == "Echo:"
    stream.close()
    end = time.monotonic() + 5
    while fake.stats.streams_cancelled == before and time.monotonic() < end:
        time.sleep(0.01)
    assert fake.stats.streams_cancelled == before + 1


def test_a_cancelled_stream_bills_the_prompt_anthropic_reported(
    gateway_pair: tuple[GatewayServer, AnthropicFake],
) -> None:
    """A stream the client leaves after message_start is billed for the input tokens Anthropic
    reported there, not the gateway's estimate, plus the tokens streamed."""
    gateway, fake = gateway_pair
    content = "count these words for the bill please [[fault:stall:1]]"
    stream = sdk(gateway).chat.completions.create(
        model="claude-sonnet-4.5", messages=[{"role": "user", "content": content}], stream=True
    )
    stream_id = ""
    for chunk in stream:
        stream_id = chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    reported = plan_reply(fake.requests[-1].body).input_tokens

    async def row() -> LedgerRow | None:
        rows = await gateway.state.ledger.rows(key_id=gateway.api_key_id, limit=50)
        return next((r for r in rows if r.completion_id == stream_id), None)

    deadline = time.monotonic() + 10
    found = None
    while found is None and time.monotonic() < deadline:
        found = asyncio.run_coroutine_threadsafe(row(), gateway.loop_of_server()).result()
        time.sleep(0.01)
    assert found is not None and found.status == "client_disconnected"
    estimate = estimate_prompt_tokens(
        decode_chat_request(
            json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()
        )
    )
    assert reported != estimate  # otherwise this test could not tell them apart
    assert (found.prompt_tokens, found.completion_tokens) == (reported, 1)
    assert found.usage_estimated


def _settled_usage(gateway: GatewayServer, key: str, completion_id: str) -> dict[str, Any]:
    """The key's /v1/usage row of ``completion_id``, once it is settled."""
    deadline = time.monotonic() + 10
    while True:
        rows = requests.get(
            gateway.base_url + "/v1/usage",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        ).json()["data"]
        found = [r for r in rows if r["completion_id"] == completion_id]
        if found or time.monotonic() > deadline:
            assert found, rows
            row: dict[str, Any] = found[0]
            return row
        time.sleep(0.01)


def test_cache_tokens_are_metered_and_priced_as_such(
    gateway_pair: tuple[GatewayServer, AnthropicFake],
) -> None:
    """Anthropic reports 2,000 prompt tokens written to its cache and 10,000 read from it: the
    ledger keeps them apart (parts of the prompt count); the cost prices them at Sonnet's cache
    prices ($3.75, $0.30 per 1M), the flat default plan at its one price ($15), and a plan with
    cache prices of its own at those, exactly."""
    gateway, fake = gateway_pair
    _, cached_key = gateway.create_key("cache buyer", plan="cached", credits_usd="5")
    rows = {}
    for name, key in (("standard", gateway.api_key), ("cached", cached_key)):
        client = openai.OpenAI(
            base_url=gateway.base_url + "/v1", api_key=key, max_retries=0, timeout=20
        )
        chunks = list(
            client.chat.completions.create(
                model="claude-sonnet-4.5",
                messages=[
                    # a system prompt as long as what Anthropic says it cached (its bytes bound
                    # the prompt a reservation covers)
                    {"role": "system", "content": "cacheable " * 1500},
                    {"role": "user", "content": "price my cache [[cache:2000:10000]]"},
                ],
                max_tokens=16,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Echo: price my cache"
        uncached = plan_reply(fake.requests[-1].body).input_tokens
        usage = chunks[-1].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (uncached + 12_000, 4)
        rows[name] = _settled_usage(gateway, key, chunks[0].id)
    for row in rows.values():
        assert (row["prompt_tokens"], row["completion_tokens"]) == (uncached + 12_000, 4)
        assert (row["cache_write_tokens"], row["cache_read_tokens"]) == (2_000, 10_000)
    # micro-dollars per token = USD per 1M tokens
    flat = (uncached + 12_000 + 4) * 15
    assert rows["standard"]["charge_micro"] == flat
    cached = uncached * 6 + 2_000 * 75 // 10 + 10_000 * 6 // 10 + 4 * 30
    assert rows["cached"]["charge_micro"] == cached
    cost = uncached * 3 + 2_000 * 375 // 100 + 10_000 * 3 // 10 + 4 * 15
    report = requests.get(
        gateway.base_url + "/v1/admin/usage?group_by=plan&model=claude-sonnet-4.5",
        headers={"Authorization": f"Bearer {gateway.admin_key}"},
        timeout=10,
    ).json()
    by_plan = {r["plan"]: r for r in report["data"]}
    assert (by_plan["cached"]["cost_micro"], by_plan["cached"]["charge_micro"]) == (cost, cached)
    assert by_plan["cached"]["margin_micro"] == cached - cost
    assert (by_plan["cached"]["cache_write_tokens"], by_plan["cached"]["cache_read_tokens"]) == (
        2_000,
        10_000,
    )


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
