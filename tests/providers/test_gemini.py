"""The Gemini provider: request and reply translation, and the fake Gemini API misbehaving."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest

from tokenwire.errors import (
    GatewayError,
    InvalidRequest,
    UnsupportedParameter,
    UpstreamAuthError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from tokenwire.providers.base import ProviderCall
from tokenwire.providers.gemini import (
    GeminiProvider,
    GeminiStream,
    _Chunk,
    gemini_error,
    to_gemini,
    tool_call_id,
)
from tokenwire.streams.events import Event, Finish, PromptUsage, TextDelta, ToolCallDelta, Usage
from tokenwire.testing import GatewayServer, eventually
from tokenwire.testing_upstreams.gemini_fake import (
    REPLY_TOKENS,
    THOUGHT_TOKENS,
    GeminiFake,
    GeminiFakeThread,
)
from tokenwire.wire.schema import decode_chat_request

GOLDEN = Path(__file__).parent / "golden" / "gemini"
MODEL = "gemini-2.5-flash"
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "clock"}},
]
ProviderFactory = Callable[..., Awaitable[GeminiProvider]]


def call_for(body: dict[str, Any], upstream_model: str = MODEL) -> ProviderCall:
    """A ProviderCall for an OpenAI chat body."""
    return ProviderCall(decode_chat_request(json.dumps(body).encode()), upstream_model, body)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    """A one-message chat body."""
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def reply(count: int) -> str:
    """The fake's first ``count`` tokens."""
    return "".join(REPLY_TOKENS[:count])


def chunk(value: dict[str, Any]) -> _Chunk:
    """A reply chunk as the provider decodes it."""
    return msgspec.json.decode(json.dumps(value), type=_Chunk)


def text_chunk(text: str, finish: str | None = None) -> _Chunk:
    """A chunk with one text part (and a finishReason)."""
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish:
        candidate["finishReason"] = finish
    return chunk({"candidates": [candidate]})


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
    events: list[Event] = []
    try:
        async for event in provider.stream(call_for(body)):
            if not isinstance(event, PromptUsage):  # bookkeeping, checked on its own
                events.append(event)
    except GatewayError as exc:
        return events, exc
    return events, None


# --- request translation ------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(p.name.split(".")[0] for p in GOLDEN.glob("*.openai.json")))
def test_request_translation_matches_golden(case: str) -> None:
    """Each golden OpenAI request translates to exactly the recorded Gemini path and body."""
    body = json.loads((GOLDEN / f"{case}.openai.json").read_text())
    path, translated = to_gemini(call_for(body, body["model"]))
    got = {"path": path, "body": translated}
    expected_file = GOLDEN / f"{case}.gemini.json"
    if os.environ.get("TOKENWIRE_UPDATE_GOLDEN"):
        expected_file.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n")
    assert got == json.loads(expected_file.read_text())


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "clock"}},
            {"mode": "ANY", "allowedFunctionNames": ["clock"]},
        ),
    ],
)
def test_tool_choice_maps_to_function_calling_mode(tool_choice: Any, expected: Any) -> None:
    """tool_choice becomes toolConfig.functionCallingConfig."""
    _, body = to_gemini(call_for(chat("x", tools=TOOLS, tool_choice=tool_choice)))
    assert body["toolConfig"] == {"functionCallingConfig": expected}
    assert [d["name"] for d in body["tools"][0]["functionDeclarations"]] == ["lookup", "clock"]


def test_model_name_is_quoted_into_the_path() -> None:
    """The upstream model goes into the path, escaped; the stream asks for SSE."""
    path, _ = to_gemini(call_for(chat("x"), "tuned/my model"))
    assert path == "/v1beta/models/tuned%2Fmy%20model:streamGenerateContent?alt=sse"


ASSISTANT_CALL = {
    "role": "assistant",
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
}


@pytest.mark.parametrize(
    ("body", "error", "param"),
    [
        (
            {"messages": [{"role": "user", "content": "x"}, ASSISTANT_CALL]},
            InvalidRequest,
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "tool", "tool_call_id": "nope", "content": "1"},
                ]
            },
            InvalidRequest,
            "messages[1].tool_call_id",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "https://example.com/render?id=3"},
                            }
                        ],
                    }
                ]
            },
            UnsupportedParameter,
            "messages[0].content[0].image_url.url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png,raw"}}
                        ],
                    }
                ]
            },
            InvalidRequest,
            "messages[0].content[0].image_url.url",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}
                ]
            },
            UnsupportedParameter,
            "messages[0].content[0].file.file_id",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"50256": -100}},
            UnsupportedParameter,
            "logit_bias",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search"}]},
            InvalidRequest,
            "tools[0].type",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "custom", "custom": {"name": "x"}}],
            },
            UnsupportedParameter,
            "tools[0].type",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": "x"},
            },
            InvalidRequest,
            "response_format.json_schema",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
            InvalidRequest,
            "tool_choice",
        ),
        (
            {"messages": [{"role": "system", "content": "only a system prompt"}]},
            InvalidRequest,
            "messages",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "grammar"},
            },
            InvalidRequest,
            "response_format.type",
        ),
    ],
)
def test_untranslatable_requests_name_the_param(
    body: dict[str, Any], error: type[GatewayError], param: str
) -> None:
    """What Gemini cannot take is refused with a 400 that names the offending param."""
    with pytest.raises(error) as info:
        to_gemini(call_for({"model": MODEL, **body}))
    assert info.value.http_status == 400
    assert info.value.param == param


# --- reply translation --------------------------------------------------------------------


def test_text_thoughts_and_usage_translate() -> None:
    """Text parts stream as deltas, thought summaries are dropped, the last usage is kept."""
    stream = GeminiStream("gemini")
    usage = {"promptTokenCount": 4, "candidatesTokenCount": 2, "thoughtsTokenCount": 9}
    first = chunk(
        {
            "candidates": [
                {"content": {"parts": [{"text": "plan", "thought": True}, {"text": "Hel"}]}}
            ],
            "usageMetadata": {**usage, "candidatesTokenCount": 1},
        }
    )
    last = chunk(
        {
            "candidates": [{"content": {"parts": [{"text": "lo"}]}, "finishReason": "STOP"}],
            "usageMetadata": usage,
        }
    )
    assert stream.feed_chunk(first) == [PromptUsage(4), TextDelta("Hel")]  # the prompt, once
    assert stream.feed_chunk(last) == [TextDelta("lo"), Finish("stop")]
    assert stream.end() == [Usage(4, 11)]


def test_cached_content_tokens_are_kept_apart() -> None:
    """cachedContentTokenCount is the cache-read part of the prompt, early and at the end."""
    stream = GeminiStream("gemini")
    usage = {"promptTokenCount": 5000, "candidatesTokenCount": 3, "cachedContentTokenCount": 4096}
    first = chunk(
        {"candidates": [{"content": {"parts": [{"text": "Hi"}]}}], "usageMetadata": usage}
    )
    last = chunk(
        {
            "candidates": [{"content": {"parts": [{"text": "!"}]}, "finishReason": "STOP"}],
            "usageMetadata": usage,
        }
    )
    assert stream.feed_chunk(first) == [PromptUsage(5000, cache_read_tokens=4096), TextDelta("Hi")]
    stream.feed_chunk(last)
    assert stream.end() == [Usage(5000, 3, cache_read_tokens=4096)]


def test_function_calls_become_whole_tool_call_deltas() -> None:
    """Each functionCall is one delta with a stable synthesized id; STOP becomes tool_calls."""
    parts = [
        {"text": "Let me look."},
        {"functionCall": {"name": "lookup", "args": {"query": "é"}}, "thoughtSignature": "c2ln"},
        {"functionCall": {"name": "clock"}},
    ]
    value = {"candidates": [{"content": {"parts": parts}, "finishReason": "STOP"}]}
    events = GeminiStream("gemini").feed_chunk(chunk(value))
    arguments = json.dumps({"query": "é"}, ensure_ascii=False)
    assert events == [
        TextDelta("Let me look."),
        ToolCallDelta(0, tool_call_id(0, "lookup", arguments), "lookup", arguments),
        ToolCallDelta(1, tool_call_id(1, "clock", "{}"), "clock", "{}"),
        Finish("tool_calls"),
    ]
    assert events == GeminiStream("other").feed_chunk(chunk(value))  # ids are stable
    assert re.fullmatch(r"call_0_[0-9a-f]{12}", tool_call_id(0, "lookup", arguments))


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
        ("OTHER", "stop"),
        ("FINISH_REASON_UNSPECIFIED", "stop"),
    ],
)
def test_finish_reasons_map(reason: str, expected: str) -> None:
    """Every Gemini finishReason maps to an OpenAI finish_reason."""
    assert GeminiStream("gemini").feed_chunk(text_chunk("", reason)) == [Finish(expected)]  # type: ignore[arg-type]


def test_blocked_prompt_is_a_content_filter_finish() -> None:
    """A prompt blocked before any candidate (promptFeedback.blockReason) ends as content_filter."""
    stream = GeminiStream("gemini")
    value = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3}}
    assert stream.feed_chunk(chunk(value)) == [PromptUsage(3), Finish("content_filter")]
    assert stream.end() == [Usage(3, 0)]


def test_error_chunk_keeps_its_code_as_status() -> None:
    """An in-band error event becomes an UpstreamStatusError with the error's code."""
    value = {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}
    with pytest.raises(UpstreamStatusError) as info:
        GeminiStream("gemini").feed_chunk(chunk(value))
    assert info.value.http_status == 503 and info.value.code == "UNAVAILABLE"
    assert "'gemini'" in info.value.message and "overloaded" in info.value.message


def test_stream_without_finish_reason_is_an_upstream_error() -> None:
    """Ending before any finishReason is an UpstreamError, not a silent stop."""
    stream = GeminiStream("gemini")
    stream.feed_chunk(text_chunk("partial"))
    with pytest.raises(UpstreamError, match="without a finish reason"):
        stream.end()


def test_no_usage_metadata_means_no_usage_event() -> None:
    """Without usageMetadata the provider reports no usage (the gateway then estimates)."""
    stream = GeminiStream("gemini")
    stream.feed_chunk(text_chunk("ok", "STOP"))
    assert stream.end() == []


def test_error_bodies_translate_with_retry_info() -> None:
    """RetryInfo.retryDelay sets retry_after_s; a Retry-After header wins; arrays are unwrapped."""
    body = {
        "error": {
            "code": 429,
            "message": "quota",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}],
        }
    }
    error = gemini_error("gemini", 429, json.dumps(body).encode())
    assert error.retry_after_s == 17.0 and error.code == "RESOURCE_EXHAUSTED"
    assert error.to_body()["error"]["type"] == "rate_limit_error"
    assert error.headers() == {"Retry-After": "17"}
    assert gemini_error("gemini", 429, json.dumps([body]).encode(), "3").retry_after_s == 3.0
    plain = gemini_error("gemini", 502, b"<html>bad gateway</html>")
    assert plain.http_status == 502 and "bad gateway" in plain.message


# --- the provider against the fake --------------------------------------------------------


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


def test_a_plain_400_is_not_blamed_on_the_key() -> None:
    """A 400 without the API_KEY_INVALID reason stays the client's invalid request."""
    body = {"error": {"code": 400, "message": "bad field", "status": "INVALID_ARGUMENT"}}
    error = gemini_error("gemini", 400, json.dumps(body).encode())
    assert isinstance(error, UpstreamStatusError) and error.http_status == 400


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


# --- through the gateway ------------------------------------------------------------------


def test_gateway_streams_gemini_through_the_openai_sdk(tmp_path: Path) -> None:
    """The openai SDK streams gemini-2.5-flash through the gateway from the fake Gemini API."""
    with GeminiFakeThread(api_key="k") as upstream:
        overrides = (
            "[providers.gemini]\n"
            'kind = "gemini"\n'
            f'base_url = "{upstream.base_url}"\n'
            'api_key_env = "GEMINI_API_KEY"\n'
        )
        with GatewayServer(tmp_path, overrides=overrides, env={"GEMINI_API_KEY": "k"}) as gateway:
            client = openai.OpenAI(
                base_url=gateway.base_url + "/v1",
                api_key=gateway.api_key,
                max_retries=0,
                timeout=10,
            )
            with client:
                stream = client.chat.completions.create(
                    model=MODEL,
                    messages=[
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                    ],
                    max_tokens=6,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = list(stream)
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                finish = [
                    c.choices[0].finish_reason
                    for c in chunks
                    if c.choices and c.choices[0].finish_reason
                ]
                usage = chunks[-1].usage
                tool_stream = client.chat.completions.create(  # type: ignore[call-overload]
                    model=MODEL,
                    messages=[{"role": "user", "content": "Look it up"}],
                    tools=TOOLS,
                    tool_choice="required",
                    stream=True,
                )
                tool_chunks = list(tool_stream)
        requests = list(upstream.fake.requests)
    assert text == reply(6) and finish == ["length"]
    assert usage is not None and usage.prompt_tokens == 3
    assert usage.completion_tokens == 6 + THOUGHT_TOKENS
    calls = [tc for c in tool_chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [c.function.name for c in calls if c.function] == ["lookup"]
    assert tool_chunks[-1].choices[0].finish_reason == "tool_calls"
    assert requests[0].body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert requests[0].headers["x-goog-api-key"] == "k"


def test_deeply_nested_tool_json_is_a_400_not_a_crash() -> None:
    """Tool-call arguments nested 5,000 deep are refused naming the field; a tool result that
    deep is passed as text."""
    deep = "[" * 5000 + "]" * 5000
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": deep},
        ],
    }
    with pytest.raises(InvalidRequest) as info:
        to_gemini(call_for(body))
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"
    call["function"]["arguments"] = "{}"
    _, translated = to_gemini(call_for(body))
    response = translated["contents"][-1]["parts"][0]["functionResponse"]["response"]
    assert response == {"content": deep}
