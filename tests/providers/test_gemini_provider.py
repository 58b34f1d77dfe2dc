"""The Gemini provider against the fake Gemini API of
:mod:`tokenwire.testing_upstreams.gemini_fake` over real connections: the request it sends,
streamed text and tool calls, stop sequences, a bad API key, every fault before and after the
first token, the connection closed on cancel and reused after a complete stream; and the
fake's own wire format (SSE bytes, generateContent, validation, faults by header).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from tests.providers.gemini_common import MODEL, TOOLS, call_for, chat, reply
from tests.providers.stream_common import collect_events

from tokenwire.errors import (
    GatewayError,
    UnsupportedParameter,
    UpstreamAuthError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from tokenwire.providers.gemini import GeminiProvider
from tokenwire.streams.events import Event, Finish, PromptUsage, TextDelta, ToolCallDelta, Usage
from tokenwire.testing import eventually
from tokenwire.testing_upstreams.gemini_fake import REPLY_TOKENS, THOUGHT_TOKENS, GeminiFake

ProviderFactory = Callable[..., Awaitable[GeminiProvider]]


@pytest.fixture
async def fake() -> AsyncIterator[GeminiFake]:
    """The fake Gemini API on a loopback port."""
    server = GeminiFake(api_key="k")
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def provider(fake: GeminiFake) -> AsyncIterator[ProviderFactory]:
    """Makes GeminiProviders pointed at ``fake`` and closes them afterwards."""
    made: list[GeminiProvider] = []

    async def make(**options: Any) -> GeminiProvider:
        options.setdefault("api_key", "k")
        made.append(GeminiProvider("gemini", base_url=fake.base_url, **options))
        return made[-1]

    yield make
    for item in made:
        await item.aclose()


async def collect(
    provider: GeminiProvider, body: dict[str, Any]
) -> tuple[list[Event], GatewayError | None]:
    """Every event of a stream, and the error that ended it (if any)."""
    return await collect_events(provider.stream(call_for(body)))


async def test_streams_text_and_sends_the_documented_request(
    fake: GeminiFake, provider: ProviderFactory
) -> None:
    """Text streams as deltas, then stop and usage; the request is Gemini's wire format."""
    body = chat("Say something", max_tokens=5, temperature=0.1)
    events, error = await collect(await provider(), body)
    assert error is None
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == reply(5)
    assert events[-2:] == [Finish("length"), Usage(2, 5 + THOUGHT_TOKENS)]
    (seen,) = fake.requests
    assert (seen.model, seen.action, seen.query) == (MODEL, "streamGenerateContent", {"alt": "sse"})
    assert seen.headers["x-goog-api-key"] == "k" and "authorization" not in seen.headers
    assert seen.body == {
        "contents": [{"role": "user", "parts": [{"text": "Say something"}]}],
        "generationConfig": {"maxOutputTokens": 5, "temperature": 0.1},
    }


async def test_stop_sequences_are_honoured(provider: ProviderFactory) -> None:
    """The reply stops before the stop sequence, with finish reason stop."""
    events, error = await collect(await provider(), chat("x", stop=[" echo"]))
    assert error is None
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == reply(4)
    assert events[-2] == Finish("stop")


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [("required", ["lookup"]), ({"type": "function", "function": {"name": "clock"}}, ["clock"])],
)
async def test_tool_calls_stream_from_the_fake(
    provider: ProviderFactory, tool_choice: Any, names: list[str]
) -> None:
    """With a forced tool the fake calls it; the call arrives whole, then tool_calls."""
    events, error = await collect(await provider(), chat("x", tools=TOOLS, tool_choice=tool_choice))
    assert error is None
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [c.name for c in calls] == names and [c.index for c in calls] == [0]
    assert calls[0].id is not None and calls[0].id.startswith("call_0_")
    assert json.loads(calls[0].arguments) == ({"query": "alpha"} if names == ["lookup"] else {})
    assert Finish("tool_calls") in events


async def test_tools_offered_but_not_forced_give_text(provider: ProviderFactory) -> None:
    """With tool_choice auto the fake answers in text and the finish reason stays stop."""
    events, error = await collect(await provider(), chat("x", tools=TOOLS, tool_choice="auto"))
    assert error is None
    assert not any(isinstance(e, ToolCallDelta) for e in events)
    assert Finish("stop") in events


async def test_translation_errors_happen_before_any_request(
    fake: GeminiFake, provider: ProviderFactory
) -> None:
    """An untranslatable request fails on iteration without reaching the upstream."""
    _, error = await collect(await provider(), chat("x", logprobs=True))
    assert isinstance(error, UnsupportedParameter) and error.param == "logprobs"
    assert fake.requests == []


@pytest.mark.parametrize(
    ("api_key", "status"), [("wrong", 400), (None, 403)], ids=["wrong-key", "no-key"]
)
async def test_bad_api_key_is_an_upstream_auth_error(
    provider: ProviderFactory, api_key: str | None, status: int
) -> None:
    """Google's 400 API_KEY_INVALID (bad key) and 403 (no key) are the gateway's key: 502 upstream_auth_error."""
    events, error = await collect(await provider(api_key=api_key), chat("x"))
    assert events == [] and isinstance(error, UpstreamAuthError)
    assert error.http_status == 502 and error.upstream_status == status
    assert error.to_body()["error"]["code"] == "upstream_auth_error"
    assert "'gemini'" in error.message and "wrong" not in error.message


@pytest.mark.parametrize(
    ("fault", "error_type", "status"),
    [
        ("500", UpstreamStatusError, 500),
        ("503", UpstreamStatusError, 503),
        ("429", UpstreamStatusError, 429),
        ("reset", UpstreamError, 502),
        ("stall", UpstreamTimeout, 504),
        ("malformed", UpstreamError, 502),
        ("nofinish", UpstreamError, 502),
        ("error", UpstreamStatusError, 500),
    ],
)
async def test_faults_before_the_first_token(
    provider: ProviderFactory, fault: str, error_type: type[GatewayError], status: int
) -> None:
    """A fault before any token is an error with its status, and no events."""
    events, error = await collect(
        await provider(first_token_timeout_s=0.3), chat(f"hello FAULT:{fault}")
    )
    assert events == []
    assert type(error) is error_type and error.http_status == status
    assert "'gemini'" in error.message
    if fault == "429":
        assert isinstance(error, UpstreamStatusError) and error.retry_after_s == 7.0
        assert error.code == "RESOURCE_EXHAUSTED"
    if fault == "503":
        assert isinstance(error, UpstreamStatusError) and error.code == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("fault", "error_type", "status"),
    [
        ("reset", UpstreamError, 502),
        ("stall", UpstreamTimeout, 504),
        ("malformed", UpstreamError, 502),
        ("nofinish", UpstreamError, 502),
        ("error", UpstreamStatusError, 500),
    ],
)
async def test_faults_after_the_first_token(
    provider: ProviderFactory, fault: str, error_type: type[GatewayError], status: int
) -> None:
    """A fault mid-stream ends it with an error after the tokens that came first."""
    events, error = await collect(await provider(idle_timeout_s=0.3), chat(f"FAULT:{fault}@2"))
    assert events == [TextDelta(reply(2)), TextDelta(reply(4)[len(reply(2)) :])]
    assert type(error) is error_type and error.http_status == status


@pytest.mark.parametrize("after", [0, 1])
async def test_safety_block_ends_with_content_filter(provider: ProviderFactory, after: int) -> None:
    """A SAFETY finish (no content) is a normal end with finish reason content_filter."""
    events, error = await collect(await provider(), chat(f"FAULT:safety@{after}"))
    assert error is None
    assert [e for e in events if isinstance(e, TextDelta)] == (
        [TextDelta(reply(2))] if after else []
    )
    assert events[-2] == Finish("content_filter") and isinstance(events[-1], Usage)


async def test_fault_by_header_is_honoured(fake: GeminiFake) -> None:
    """The fake also takes its fault from the x-fake-fault header."""
    url = f"{fake.base_url}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
    headers = {"x-goog-api-key": "k", "x-fake-fault": "503"}
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        assert response.status == 503
        assert (await response.json())["error"]["status"] == "UNAVAILABLE"


async def test_cancelling_mid_stream_closes_the_upstream_connection(
    fake: GeminiFake, provider: ProviderFactory
) -> None:
    """Closing the event iterator after a token drops the connection to the fake."""
    events = (await provider()).stream(call_for(chat("FAULT:stall@1")))
    first = await anext(events)
    if isinstance(first, PromptUsage):  # when the fake reports usage with its first chunk
        first = await anext(events)
    assert first == TextDelta(reply(2))
    assert fake.open_streams == 1
    await events.aclose()  # type: ignore[attr-defined]
    assert await eventually(lambda: fake.disconnects == 1 and fake.open_streams == 0)


async def test_cancelling_before_the_first_token_closes_the_upstream_connection(
    fake: GeminiFake, provider: ProviderFactory
) -> None:
    """Cancelling a consumer still waiting for the first token drops the connection too."""
    events = (await provider()).stream(call_for(chat("FAULT:stall")))
    task = asyncio.ensure_future(anext(events))
    assert await eventually(lambda: fake.open_streams == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await events.aclose()  # type: ignore[attr-defined]
    assert await eventually(lambda: fake.disconnects == 1 and fake.open_streams == 0)


async def test_pooled_connection_is_reused_after_a_complete_stream(
    fake: GeminiFake, provider: ProviderFactory
) -> None:
    """Back-to-back streams on one provider both succeed (the body is released to the pool)."""
    gemini = await provider()
    for _ in range(2):
        events, error = await collect(gemini, chat("x", max_tokens=2))
        assert error is None and events[-2] == Finish("length")
    assert fake.completed_streams == 2


# --- the fake's own wire format -----------------------------------------------------------


async def test_fake_sse_bytes_follow_the_documented_format(fake: GeminiFake) -> None:
    """SSE events are `data: {json}\\r\\n\\r\\n` with usage in each and finishReason in the last."""
    url = f"{fake.base_url}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
    body = {
        "contents": [{"role": "user", "parts": [{"text": "one two"}]}],
        "generationConfig": {"maxOutputTokens": 3},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers={"x-goog-api-key": "k"}) as response,
    ):
        assert response.headers["Content-Type"] == "text/event-stream"
        raw = await response.read()
    frames = raw.split(b"\r\n\r\n")
    assert frames[-1] == b"" and all(f.startswith(b"data: {") for f in frames[:-1])
    assert frames[0].startswith(
        b'data: {"candidates": [{"content": {"parts": [{"text": "Alpha bravo"}]'
    )
    last = json.loads(frames[-2][len(b"data: ") :])
    assert last["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert last["usageMetadata"]["candidatesTokenCount"] == 3
    assert last["usageMetadata"]["promptTokenCount"] == 2
    assert last["modelVersion"] == MODEL and last["responseId"]


async def test_fake_generate_content_and_validation(fake: GeminiFake) -> None:
    """generateContent answers one JSON response; a malformed request gets Google's 400."""
    base = f"{fake.base_url}/v1beta/models/{MODEL}"
    headers = {"x-goog-api-key": "k"}
    good = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    bad = {"contents": [{"role": "assistant", "parts": [{"text": "hi"}]}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}:generateContent", json=good, headers=headers) as response:
            answer = await response.json()
        assert answer["candidates"][0]["content"] == {
            "parts": [{"text": reply(len(REPLY_TOKENS))}],
            "role": "model",
        }
        assert answer["candidates"][0]["finishReason"] == "STOP"
        async with session.post(f"{base}:generateContent", json=bad, headers=headers) as response:
            assert response.status == 400
            assert (await response.json())["error"]["status"] == "INVALID_ARGUMENT"
        async with session.post(
            f"{base}:streamGenerateContent", json=good, headers=headers
        ) as response:
            array = await response.json()  # without alt=sse: one JSON array
        assert array[-1]["candidates"][0]["finishReason"] == "STOP"
