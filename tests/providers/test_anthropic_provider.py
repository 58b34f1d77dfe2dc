"""The Anthropic provider against the loopback fake of
:mod:`tokenwire.testing_upstreams.anthropic_fake`, over real connections: streamed text and
tool calls, the headers and body sent, max_tokens and stop sequences, every upstream fault and
timeout as the right gateway error, a wrong key and a refused connection, a request that fails
translation before anything is sent, and the connection closed on cancel and reused after a
complete stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from tests.providers.anthropic_common import REQUESTS, WEATHER_TOOL, make_call
from tests.providers.stream_common import collect_events

from tokenwire.errors import (
    GatewayError,
    UnsupportedParameter,
    UpstreamAuthError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from tokenwire.providers.anthropic import AnthropicProvider, to_anthropic
from tokenwire.streams.events import Event, Finish, PromptUsage, TextDelta, ToolCallDelta, Usage
from tokenwire.testing import eventually
from tokenwire.testing_upstreams.anthropic_fake import AnthropicFake, plan_reply

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
    return await collect_events(provider.stream(make_call(body)))


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
