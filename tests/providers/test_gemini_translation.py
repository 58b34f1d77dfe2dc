"""Gemini translation without a network: OpenAI requests into Gemini's path and body, compared
with the golden files in ``golden/gemini/`` (regenerate with ``TOKENWIRE_UPDATE_GOLDEN=1``),
what Gemini cannot take refused with a 400 naming the param, and reply chunks into events:
text without thought summaries, usage and cache tokens, whole tool calls, finish reasons, a
blocked prompt, and in-band and HTTP error bodies as gateway errors.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tests.providers.gemini_common import MODEL, TOOLS, call_for, chat

from tokenwire.errors import (
    GatewayError,
    InvalidRequest,
    UnsupportedParameter,
    UpstreamError,
    UpstreamStatusError,
)
from tokenwire.providers.gemini import GeminiStream, _Chunk, gemini_error, to_gemini, tool_call_id
from tokenwire.streams.events import Finish, PromptUsage, TextDelta, ToolCallDelta, Usage

GOLDEN = Path(__file__).parent / "golden" / "gemini"


def chunk(value: dict[str, Any]) -> _Chunk:
    """A reply chunk as the provider decodes it."""
    return msgspec.json.decode(json.dumps(value), type=_Chunk)


def text_chunk(text: str, finish: str | None = None) -> _Chunk:
    """A chunk with one text part (and a finishReason)."""
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish:
        candidate["finishReason"] = finish
    return chunk({"candidates": [candidate]})


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


def test_a_plain_400_is_not_blamed_on_the_key() -> None:
    """A 400 without the API_KEY_INVALID reason stays the client's invalid request."""
    body = {"error": {"code": 400, "message": "bad field", "status": "INVALID_ARGUMENT"}}
    error = gemini_error("gemini", 400, json.dumps(body).encode())
    assert isinstance(error, UpstreamStatusError) and error.http_status == 400
