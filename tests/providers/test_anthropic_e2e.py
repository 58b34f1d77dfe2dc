"""Anthropic end to end: the openai SDK against a real gateway whose ``anthropic`` provider is the
loopback fake. Streamed text and usage, an aggregated tool call, errors before and after the
first token, a client hang-up cancelling the upstream request, a cancelled stream billed for
the prompt Anthropic reported, and cache tokens metered and priced apart.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests
from tests.providers.anthropic_common import WEATHER_TOOL

from tokenwire.accounting.budget import estimate_prompt_tokens
from tokenwire.accounting.ledger import LedgerRow
from tokenwire.testing import GatewayServer
from tokenwire.testing_upstreams.anthropic_fake import AnthropicFake, plan_reply
from tokenwire.wire.schema import decode_chat_request


@pytest.fixture(scope="module")
def gateway_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayServer, AnthropicFake]]:
    with AnthropicFake(api_key="test-key") as fake:
        overrides = f"""
[providers.anthropic]
kind = "anthropic"
base_url = "{fake.base_url}"
api_key_env = "ANTHROPIC_API_KEY"
first_token_timeout_s = 5.0
idle_timeout_s = 5.0

[plans.cached.models."claude-sonnet-4.5"]
input_usd_per_mtok = "6.00"
output_usd_per_mtok = "30.00"
cache_write_usd_per_mtok = "7.50"
cache_read_usd_per_mtok = "0.60"
"""
        env = {"ANTHROPIC_API_KEY": "test-key"}
        with GatewayServer(
            tmp_path_factory.mktemp("anthropic"), overrides=overrides, env=env
        ) as gateway:
            yield gateway, fake


TOOLS: Any = [WEATHER_TOOL]


def sdk(gateway: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.base_url + "/v1", api_key=gateway.api_key, max_retries=0, timeout=20
    )


def test_gateway_streams_the_fake_text(gateway_pair: tuple[GatewayServer, AnthropicFake]) -> None:
    """The openai SDK streams claude-sonnet-4.5 through the gateway: the fake's echo and usage."""
    gateway, fake = gateway_pair
    stream = sdk(gateway).chat.completions.create(
        model="claude-sonnet-4.5",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "stream me please"},
        ],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: stream me please"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    received = fake.requests[-1]
    assert received.body["model"] == "claude-sonnet-4-5" and received.body["system"] == "Be brief."
    assert received.headers["x-api-key"] == "test-key"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 4
    assert usage.prompt_tokens == plan_reply(received.body).input_tokens


def test_gateway_aggregates_a_tool_call(gateway_pair: tuple[GatewayServer, AnthropicFake]) -> None:
    """A non-streaming request gets the streamed tool call as one message with parsed arguments."""
    gateway, _ = gateway_pair
    completion = sdk(gateway).chat.completions.create(
        model="claude-sonnet-4.5",
        messages=[{"role": "user", "content": "Rome"}],
        tools=TOOLS,
        tool_choice="required",
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Rome"}


def test_gateway_reports_errors_before_and_after_the_first_token(
    gateway_pair: tuple[GatewayServer, AnthropicFake],
) -> None:
    """Overloaded before the first token is an HTTP 529; an error event after it ends the stream in-band."""
    gateway, _ = gateway_pair
    client = sdk(gateway)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="claude-sonnet-4.5", messages=[{"role": "user", "content": "x [[fault:529]]"}]
        )
    assert info.value.status_code == 529
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="claude-sonnet-4.5",
            messages=[{"role": "user", "content": "x"}],
            presence_penalty=1,
        )
    assert bad.value.body["param"] == "presence_penalty"  # type: ignore[index]
    text = ""
    stream = client.chat.completions.create(
        model="claude-sonnet-4.5",
        messages=[{"role": "user", "content": "a b [[fault:error:2]]"}],
        stream=True,
    )
    with pytest.raises(openai.APIError):
        for chunk in stream:
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert text == "Echo: a"


def test_gateway_client_hangup_closes_the_upstream(
    gateway_pair: tuple[GatewayServer, AnthropicFake],
) -> None:
    """A streaming client that leaves mid-stream cancels the Anthropic request."""
    gateway, fake = gateway_pair
    before = fake.stats.streams_cancelled
    stream = sdk(gateway).chat.completions.create(
        model="claude-sonnet-4.5",
        messages=[{"role": "user", "content": "go [[fault:stall:1]]"}],
        stream=True,
    )
    text = ""
    for chunk in stream:
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        if text:
            break
    assert text == "Echo:"
    stream.close()
    end = time.monotonic() + 5
    while fake.stats.streams_cancelled == before and time.monotonic() < end:
        time.sleep(0.01)
    assert fake.stats.streams_cancelled == before + 1


def test_a_cancelled_stream_bills_the_prompt_anthropic_reported(
    gateway_pair: tuple[GatewayServer, AnthropicFake],
) -> None:
    """A stream the client leaves after message_start is billed for the input tokens Anthropic
    reported there, not the gateway's estimate, plus the tokens streamed."""
    gateway, fake = gateway_pair
    content = "count these words for the bill please [[fault:stall:1]]"
    stream = sdk(gateway).chat.completions.create(
        model="claude-sonnet-4.5", messages=[{"role": "user", "content": content}], stream=True
    )
    stream_id = ""
    for chunk in stream:
        stream_id = chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    reported = plan_reply(fake.requests[-1].body).input_tokens

    async def row() -> LedgerRow | None:
        rows = await gateway.state.ledger.rows(key_id=gateway.api_key_id, limit=50)
        return next((r for r in rows if r.completion_id == stream_id), None)

    deadline = time.monotonic() + 10
    found = None
    while found is None and time.monotonic() < deadline:
        found = asyncio.run_coroutine_threadsafe(row(), gateway.loop_of_server()).result()
        time.sleep(0.01)
    assert found is not None and found.status == "client_disconnected"
    estimate = estimate_prompt_tokens(
        decode_chat_request(
            json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()
        )
    )
    assert reported != estimate  # otherwise this test could not tell them apart
    assert (found.prompt_tokens, found.completion_tokens) == (reported, 1)
    assert found.usage_estimated


def _settled_usage(gateway: GatewayServer, key: str, completion_id: str) -> dict[str, Any]:
    """The key's /v1/usage row of ``completion_id``, once it is settled."""
    deadline = time.monotonic() + 10
    while True:
        rows = requests.get(
            gateway.base_url + "/v1/usage",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        ).json()["data"]
        found = [r for r in rows if r["completion_id"] == completion_id]
        if found or time.monotonic() > deadline:
            assert found, rows
            row: dict[str, Any] = found[0]
            return row
        time.sleep(0.01)


def test_cache_tokens_are_metered_and_priced_as_such(
    gateway_pair: tuple[GatewayServer, AnthropicFake],
) -> None:
    """Anthropic reports 2,000 prompt tokens written to its cache and 10,000 read from it: the
    ledger keeps them apart (parts of the prompt count); the cost prices them at Sonnet's cache
    prices ($3.75, $0.30 per 1M), the flat default plan at its one price ($15), and a plan with
    cache prices of its own at those, exactly."""
    gateway, fake = gateway_pair
    _, cached_key = gateway.create_key("cache buyer", plan="cached", credits_usd="5")
    rows = {}
    for name, key in (("standard", gateway.api_key), ("cached", cached_key)):
        client = openai.OpenAI(
            base_url=gateway.base_url + "/v1", api_key=key, max_retries=0, timeout=20
        )
        chunks = list(
            client.chat.completions.create(
                model="claude-sonnet-4.5",
                messages=[
                    # a system prompt as long as what Anthropic says it cached (its bytes bound
                    # the prompt a reservation covers)
                    {"role": "system", "content": "cacheable " * 1500},
                    {"role": "user", "content": "price my cache [[cache:2000:10000]]"},
                ],
                max_tokens=16,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Echo: price my cache"
        uncached = plan_reply(fake.requests[-1].body).input_tokens
        usage = chunks[-1].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (uncached + 12_000, 4)
        rows[name] = _settled_usage(gateway, key, chunks[0].id)
    for row in rows.values():
        assert (row["prompt_tokens"], row["completion_tokens"]) == (uncached + 12_000, 4)
        assert (row["cache_write_tokens"], row["cache_read_tokens"]) == (2_000, 10_000)
    # micro-dollars per token = USD per 1M tokens
    flat = (uncached + 12_000 + 4) * 15
    assert rows["standard"]["charge_micro"] == flat
    cached = uncached * 6 + 2_000 * 75 // 10 + 10_000 * 6 // 10 + 4 * 30
    assert rows["cached"]["charge_micro"] == cached
    cost = uncached * 3 + 2_000 * 375 // 100 + 10_000 * 3 // 10 + 4 * 15
    report = requests.get(
        gateway.base_url + "/v1/admin/usage?group_by=plan&model=claude-sonnet-4.5",
        headers={"Authorization": f"Bearer {gateway.admin_key}"},
        timeout=10,
    ).json()
    by_plan = {r["plan"]: r for r in report["data"]}
    assert (by_plan["cached"]["cost_micro"], by_plan["cached"]["charge_micro"]) == (cost, cached)
    assert by_plan["cached"]["margin_micro"] == cached - cost
    assert (by_plan["cached"]["cache_write_tokens"], by_plan["cached"]["cache_read_tokens"]) == (
        2_000,
        10_000,
    )
