"""The simulator: deterministic text, exact lengths, stop sequences, tool calls, timing."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwire.providers.base import ProviderCall
from tokenwire.providers.sim import DEFAULT_TOKENS, SimProvider, plan
from tokenwire.streams.events import Finish, TextDelta, ToolCallDelta, Usage
from tokenwire.wire.schema import decode_chat_request


def req(**fields: object) -> bytes:
    return json.dumps(
        {"model": "sim", "messages": [{"role": "user", "content": "hello there"}], **fields}
    ).encode()


def test_same_request_same_text_other_request_other_text() -> None:
    """The text depends only on the request (messages and seed)."""
    a = plan(decode_chat_request(req()))
    assert a == plan(decode_chat_request(req()))
    assert a.text != plan(decode_chat_request(req(seed=1))).text
    assert len(a.tokens) == DEFAULT_TOKENS and a.finish_reason == "stop"
    assert a.prompt_tokens == 4 + 2


def test_max_tokens_gives_exactly_that_many_and_length() -> None:
    """With max_tokens=N the simulator emits N tokens and finishes with 'length'."""
    p = plan(decode_chat_request(req(max_tokens=37)))
    assert len(p.tokens) == 37 and p.finish_reason == "length" and p.completion_tokens == 37


def test_stop_sequence_cuts_before_it() -> None:
    """The output stops right before the first occurrence of a stop sequence."""
    full = plan(decode_chat_request(req(max_tokens=30))).text
    stop = full.split(" ")[5]
    cut = plan(decode_chat_request(req(max_tokens=30, stop=[stop])))
    assert cut.text == full[: full.find(stop)]
    assert stop not in cut.text and cut.finish_reason == "stop"


async def test_provider_streams_the_plan() -> None:
    """SimProvider yields the plan's tokens, exact usage, then finish."""
    request = decode_chat_request(req(max_tokens=3))
    provider = SimProvider("sim", ttft_ms=0, itl_ms=0)
    events = [e async for e in provider.stream(ProviderCall(request, "sim", {}))]
    expected = plan(request)
    assert events[:3] == [TextDelta(t) for t in expected.tokens]
    assert events[3:] == [Usage(expected.prompt_tokens, 3), Finish("length")]


async def test_forced_tool_choice_emits_a_tool_call() -> None:
    """tool_choice 'required' makes the simulator call the first tool with JSON arguments."""
    request = decode_chat_request(
        req(tools=[{"type": "function", "function": {"name": "lookup"}}], tool_choice="required")
    )
    provider = SimProvider("sim", ttft_ms=0, itl_ms=0)
    events = [e async for e in provider.stream(ProviderCall(request, "sim", {}))]
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert calls[0].name == "lookup" and calls[0].id
    assert json.loads("".join(c.arguments for c in calls))["query"]
    assert events[-1] == Finish("tool_calls")


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(data=st.data(), max_tokens=st.integers(1, 60))
def test_stop_sequences_cut_exactly_where_the_whole_text_would(
    data: st.DataObject, max_tokens: int
) -> None:
    """Released token by token, the answer is the whole text cut before the earliest stop
    sequence (one that starts later but completes first does not win), or all of it."""
    full = plan(decode_chat_request(req(max_tokens=max_tokens))).text
    stops = data.draw(
        st.lists(
            st.one_of(
                st.integers(0, len(full) - 1).flatmap(
                    lambda a: st.integers(a + 1, min(len(full), a + 12)).map(lambda b: full[a:b])
                ),
                st.text(alphabet="xyz ", min_size=1, max_size=4),
            ),
            min_size=1,
            max_size=4,
        )
    )
    cut = plan(decode_chat_request(req(max_tokens=max_tokens, stop=stops)))
    found = [full.find(s) for s in stops if s in full]
    if found:
        assert (cut.text, cut.finish_reason) == (full[: min(found)], "stop")
    else:
        assert (cut.text, cut.finish_reason) == (full, "length")
