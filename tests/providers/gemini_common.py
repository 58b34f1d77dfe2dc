"""What the Gemini test modules share: the model and tools of the requests, ``call_for`` and
``chat``, which build a ProviderCall and a one-message chat body, and ``reply``, the fake's
first tokens.
"""

from __future__ import annotations

import json
from typing import Any

from tokenwire.providers.base import ProviderCall
from tokenwire.testing_upstreams.gemini_fake import REPLY_TOKENS
from tokenwire.wire.schema import decode_chat_request

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


def call_for(body: dict[str, Any], upstream_model: str = MODEL) -> ProviderCall:
    """A ProviderCall for an OpenAI chat body."""
    return ProviderCall(decode_chat_request(json.dumps(body).encode()), upstream_model, body)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    """A one-message chat body."""
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def reply(count: int) -> str:
    """The fake's first ``count`` tokens."""
    return "".join(REPLY_TOKENS[:count])
