"""The client's surface against a real gateway: the ``openai`` attribute paths, non-streamed
completions, tool calls, usage with cost, cancel on close, one socket for many requests, the
catalog; the synchronous ``Client`` and the ``AsyncClient`` on both transports."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tokenwire.testing import GatewayServer, sim_plan
from tokenwire.testing_proxy import CuttingProxy
from tokenwire_client import AsyncClient, Client, ModelNotFoundError

TRANSPORTS = pytest.mark.parametrize("transport", ["sse", "ws"])
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


@pytest.fixture(params=["sse", "ws"])
def client(request: pytest.FixtureRequest, sdk_gateway: GatewayServer) -> Iterator[Client]:
    """A synchronous client of the module's gateway, on each transport."""
    with Client(sdk_gateway.base_url, sdk_gateway.api_key, transport=request.param) as sync:
        yield sync


def test_chunks_read_like_openai_and_usage_carries_the_charge(
    client: Client, sdk_gateway: GatewayServer
) -> None:
    """chunk.choices[0].delta.content gives the simulator's tokens in order, the usage chunk comes when asked, stream.usage has the tokens and the charge the ledger recorded."""
    body = {"model": "priced-sim", "messages": [{"role": "user", "content": "paths"}]}
    with client.chat.completions.create(
        **body, max_tokens=8, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    plan = sim_plan({**body, "max_tokens": 8})
    contents = [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(t or "" for t in contents) == plan.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert {c.id for c in chunks} == {stream.stream_id}
    usage = stream.usage
    assert usage is not None and usage.completion_tokens == 8
    assert usage.prompt_tokens == plan.prompt_tokens
    assert usage.cost_micro == 3 * usage.prompt_tokens + 15 * 8  # $3 / $15 per 1M tokens
    assert stream.finish_reason == "length" and stream.finished
    rows = sdk_gateway.usage_rows(sdk_gateway.api_key, including=[str(stream.stream_id)])
    (row,) = [r for r in rows if r["completion_id"] == stream.stream_id]
    assert row["cost_micro"] == usage.cost_micro


def test_without_include_usage_no_usage_chunk_but_stream_usage_is_known(client: Client) -> None:
    """Like openai, no usage chunk unless asked; stream.usage is filled all the same; text_stream gives the text only."""
    messages = [{"role": "user", "content": "quiet"}]
    with client.chat.completions.create(
        model="sim", messages=messages, max_tokens=5, stream=True
    ) as stream:
        text = "".join(stream.text_stream)
    assert text == sim_plan({"model": "sim", "messages": messages, "max_tokens": 5}).text
    assert stream.usage is not None and stream.usage.completion_tokens == 5


def test_a_non_streamed_create_returns_the_whole_completion(client: Client) -> None:
    """stream=False returns a chat.completion: message content, finish reason, usage with cost."""
    messages = [{"role": "user", "content": "whole"}]
    completion = client.chat.completions.create(model="priced-sim", messages=messages, max_tokens=6)
    expected = sim_plan({"model": "sim", "messages": messages, "max_tokens": 6})
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.content == expected.text
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.cost_micro is not None
    assert completion.usage.cost_micro > 0


def test_streamed_tool_calls_have_openai_paths_and_add_up(client: Client) -> None:
    """A forced tool call streams as delta.tool_calls fragments; get_final_completion joins them."""
    body: dict[str, Any] = {
        "model": "sim",
        "messages": [{"role": "user", "content": "call a tool"}],
        "tools": TOOLS,
        "tool_choice": "required",
    }
    expected = sim_plan(body).tool_call
    assert expected is not None
    with client.chat.completions.create(**body, stream=True) as stream:
        completion = stream.get_final_completion()
    (call,) = completion.choices[0].message.tool_calls or []
    assert call.id == expected[0] and call.function.name == "lookup"
    assert call.function.arguments == "".join(expected[2])
    assert set(json.loads(call.function.arguments)) == {"query"}
    assert completion.choices[0].finish_reason == "tool_calls"


@TRANSPORTS
def test_close_cancels_the_generation_upstream(sdk_gateway: GatewayServer, transport: str) -> None:
    """Closing a stream after two chunks stops its generation: the ledger row says cancelled, billed for the prompt and the tokens made, and stream.usage says the same cost."""
    _, key = sdk_gateway.create_key(f"close-{transport}", credits_usd="1")
    messages = [{"role": "user", "content": "stop me"}]
    with Client(sdk_gateway.base_url, key, transport=transport) as client:
        stream = client.chat.completions.create(
            model="slow-sim", messages=messages, max_tokens=500, stream=True
        )
        next(stream)
        next(stream)
        stream.close()
    (row,) = sdk_gateway.usage_rows(key, 1)
    assert row["completion_id"] == stream.stream_id
    assert row["status"] == "cancelled" and row["finish_reason"] == "cancelled"
    assert 2 <= row["completion_tokens"] < 100  # stopped long before its 500 tokens
    # close() read the cancelled stream to its end: the client knows what it cost
    assert stream.finish_reason == "cancelled"
    assert stream.usage is not None and stream.usage.cost_micro == row["cost_micro"]


def test_models_list_and_retrieve(client: Client) -> None:
    """models.list() iterates the catalog with pricing; retrieve() of an unknown model raises the typed 404."""
    models = {m.id: m for m in client.models.list()}
    assert {"sim", "priced-sim"} <= set(models)
    assert models["priced-sim"].pricing
    assert client.models.retrieve("sim").id == "sim"
    with pytest.raises(ModelNotFoundError):
        client.models.retrieve("no-such-model")


async def test_a_ws_client_multiplexes_every_request_on_one_socket(
    sdk_gateway: GatewayServer,
) -> None:
    """40 concurrent streams of one AsyncClient (more than the gateway's 32 per socket: the rest wait their turn) travel on a single connection, each with its own exact text."""
    with CuttingProxy(sdk_gateway.port) as proxy:
        proxy.cutting = False
        async with AsyncClient(proxy.base_url, sdk_gateway.api_key, transport="ws") as client:

            async def one(n: int) -> tuple[str, str]:
                messages = [{"role": "user", "content": f"mux {n}"}]
                stream = await client.chat.completions.create(
                    model="sim", messages=messages, max_tokens=20, stream=True
                )
                async with stream:
                    text = "".join([t async for t in stream.text_stream])
                want = sim_plan({"model": "sim", "messages": messages, "max_tokens": 20}).text
                return text, want

            results = await asyncio.gather(*(one(n) for n in range(40)))
        assert proxy.connections == 1
    assert all(text == want for text, want in results)


@TRANSPORTS
async def test_an_async_create_interrupted_before_its_first_token_cancels_it(
    sdk_gateway: GatewayServer, transport: str
) -> None:
    """A create() cancelled while it waits for the first token (asyncio.timeout, a Ctrl-C) stops the generation upstream: its ledger row says cancelled."""
    _, key = sdk_gateway.create_key(f"interrupt-{transport}", credits_usd="1")
    async with AsyncClient(sdk_gateway.base_url, key, transport=transport) as client:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.chat.completions.create(
                    model="late-sim",
                    messages=[{"role": "user", "content": "never mind"}],
                    max_tokens=500,
                    stream=True,
                )
    (row,) = sdk_gateway.usage_rows(key, 1)
    assert row["status"] == "cancelled"


@TRANSPORTS
def test_closing_the_client_cancels_its_open_streams(
    sdk_gateway: GatewayServer, transport: str
) -> None:
    """A stream left open when its client closes is cancelled upstream, not left to run out its grace window."""
    _, key = sdk_gateway.create_key(f"client-close-{transport}", credits_usd="1")
    client = Client(sdk_gateway.base_url, key, transport=transport)
    stream = client.chat.completions.create(
        model="slow-sim",
        messages=[{"role": "user", "content": "left open"}],
        max_tokens=500,
        stream=True,
    )
    next(stream)
    client.close()
    (row,) = sdk_gateway.usage_rows(key, 1)
    assert row["completion_id"] == stream.stream_id and row["status"] == "cancelled"
