"""Responses requests into Chat Completions terms, without I/O."""

from __future__ import annotations

from typing import Any

import pytest

from tokenwire.errors import InvalidRequest
from tokenwire.wire.responses_request import responses_request_from
from tokenwire.wire.schema import chat_request_from


def chat(body: dict[str, Any], history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    plan = responses_request_from(body)
    chat_body = plan.chat_body(history or [])
    chat_request_from(chat_body)  # the translation is always a valid chat body
    return chat_body


def test_string_input_with_instructions() -> None:
    """input as a string is one user turn; instructions come first as a system message."""
    assert chat({"model": "m", "input": "Hi", "instructions": "Be brief."})["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_items_become_messages_and_calls_join_one_assistant_turn() -> None:
    """Messages (type optional), consecutive function calls, their outputs as tool turns."""
    body = {
        "model": "m",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Checking."}],
            },
            {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "a", "output": "1"},
            {
                "type": "function_call_output",
                "call_id": "b",
                "output": [{"type": "input_text", "text": "2"}],
            },
        ],
    }
    messages = chat(body)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1]["content"] == [{"type": "text", "text": "Checking."}]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["a", "b"]
    assert messages[3] == {
        "role": "tool",
        "tool_call_id": "b",
        "content": [{"type": "text", "text": "2"}],
    }


def test_history_goes_between_instructions_and_the_new_input() -> None:
    """previous_response_id's conversation precedes this turn; instructions are this turn's."""
    history = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "one"}]
    messages = chat({"model": "m", "input": "2", "instructions": "I"}, history)["messages"]
    assert [m["content"] for m in messages] == ["I", "1", "one", "2"]


def test_tools_limits_sampling_and_formats_map_to_chat_fields() -> None:
    """Function tools, a named tool choice, max_output_tokens, reasoning effort, text format."""
    body = chat(
        {
            "model": "m",
            "input": "x",
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "max_output_tokens": 9,
            "temperature": 0.5,
            "top_p": 0.9,
            "reasoning": {"effort": "low"},
            "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
            "metadata": {"k": "v"},
        }
    )
    assert body["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["max_completion_tokens"] == 9 and body["reasoning_effort"] == "low"
    assert body["response_format"]["json_schema"]["name"] == "s"
    assert (body["temperature"], body["top_p"], body["metadata"]) == (0.5, 0.9, {"k": "v"})


def test_echo_fills_openai_defaults() -> None:
    """The response object's request fields: what was sent, else OpenAI's defaults."""
    echo = responses_request_from({"model": "m", "input": "x"}).echo
    assert echo["temperature"] == 1.0 and echo["top_p"] == 1.0 and echo["tool_choice"] == "auto"
    assert echo["store"] is True and echo["text"] == {"format": {"type": "text"}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "input": "x", "stream": True}, "stream"),
        ({"model": "m", "input": "x", "generate": True}, None),
        ({"model": "m", "input": "x", "generate": False}, "generate"),
        ({"model": "m", "input": "x", "background": True}, "background"),
    ],
)
def test_websocket_create_messages(body: dict[str, Any], param: str | None) -> None:
    """Over WebSocket stream is not sent (a 400 names it); generate false (no output) is
    refused, true passes."""
    if param is None:
        assert responses_request_from(body, websocket=True).stream is False
        return
    with pytest.raises(InvalidRequest) as refused:
        responses_request_from(body, websocket=True)
    assert refused.value.param == param
