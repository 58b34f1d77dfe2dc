"""Messages API requests: validation (400 naming the field) and translation to a chat request.

The central property: a Messages body translated into a chat request and back by the
Anthropic provider is the body the client sent, in meaning (a Claude model sees what the
client asked for).
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwire.errors import InvalidRequest, UnsupportedParameter
from tokenwire.providers.anthropic import to_anthropic
from tokenwire.providers.base import ProviderCall
from tokenwire.testing_fuzz import fuzz_settings, json_values, mostly, shaped_like
from tokenwire.wire import schema
from tokenwire.wire.messages_request import chat_body, messages_request_from, to_chat_request

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
RICH: dict[str, Any] = {
    "model": "claude-sonnet-4.5",
    "max_tokens": 300,
    "system": "You are terse.",
    "stop_sequences": ["END", "STOP"],
    "temperature": 0.3,
    "top_p": 0.9,
    "top_k": 20,
    "metadata": {"user_id": "user-7"},
    "tools": [WEATHER],
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "stream": True,
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is on this picture, and the weather?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Oslo"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12 C"},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ],
}


def translate(body: dict[str, Any]) -> schema.ChatRequest:
    """The chat request for a Messages body."""
    return to_chat_request(messages_request_from(body))


def round_trip(body: dict[str, Any]) -> dict[str, Any]:
    """The Messages body the Anthropic provider sends for a Messages body."""
    request = translate(body)
    return to_anthropic(ProviderCall(request, body["model"], chat_body(request)))


def test_a_rich_request_reaches_anthropic_unchanged() -> None:
    """System, images, tool use and results, sampling, tools, metadata: all arrive as sent."""
    assert round_trip(RICH) == {
        **RICH,
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    }


@pytest.mark.parametrize(
    "choice",
    [
        {"type": "auto"},
        {"type": "any"},
        {"type": "tool", "name": "get_weather"},
        {"type": "none"},
        {"type": "any", "disable_parallel_tool_use": True},
    ],
)
def test_tool_choice_round_trips(choice: dict[str, Any]) -> None:
    """Every tool_choice reaches Anthropic as the client sent it."""
    body = {**_minimal(), "tools": [WEATHER], "tool_choice": choice}
    assert round_trip(body)["tool_choice"] == choice


def _minimal(**extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4.5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello"}],
        **extra,
    }


def test_system_blocks_and_a_pdf_round_trip() -> None:
    """System text blocks become one system text; a base64 PDF stays a document."""
    pdf = {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}
    body = _minimal(
        system=[{"type": "text", "text": "Be brief. "}, {"type": "text", "text": "Be kind."}],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "document", "source": pdf},
                    {"type": "text", "text": "Sum up."},
                ],
            }
        ],
    )
    sent = round_trip(body)
    assert sent["system"] == "Be brief. Be kind."
    assert sent["messages"][0]["content"] == [
        {"type": "document", "source": pdf},
        {"type": "text", "text": "Sum up."},
    ]


def test_the_chat_request_means_the_same() -> None:
    """The chat request every other provider reads: the same turns, tools and limits."""
    request = translate(RICH)
    assert request.model == "claude-sonnet-4.5" and request.max_tokens == 300
    assert request.stop == ["END", "STOP"] and request.top_k == 20 and request.user == "user-7"
    assert request.parallel_tool_calls is False and request.tool_choice == "auto"
    roles = [type(m).__name__ for m in request.messages]
    assert roles == [
        "SystemMessage",
        "UserMessage",
        "AssistantMessage",
        "ToolMessage",
        "UserMessage",
    ]
    assistant = request.messages[2]
    assert isinstance(assistant, schema.AssistantMessage) and assistant.tool_calls is not None
    assert assistant.tool_calls[0].function.arguments == '{"city":"Oslo"}'
    assert request.include_usage, "a stream always reports usage"
    body = chat_body(request)
    assert schema.chat_request_from(body) == request, "the chat body validates as the same request"


def test_tool_results_keep_errors_and_text_blocks() -> None:
    """is_error prefixes the result; text blocks of a result are joined by newlines."""
    body = _minimal(
        messages=[
            {"role": "user", "content": "Go"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "is_error": True,
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    }
                ],
            },
        ]
    )
    result = translate(body).messages[-1]
    assert result == schema.ToolMessage(content="Error: a\nb", tool_call_id="t1")


def test_ignored_fields_change_nothing() -> None:
    """cache_control, service_tier, disabled thinking and unknown fields are accepted."""
    body = _minimal(
        service_tier="auto",
        thinking={"type": "disabled"},
        something_new=1,
        system=[{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}],
    )
    assert round_trip(body) == round_trip(_minimal(system="S"))


def test_whole_floats_are_integers() -> None:
    """max_tokens 64.0 is the integer 64, as JSON Schema says."""
    assert translate(_minimal(max_tokens=64.0)).max_tokens == 64


@pytest.mark.parametrize(
    ("body", "param", "kind"),
    [
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
            InvalidRequest,
        ),
        (_minimal(max_tokens=0), "max_tokens", InvalidRequest),
        (_minimal(max_tokens="9"), "max_tokens", InvalidRequest),
        (_minimal(messages=[]), "messages", InvalidRequest),
        (
            _minimal(messages=[{"role": "system", "content": "x"}]),
            "messages[0].role",
            InvalidRequest,
        ),
        (
            _minimal(messages=[{"role": "user", "content": [{"type": "video", "url": "x"}]}]),
            "messages[0].content[0].type",
            InvalidRequest,
        ),
        (_minimal(temperature=1.5), "temperature", InvalidRequest),
        (_minimal(top_k=0), "top_k", InvalidRequest),
        (_minimal(metadata={"user_id": "u", "other": 1}), "metadata.other", InvalidRequest),
        (
            _minimal(thinking={"type": "enabled", "budget_tokens": 2048}),
            "thinking.type",
            UnsupportedParameter,
        ),
        (_minimal(container="c"), "container", UnsupportedParameter),
        (_minimal(mcp_servers=[{}]), "mcp_servers", UnsupportedParameter),
        (_minimal(stop_sequences=list("abcde")), "stop_sequences", InvalidRequest),
        (
            _minimal(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
            "tools[0].type",
            UnsupportedParameter,
        ),
        (_minimal(tools=[{"name": "f"}]), "tools[0].input_schema", InvalidRequest),
        (_minimal(tool_choice={"type": "any"}), "tool_choice", InvalidRequest),
        (
            _minimal(tools=[WEATHER], tool_choice={"type": "tool", "name": "other"}),
            "tool_choice.name",
            InvalidRequest,
        ),
        (
            _minimal(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/bmp",
                                    "data": "AA",
                                },
                            }
                        ],
                    }
                ]
            ),
            "messages[0].content[0].source.media_type",
            InvalidRequest,
        ),
        (
            _minimal(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "x"},
                            {
                                "type": "document",
                                "source": {
                                    "type": "text",
                                    "media_type": "text/plain",
                                    "data": "hi",
                                },
                            },
                        ],
                    }
                ]
            ),
            "messages[0].content[1].source.type",
            InvalidRequest,
        ),
        (
            _minimal(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [
                                    {
                                        "type": "image",
                                        "source": {"type": "url", "url": "https://x/y.png"},
                                    }
                                ],
                            }
                        ],
                    }
                ]
            ),
            "messages[0].content[0].content[0].type",
            InvalidRequest,
        ),
        (
            _minimal(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                    }
                ]
            ),
            "messages[0].content[0].type",
            InvalidRequest,
        ),
        (
            _minimal(
                messages=[
                    {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}
                ]
            ),
            "messages[0].content[0].type",
            InvalidRequest,
        ),
        (
            _minimal(
                messages=[
                    {
                        "role": "assistant",
                        "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}],
                    }
                ]
            ),
            "messages[0].content[0].type",
            InvalidRequest,
        ),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    body: dict[str, Any], param: str, kind: type[InvalidRequest]
) -> None:
    """Each malformed or unsupported request is refused with the offending field named."""
    with pytest.raises(kind) as caught:
        translate(body)
    assert caught.value.param == param
    assert caught.value.http_status == 400


def test_a_body_that_is_not_an_object_is_a_400() -> None:
    """A JSON array is refused, not crashed on."""
    with pytest.raises(InvalidRequest):
        messages_request_from([1, 2])


_BLOCKS = st.one_of(
    shaped_like({"type": st.just("text"), "text": st.text(max_size=8)}),
    shaped_like({"type": st.just("image"), "source": json_values(4)}),
    shaped_like(
        {
            "type": st.just("tool_use"),
            "id": st.text(max_size=4),
            "name": st.text(max_size=4),
            "input": json_values(4),
        }
    ),
    shaped_like(
        {
            "type": st.just("tool_result"),
            "tool_use_id": st.text(max_size=4),
            "content": json_values(4),
            "is_error": st.booleans(),
        }
    ),
    json_values(4),
)
_BODIES = shaped_like(
    {
        "model": mostly(st.just("m"), json_values(2)),
        "max_tokens": mostly(st.integers(1, 10), json_values(2)),
        "messages": mostly(
            st.lists(
                shaped_like(
                    {
                        "role": mostly(st.sampled_from(["user", "assistant"]), json_values(2)),
                        "content": mostly(st.lists(_BLOCKS, max_size=3), json_values(3)),
                    }
                ),
                max_size=3,
            ),
            json_values(3),
        ),
        "system": json_values(3),
        "tools": json_values(4),
        "tool_choice": json_values(3),
        "stop_sequences": json_values(3),
    }
)


@fuzz_settings(400)
@given(_BODIES)
def test_any_body_is_translated_or_refused_with_a_400(body: dict[str, Any]) -> None:
    """Fuzzed bodies: a chat request that validates again, or InvalidRequest; nothing else."""
    try:
        request = translate(body)
    except InvalidRequest as exc:
        assert exc.http_status == 400
        return
    assert msgspec.convert(chat_body(request), schema.ChatRequest) is not None
