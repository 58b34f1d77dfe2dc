"""Credits end to end on SQLite and PostgreSQL: a priced stream costs exactly P*3 + N*15
micro-dollars in the ledger and the balance, a key that cannot cover the worst case gets 402
``insufficient_quota`` (SSE and WebSocket) and writes nothing, free models still work at balance
0, and a top-up makes the balance equal the credits minus the ledger's charges.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.accounting.conftest import (
    accounts,
    bearer,
    chat,
    check_openai_error,
    overrides,
    settled,
    sim_plan,
    sse,
    wait_for,
    ws_request,
    ws_url,
)
from websockets.asyncio.client import connect

from tokenwire.accounting.budget import prompt_token_bound
from tokenwire.config import DEFAULT_CONTEXT_TOKENS as CONTEXT
from tokenwire.testing import GatewayServer
from tokenwire.wire.schema import decode_chat_request

INPUT_MICRO_PER_TOKEN = 3  # $3.00 per 1M tokens is 3 micro-dollars per token
OUTPUT_MICRO_PER_TOKEN = 15


def worst_case(body: dict[str, Any]) -> int:
    """The reservation of a ``priced-sim`` request (the prompt's bound), in micro-dollars."""
    bound = prompt_token_bound(decode_chat_request(json.dumps(body).encode()), CONTEXT)
    return bound * INPUT_MICRO_PER_TOKEN + body["max_tokens"] * OUTPUT_MICRO_PER_TOKEN


@pytest.fixture
def credit_gateway(tmp_path: Path, database_url: str) -> Iterator[GatewayServer]:
    """A gateway on SQLite or PostgreSQL with the priced model."""
    with GatewayServer(
        tmp_path / "credits", overrides=overrides(60.0), database_url=database_url
    ) as gw:
        yield gw


async def test_credits_cost_and_insufficient_quota(
    credit_gateway: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """A priced stream costs exactly P*3 + N*15 micro-dollars in the ledger and the balance; then 402 insufficient_quota; free models still work."""
    gw = credit_gateway
    body = chat("supercalifragilistic expialidocious", model="priced-sim", max_tokens=37)
    sim = sim_plan(body)
    assert sim.completion_tokens == 37
    grant = worst_case(body)  # exactly one worst case
    cost = sim.prompt_tokens * INPUT_MICRO_PER_TOKEN + 37 * OUTPUT_MICRO_PER_TOKEN
    assert cost < grant < 2 * cost
    async with accounts(gw) as acc:
        record, key = await acc.keys.create("small", grant_micro=grant)
        assert await acc.ledger.balance(record.id) == grant

        reply = await sse(http, gw, key, {**body, "stream_options": {"include_usage": True}})
        assert reply.status == 200, reply
        assert reply.text == sim.text
        usage = reply.chunks[-1]["usage"]
        assert usage == {
            "prompt_tokens": sim.prompt_tokens,
            "completion_tokens": 37,
            "total_tokens": sim.prompt_tokens + 37,
        }
        assert {c["id"] for c in reply.chunks} == {reply.stream_id}
        assert await wait_for(lambda: settled(gw, acc, record.id, 1), 5)
        [row] = await acc.ledger.rows(key_id=record.id)
        assert row.completion_id == reply.stream_id
        assert (row.model, row.provider, row.transport, row.status) == (
            "priced-sim",
            "sim",
            "sse",
            "completed",
        )
        assert (row.prompt_tokens, row.completion_tokens, row.usage_estimated) == (
            sim.prompt_tokens,
            37,
            False,
        )
        assert row.charge_micro == cost
        assert row.finish_reason == "length"
        assert await acc.ledger.balance(record.id) == grant - cost

        refused = await sse(http, gw, key, body)
        assert refused.status == 402, refused
        check_openai_error(refused.error, type_="insufficient_quota", code="insufficient_quota")
        async with connect(ws_url(gw), additional_headers=bearer(key)) as ws:
            error = await ws_request(ws, "priced", body)
            assert error["type"] == "error", error
            assert (
                error["error"]["status"] == 402 and error["error"]["code"] == "insufficient_quota"
            )
            done = await ws_request(ws, "free", chat("free over ws", max_tokens=4))
            assert done["type"] == "chat.completion.done", done
        free = await sse(http, gw, key, chat("free", max_tokens=4))
        assert free.status == 200, free
        assert await wait_for(lambda: settled(gw, acc, record.id, 3), 5)
        assert await acc.ledger.balance(record.id) == grant - cost
        rows = await acc.ledger.rows(key_id=record.id)
        assert len(rows) == 3  # the priced one and two free ones; the 402s wrote nothing
        assert sorted(r.charge_micro for r in rows) == [0, 0, cost]

        balance, applied = await acc.ledger.credit(record.id, cost, payment_id="pay-1")
        assert applied and balance == grant
        assert (await sse(http, gw, key, body)).status == 200
        assert await wait_for(lambda: settled(gw, acc, record.id, 4), 5)
        assert await acc.ledger.balance(record.id) == grant - cost
        assert await acc.credits(record.id) == grant + cost
        assert await acc.ledger.balance(record.id) == await acc.credits(
            record.id
        ) - await acc.ledger_charges(record.id)


async def test_free_models_at_zero_balance(
    credit_gateway: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """A key with no credit: free ``sim`` streams work, ``priced-sim`` gets 402, the balance stays 0."""
    gw = credit_gateway
    async with accounts(gw) as acc:
        record, key = await acc.keys.create("broke")
        for _ in range(2):
            assert (await sse(http, gw, key, chat("free", max_tokens=5))).status == 200
        refused = await sse(http, gw, key, chat("paid", model="priced-sim", max_tokens=1))
        assert refused.status == 402, refused
        check_openai_error(refused.error, type_="insufficient_quota", code="insufficient_quota")
        assert await wait_for(lambda: settled(gw, acc, record.id, 2), 5)
        assert await acc.ledger.balance(record.id) == 0
        rows = await acc.ledger.rows(key_id=record.id)
        assert len(rows) == 2 and all(r.charge_micro == 0 and r.model == "sim" for r in rows)
