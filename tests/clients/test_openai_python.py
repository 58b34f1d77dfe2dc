"""The official ``openai`` Python SDK (sync and async) against a live gateway, model ``sim``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tokenwire.providers.sim import SimPlan, plan
from tokenwire.testing import GatewayServer
from tokenwire.wire.schema import decode_chat_request

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Tell me something about streaming gateways"},
]
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


def expected(body: dict[str, Any]) -> SimPlan:
    """What the simulator emits for exactly this request body."""
    return plan(decode_chat_request(json.dumps(body).encode()))


def request_body(**extra: Any) -> dict[str, Any]:
    """A chat request for ``sim`` with ``MESSAGES`` and the given extra fields."""
    return {"model": "sim", "messages": MESSAGES, **extra}


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[openai.OpenAI]:
    """A sync SDK client pointed at the gateway, without retries."""
    with openai.OpenAI(
        base_url=gateway.base_url + "/v1", api_key=gateway.api_key, max_retries=0, timeout=10
    ) as sdk:
        yield sdk


@pytest.fixture
async def aclient(gateway: GatewayServer) -> AsyncIterator[openai.AsyncOpenAI]:
    """An async SDK client pointed at the gateway, without retries."""
    async with openai.AsyncOpenAI(
        base_url=gateway.base_url + "/v1", api_key=gateway.api_key, max_retries=0, timeout=10
    ) as sdk:
        yield sdk


def check_completion(completion: ChatCompletion, sim: SimPlan) -> None:
    """A non-streamed completion carries the plan's text, finish reason and usage."""
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "sim"
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == sim.text
    assert choice.message.tool_calls is None
    assert choice.finish_reason == sim.finish_reason
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == sim.prompt_tokens
    assert completion.usage.completion_tokens == sim.completion_tokens
    assert completion.usage.total_tokens == sim.prompt_tokens + sim.completion_tokens


def check_chunks(chunks: list[ChatCompletionChunk], sim: SimPlan, *, include_usage: bool) -> None:
    """Streamed chunks: one id, role first, the plan's text, one finish, usage iff asked."""
    assert chunks, "the stream yielded no chunks"
    first = chunks[0]
    assert first.id.startswith("chatcmpl-")
    assert {c.id for c in chunks} == {first.id}
    assert {c.created for c in chunks} == {first.created}
    assert {c.model for c in chunks} == {"sim"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    choice_chunks = [c for c in chunks if c.choices]
    assert choice_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in choice_chunks[1:])
    contents = [c.choices[0].delta.content for c in choice_chunks if c.choices[0].delta.content]
    assert "".join(contents) == sim.text
    assert list(contents) == list(sim.tokens)
    finishes = [c.choices[0].finish_reason for c in choice_chunks if c.choices[0].finish_reason]
    assert finishes == [sim.finish_reason]
    assert choice_chunks[-1].choices[0].finish_reason == sim.finish_reason
    if include_usage:
        usage_chunk = chunks[-1]
        assert usage_chunk.choices == []
        assert usage_chunk.usage is not None
        assert usage_chunk.usage.prompt_tokens == sim.prompt_tokens
        assert usage_chunk.usage.completion_tokens == sim.completion_tokens
        assert usage_chunk.usage.total_tokens == sim.prompt_tokens + sim.completion_tokens
        assert all(c.usage is None for c in chunks[:-1])
        assert len(choice_chunks) == len(chunks) - 1
    else:
        assert all(c.usage is None for c in chunks)
        assert len(choice_chunks) == len(chunks)


# -- plain completions ----------------------------------------------------------------------


def test_sync_non_streaming(client: openai.OpenAI) -> None:
    """A sync non-streamed completion has the simulator's text, 'stop' and exact usage."""
    body = request_body()
    completion = client.chat.completions.create(**body)
    sim = expected(body)
    assert sim.finish_reason == "stop"
    check_completion(completion, sim)


@pytest.mark.parametrize("include_usage", [True, False])
def test_sync_streaming(client: openai.OpenAI, include_usage: bool) -> None:
    """A sync stream has consistent ids, the sim's text, one finish, usage only when asked."""
    body = request_body(stream=True, stream_options={"include_usage": include_usage})
    with client.chat.completions.create(**body) as stream:
        chunks = list(stream)
    check_chunks(chunks, expected(body), include_usage=include_usage)


def test_sync_streaming_without_stream_options(client: openai.OpenAI) -> None:
    """A sync stream with no stream_options at all carries no usage chunk."""
    body = request_body(stream=True)
    with client.chat.completions.create(**body) as stream:
        chunks = list(stream)
    check_chunks(chunks, expected(body), include_usage=False)


async def test_async_non_streaming(aclient: openai.AsyncOpenAI) -> None:
    """An async non-streamed completion has the simulator's text, 'stop' and exact usage."""
    body = request_body(seed=7)
    completion = await aclient.chat.completions.create(**body)
    check_completion(completion, expected(body))


@pytest.mark.parametrize("include_usage", [True, False])
async def test_async_streaming(aclient: openai.AsyncOpenAI, include_usage: bool) -> None:
    """An async stream has consistent ids, the sim's text, one finish, usage only when asked."""
    body = request_body(seed=11, stream=True, stream_options={"include_usage": include_usage})
    stream = await aclient.chat.completions.create(**body)
    async with stream:
        chunks = [chunk async for chunk in stream]
    check_chunks(chunks, expected(body), include_usage=include_usage)


def test_seed_changes_the_text(client: openai.OpenAI) -> None:
    """The text really depends on the request (so matching plan() is not a coincidence)."""
    a = client.chat.completions.create(**request_body(seed=1))
    b = client.chat.completions.create(**request_body(seed=2))
    assert a.choices[0].message.content == expected(request_body(seed=1)).text
    assert b.choices[0].message.content == expected(request_body(seed=2)).text
    assert a.choices[0].message.content != b.choices[0].message.content


# -- limits and stop sequences --------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_token_limit_non_streaming(client: openai.OpenAI, field: str) -> None:
    """A token limit ends the completion with 'length' after exactly that many tokens."""
    body = request_body(**{field: 5})
    completion = client.chat.completions.create(**body)
    sim = expected(body)
    assert len(sim.tokens) == 5
    check_completion(completion, sim)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5


@pytest.mark.parametrize("limit", [1, 3, 24])
async def test_token_limit_streaming(aclient: openai.AsyncOpenAI, limit: int) -> None:
    """A streamed completion with max_tokens has exactly that many content chunks, 'length'."""
    body = request_body(max_tokens=limit, stream=True, stream_options={"include_usage": True})
    stream = await aclient.chat.completions.create(**body)
    async with stream:
        chunks = [chunk async for chunk in stream]
    sim = expected(body)
    check_chunks(chunks, sim, include_usage=True)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == limit
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == limit


def _stop_word(body: dict[str, Any]) -> str:
    """A stop sequence that occurs in the middle of the unconstrained text."""
    full = expected(body)
    stop = full.tokens[5]  # " word": a whole later token, leading space included
    assert stop in full.text
    return stop


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_non_streaming(client: openai.OpenAI, as_list: bool) -> None:
    """A stop sequence cuts the text right before its first occurrence, finish 'stop'."""
    base = request_body(seed=3)
    full_text = expected(base).text
    stop = _stop_word(base)
    body = request_body(seed=3, stop=[stop, "\u2603never"] if as_list else stop)
    completion = client.chat.completions.create(**body)
    text = completion.choices[0].message.content
    assert text == full_text[: full_text.find(stop)]
    assert stop not in (text or "")
    assert len(text or "") < len(full_text)
    check_completion(completion, expected(body))
    assert completion.choices[0].finish_reason == "stop"


def test_stop_streaming(client: openai.OpenAI) -> None:
    """A streamed completion with a stop sequence never sends the stop text or what follows."""
    base = request_body(seed=4)
    full_text = expected(base).text
    stop = _stop_word(base)
    body = request_body(seed=4, stop=stop, stream=True, stream_options={"include_usage": True})
    with client.chat.completions.create(**body) as stream:
        chunks = list(stream)
    sim = expected(body)
    check_chunks(chunks, sim, include_usage=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full_text[: full_text.find(stop)]
    assert sim.finish_reason == "stop"


# -- models ---------------------------------------------------------------------------------


def test_models_list(client: openai.OpenAI) -> None:
    """models.list() includes 'sim', available, with a pricing extra (the caller's plan's
    prices) the SDK keeps."""
    models = {m.id: m for m in client.models.list()}
    assert "sim" in models
    sim = models["sim"]
    assert sim.object == "model"
    assert sim.owned_by == "sim"
    extra = sim.model_extra or {}
    assert extra["available"] is True
    pricing = extra["pricing"]
    prices = {
        "input_usd_per_mtok",
        "output_usd_per_mtok",
        "cache_write_usd_per_mtok",
        "cache_read_usd_per_mtok",
    }
    assert set(pricing) == prices | {"plan", "flat"}
    assert pricing["plan"] == "standard"  # the caller's plan: the default one
    assert all(isinstance(pricing[k], int | float) and pricing[k] >= 0 for k in prices)
    assert all("pricing" in (m.model_extra or {}) for m in models.values())


async def test_models_retrieve(aclient: openai.AsyncOpenAI, client: openai.OpenAI) -> None:
    """models.retrieve('sim') returns the model, sync and async, with its pricing."""
    model = client.models.retrieve("sim")
    amodel = await aclient.models.retrieve("sim")
    for m in (model, amodel):
        assert m.id == "sim"
        assert m.object == "model"
        assert "pricing" in (m.model_extra or {})


def test_models_retrieve_unknown(client: openai.OpenAI) -> None:
    """models.retrieve() of an unknown id raises NotFoundError with code model_not_found."""
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


# -- errors ---------------------------------------------------------------------------------


def test_wrong_key_is_authentication_error(gateway: GatewayServer) -> None:
    """A wrong key raises AuthenticationError (401) for chat and for models."""
    with openai.OpenAI(
        base_url=gateway.base_url + "/v1", api_key="tw-wrong-key", max_retries=0, timeout=10
    ) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(**request_body())
        assert info.value.status_code == 401
        assert info.value.type == "authentication_error"
        assert info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError) as models_info:
            bad.models.list()
        assert models_info.value.status_code == 401


async def test_wrong_key_async_streaming(gateway: GatewayServer) -> None:
    """A wrong key on an async streamed request raises AuthenticationError before any chunk."""
    async with openai.AsyncOpenAI(
        base_url=gateway.base_url + "/v1", api_key="tw-wrong-key", max_retries=0, timeout=10
    ) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.chat.completions.create(**request_body(stream=True))
        assert info.value.status_code == 401


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_not_found(client: openai.OpenAI, stream: bool) -> None:
    """An unknown model raises NotFoundError with code model_not_found and param 'model'."""
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, stream=stream)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"messages": []}, "messages"),
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_body_is_bad_request(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    """An invalid body raises BadRequestError (400) naming the offending parameter."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{**request_body(), **extra})
    assert info.value.status_code == 400
    assert info.value.type == "invalid_request_error"
    assert info.value.param == param


def test_bad_message_role_is_bad_request(client: openai.OpenAI) -> None:
    """A message with an unknown role raises BadRequestError pointing into messages."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="sim",
            messages=[{"role": "wizard", "content": "hi"}],  # type: ignore[list-item,misc]
        )
    assert info.value.status_code == 400
    assert str(info.value.param).startswith("messages")


# -- tool calls -----------------------------------------------------------------------------


def check_tool_call(call: Any, sim: SimPlan) -> None:
    """An assembled tool call matches the simulator's: id, name, JSON arguments."""
    assert sim.tool_call is not None
    call_id, name, fragments = sim.tool_call
    assert call.type == "function"
    assert call.id == call_id
    assert call.function.name == name == "lookup"
    assert call.function.arguments == "".join(fragments)
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"query"}
    assert isinstance(arguments["query"], str)
    assert arguments["query"]


def test_tool_call_non_streaming(client: openai.OpenAI) -> None:
    """tool_choice='required' yields one assembled tool call, finish 'tool_calls'."""
    body = request_body(tools=TOOLS, tool_choice="required")
    completion = client.chat.completions.create(**body)
    sim = expected(body)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    assert len(choice.message.tool_calls) == 1
    check_tool_call(choice.message.tool_calls[0], sim)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == sim.prompt_tokens
    assert completion.usage.completion_tokens == sim.completion_tokens


def test_tool_call_named_choice(client: openai.OpenAI) -> None:
    """tool_choice naming the function forces the same kind of tool call."""
    body = request_body(
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "lookup"}}
    )
    completion = client.chat.completions.create(**body)
    assert completion.choices[0].finish_reason == "tool_calls"
    calls = completion.choices[0].message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    check_tool_call(calls[0], expected(body))


def test_tool_call_streaming_helper(client: openai.OpenAI) -> None:
    """The SDK's stream helper assembles the streamed tool call; finish 'tool_calls'."""
    body = request_body(tools=TOOLS, tool_choice="required")
    sim = expected(body)
    assert sim.tool_call is not None
    done_events = []
    with client.chat.completions.stream(**body, stream_options={"include_usage": True}) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.done":
                done_events.append(event)
        final = stream.get_final_completion()
    assert len(done_events) == 1
    assert done_events[0].name == "lookup"
    assert json.loads(done_events[0].arguments) == json.loads("".join(sim.tool_call[2]))
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    assert len(choice.message.tool_calls) == 1
    check_tool_call(choice.message.tool_calls[0], sim)
    assert final.usage is not None
    assert final.usage.completion_tokens == sim.completion_tokens


async def test_tool_call_streaming_raw_chunks(aclient: openai.AsyncOpenAI) -> None:
    """Raw streamed tool-call chunks: id and name once, argument fragments that join to JSON."""
    body = request_body(tools=TOOLS, tool_choice="required", stream=True)
    stream = await aclient.chat.completions.create(**body)
    async with stream:
        chunks = [chunk async for chunk in stream]
    sim = expected(body)
    assert sim.tool_call is not None
    assert {c.id for c in chunks} == {chunks[0].id}
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [d.function.arguments for d in deltas if d.function] == list(sim.tool_call[2])
    assert [d.id for d in deltas if d.id] == [sim.tool_call[0]]
    assert [d.function.name for d in deltas if d.function and d.function.name] == ["lookup"]
    assert {d.index for d in deltas} == {0}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not c.choices[0].delta.content for c in chunks if c.choices)


async def test_tool_call_async_streaming_helper(aclient: openai.AsyncOpenAI) -> None:
    """The async stream helper assembles the tool call as well."""
    body = request_body(tools=TOOLS, tool_choice="required", seed=5)
    async with aclient.chat.completions.stream(**body) as stream:
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    assert len(choice.message.tool_calls) == 1
    check_tool_call(choice.message.tool_calls[0], expected(body))


def test_resumable_stream_reads_in_the_sdk(client: openai.OpenAI) -> None:
    """A resumable stream starts with a retry line; the SDK reads it as part of the first
    event (a block holding only retry: would be an event without data, which it cannot read)."""
    stream = client.chat.completions.create(
        **request_body(), stream=True, extra_headers={"X-Tokenwire-Resumable": "true"}
    )
    chunks = list(stream)
    check_chunks(chunks, expected(request_body()), include_usage=False)
