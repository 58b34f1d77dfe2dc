"""What the Anthropic test modules share: the OpenAI requests of the golden files (one of them
also goes to the fake), the weather tool, and ``make_call``, which wraps a body in a ProviderCall.
"""

from __future__ import annotations

import json
from typing import Any

from tokenwire.providers.base import ProviderCall
from tokenwire.wire.schema import decode_chat_request

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
