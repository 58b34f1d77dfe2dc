"""Hypothesis over each provider's reply translator (OpenAI-compatible, Anthropic, Gemini).

Arbitrary text and arbitrary JSON as the ``data`` of upstream SSE events, fed one after the
other into one translator, then the end of the body: every outcome is a list of well-formed
events or a :class:`~tokenwire.errors.GatewayError`. (``msgspec.DecodeError`` is the
translators' documented signal for a malformed event; ``stream_events`` turns it into an
``UpstreamError``, as it does a ``RecursionError`` from a reply nested too deeply.) Events must be sane for what
reads them: token counts that fit the ledger's 32-bit columns and are not negative (a
negative count would be a refund paid by the upstream), tool-call indexes from 0.

CI budget (derandomized): per provider 200 sequences of arbitrary JSON, 200 of event-shaped
JSON and 150 of arbitrary text, each up to 6 events. ``TOKENWIRE_FUZZ_SCALE`` multiplies them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwire.errors import GatewayError
from tokenwire.providers.anthropic import StreamTranslator
from tokenwire.providers.gemini import GeminiStream
from tokenwire.providers.http import EventTranslator
from tokenwire.providers.openai_compat import ChunkTranslator
from tokenwire.streams.events import Event, Finish, PromptUsage, TextDelta, ToolCallDelta, Usage
from tokenwire.testing_fuzz import fuzz_settings, json_values, shaped_like

MAX_TOKENS = 2**31 - 1
FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter"}


def check_event(event: Event) -> None:
    """An event the gateway can encode and bill."""
    if isinstance(event, TextDelta):
        assert isinstance(event.text, str) and event.text
    elif isinstance(event, ToolCallDelta):
        assert isinstance(event.index, int) and 0 <= event.index <= MAX_TOKENS
        assert event.id is None or isinstance(event.id, str)
        assert event.name is None or isinstance(event.name, str)
        assert isinstance(event.arguments, str)
    elif isinstance(event, Usage):
        assert 0 <= event.prompt_tokens <= MAX_TOKENS
        assert 0 <= event.completion_tokens <= MAX_TOKENS
    elif isinstance(event, PromptUsage):
        assert 0 <= event.prompt_tokens <= MAX_TOKENS
    elif isinstance(event, Finish):
        assert event.reason in FINISH_REASONS
    else:  # pragma: no cover - a translator yields only the five kinds above
        raise AssertionError(f"unexpected event {event!r}")
    msgspec.json.encode(event)  # the stream log's codec can carry it


def run(translator: EventTranslator, datas: list[str]) -> list[Event] | Exception:
    """Feed every data string then end the body; the events, or the first documented error."""
    events: list[Event] = []
    try:
        for data in datas:
            if translator.done:
                break
            events.extend(translator.feed(data))
        if not translator.done:
            events.extend(translator.end())
    except (GatewayError, msgspec.DecodeError) as exc:
        return exc
    finally:
        for event in events:  # those before an error too: they reach the client first
            check_event(event)
    return events


TRANSLATORS: dict[str, Callable[[], EventTranslator]] = {
    "openai": lambda: ChunkTranslator("up"),
    "anthropic": lambda: StreamTranslator("up"),
    "gemini": lambda: GeminiStream("up"),
}

counts = st.integers() | st.integers(0, 100)
OPENAI = shaped_like(
    {
        "choices": st.lists(
            shaped_like(
                {
                    "delta": shaped_like(
                        {
                            "content": st.text(max_size=5),
                            "tool_calls": st.lists(
                                shaped_like(
                                    {
                                        "index": st.integers(),
                                        "id": st.text(max_size=5),
                                        "function": shaped_like(
                                            {"name": st.text(), "arguments": st.text()}
                                        ),
                                    }
                                ),
                                max_size=2,
                            ),
                        }
                    ),
                    "finish_reason": st.sampled_from(["stop", "length", "tool_calls", "x"]),
                }
            ),
            max_size=2,
        ),
        "usage": shaped_like({"prompt_tokens": counts, "completion_tokens": counts}),
        "error": shaped_like({"message": st.text(max_size=5)}),
    }
)
ANTHROPIC = shaped_like(
    {
        "type": st.sampled_from(
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
                "ping",
                "error",
            ]
        ),
        "index": st.integers(),
        "message": shaped_like(
            {"usage": shaped_like({"input_tokens": counts, "output_tokens": counts})}
        ),
        "content_block": shaped_like(
            {
                "type": st.sampled_from(["text", "tool_use", "thinking"]),
                "id": st.text(max_size=4),
                "name": st.text(max_size=4),
                "text": st.text(max_size=4),
            }
        ),
        "delta": shaped_like(
            {
                "type": st.sampled_from(["text_delta", "input_json_delta"]),
                "text": st.text(max_size=4),
                "partial_json": st.text(max_size=4),
                "stop_reason": st.sampled_from(["end_turn", "max_tokens", "tool_use", "x"]),
            }
        ),
        "usage": shaped_like(
            {
                "output_tokens": counts,
                "input_tokens": counts,
                "cache_read_input_tokens": counts,
            }
        ),
        "error": shaped_like({"type": st.sampled_from(["overloaded_error", "x"])}),
    }
)
GEMINI = shaped_like(
    {
        "candidates": st.lists(
            shaped_like(
                {
                    "content": shaped_like(
                        {
                            "parts": st.lists(
                                shaped_like(
                                    {
                                        "text": st.text(max_size=4),
                                        "thought": st.booleans(),
                                        "functionCall": shaped_like(
                                            {"name": st.text(max_size=4), "args": json_values(6)}
                                        ),
                                    }
                                ),
                                max_size=2,
                            )
                        }
                    ),
                    "finishReason": st.sampled_from(["STOP", "MAX_TOKENS", "SAFETY", "x"]),
                }
            ),
            max_size=2,
        ),
        "usageMetadata": shaped_like(
            {
                "promptTokenCount": counts,
                "candidatesTokenCount": counts,
                "thoughtsTokenCount": counts,
            }
        ),
        "promptFeedback": shaped_like({"blockReason": st.text(max_size=4)}),
        "error": shaped_like({"code": st.integers(), "message": st.text(max_size=4)}),
    }
)
SHAPED = {"openai": OPENAI, "anthropic": ANTHROPIC, "gemini": GEMINI}
PROVIDERS = sorted(TRANSLATORS)


def as_data(values: list[Any]) -> list[str]:
    return [msgspec.json.encode(value).decode() for value in values]


@pytest.mark.parametrize("provider", PROVIDERS)
@fuzz_settings(200)
@given(data=st.data())
def test_arbitrary_json_gives_events_or_a_gateway_error(provider: str, data: st.DataObject) -> None:
    """Any JSON values as event data end in sane events or a GatewayError / DecodeError."""
    values = data.draw(st.lists(json_values(), max_size=6))
    run(TRANSLATORS[provider](), as_data(values))


@pytest.mark.parametrize("provider", PROVIDERS)
@fuzz_settings(200)
@given(data=st.data())
def test_event_shaped_json_gives_events_or_a_gateway_error(
    provider: str, data: st.DataObject
) -> None:
    """JSON shaped like the provider's own events (with wrong types and values mixed in) too."""
    values = data.draw(st.lists(SHAPED[provider], max_size=6))
    run(TRANSLATORS[provider](), as_data(values))


@pytest.mark.parametrize("provider", PROVIDERS)
@fuzz_settings(150)
@given(data=st.data())
def test_arbitrary_text_gives_events_or_a_gateway_error(provider: str, data: st.DataObject) -> None:
    """Arbitrary strings (not JSON, [DONE], half objects) as event data too."""
    texts = data.draw(
        st.lists(st.text(max_size=30) | st.sampled_from(["[DONE]", "{", "null", "[]"]), max_size=6)
    )
    run(TRANSLATORS[provider](), texts)


IMPOSSIBLE_USAGE = {
    "openai": ['{"choices": [], "usage": {"prompt_tokens": -5, "completion_tokens": 1}}'],
    "openai-huge": [
        '{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 4294967296}}'
    ],
    "openai-index": ['{"choices": [{"delta": {"tool_calls": [{"index": -3, "id": "c"}]}}]}'],
    "anthropic": [
        '{"type": "message_start", "message": {"usage": {"input_tokens": -7}}}',
        '{"type": "message_stop"}',
    ],
    "gemini": [
        '{"candidates": [{"finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": -9}}'
    ],
    "gemini-sum": [
        '{"candidates": [{"finishReason": "STOP"}], "usageMetadata": '
        '{"candidatesTokenCount": 2147483647, "thoughtsTokenCount": 2147483647}}'
    ],
}


@pytest.mark.parametrize("case", sorted(IMPOSSIBLE_USAGE))
def test_impossible_counts_are_a_malformed_reply(case: str) -> None:
    """Negative or over-32-bit token counts, and negative tool indexes, are refused, not billed (found by the fuzzer)."""
    translator = TRANSLATORS[case.split("-")[0]]()
    outcome = run(translator, IMPOSSIBLE_USAGE[case])
    assert isinstance(outcome, GatewayError | msgspec.DecodeError), outcome
