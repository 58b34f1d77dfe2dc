"""A completion record to observe and log, with any field changed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tokenwire.observability.records import CompletionRecord
from tokenwire.streams.events import Routed

RecordFactory = Callable[..., CompletionRecord]


@pytest.fixture
def completion() -> RecordFactory:
    """``completion(**changes)``: a completed SSE completion of model ``m`` on provider ``p``."""

    def make(**changes: Any) -> CompletionRecord:
        values: dict[str, Any] = {
            "completion_id": "chatcmpl-1",
            "key_id": "key_1",
            "model": "m",
            "provider": "p",
            "transport": "sse",
            "api": "chat",
            "outcome": "completed",
            "finish_reason": "stop",
            "error_code": None,
            "error_status": None,
            "ttft_s": 0.04,
            "itl_s": 0.012,
            "duration_s": 0.5,
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "usage_estimated": False,
            "cost_micro": 330,
            "charge_micro": 500,
            "client": "127.0.0.1",
            "attempts": (Routed("p", "up"),),
        }
        values.update(changes)
        return CompletionRecord(**values)

    return make
