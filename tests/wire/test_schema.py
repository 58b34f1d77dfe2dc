"""Request decoding: what is accepted, and the param named when it is not."""

from __future__ import annotations

import json

import pytest

from tokenwire.errors import InvalidRequest
from tokenwire.wire.schema import AssistantMessage, UserMessage, content_text, decode_chat_request


def test_full_openai_request_decodes() -> None:
    """Every supported field decodes; unknown fields (vendor extensions) are ignored."""
    request = decode_chat_request(
        json.dumps(
            {
                "model": "sim",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "42"},
                ],
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_completion_tokens": 9,
                "max_tokens": 3,
                "stop": "\n",
                "temperature": 0.5,
                "top_p": 1,
                "n": 1,
                "user": "u",
                "seed": 4,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "auto",
                "reasoning_effort": "low",
            }
        ).encode()
    )
    assert request.include_usage
    assert request.output_limit == 9
    assert request.stop_sequences == ["\n"]
    assert isinstance(request.messages[1], UserMessage)
    assert content_text(request.messages[1].content) == "hi"
    assert isinstance(request.messages[2], AssistantMessage)


def test_error_names_nested_field() -> None:
    """A wrong type deep inside names its path the way OpenAI does."""
    with pytest.raises(InvalidRequest) as info:
        decode_chat_request(
            b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":1}]}]}'
        )
    assert info.value.param == "messages[0].content[0].text"
    assert info.value.http_status == 400
