"""Two real gateway processes sharing PostgreSQL and Redis enforce one limit and one balance.

Each test starts two ``python -m tokenwire.cli serve`` processes (own data dirs, same
``TOKENWIRE_SECRET``, a fresh PostgreSQL database, ``[limits] backend = "redis"`` with a prefix
of its own) and spreads concurrent requests over both:

* one combined rate limit: a key with rpm=6 gets exactly 6 successes out of 4 + 4 requests;
* one balance: a key with credit for exactly k worst-case reservations of ``priced-sim`` gets
  exactly k completions however the requests interleave, the balance never goes below zero,
  and at the end balance == grant - sum(ledger cost) with one ledger row per completion.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis
import sqlalchemy as sa

from tokenwire.accounting.budget import prompt_token_bound
from tokenwire.accounting.keys import KeyLimits
from tokenwire.accounting.ledger import Ledger
from tokenwire.config import DEFAULT_CONTEXT_TOKENS
from tokenwire.providers.sim import plan
from tokenwire.storage.engine import make_engine
from tokenwire.storage.tables import credit_events, reservations, usage_ledger
from tokenwire.testing import FAST_SIM, priced_model
from tokenwire.testing_cluster import Cluster, GatewayProcess
from tokenwire.wire.schema import decode_chat_request

REDIS_URL = "redis://127.0.0.1:6379/0"
INPUT_MICRO_PER_TOKEN = 3
OUTPUT_MICRO_PER_TOKEN = 15


def config_text(prefix: str) -> str:
    return (
        FAST_SIM
        + priced_model()
        + f"""
[limits]
backend = "redis"
redis_url = "{REDIS_URL}"
redis_prefix = "{prefix}"
window_s = 60.0
"""
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(content: str, model: str = "sim", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        **extra,
    }


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        yield session


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    error: dict[str, Any] | None
    stream_id: str | None
    chunk_ids: set[str]
    gateway: str


async def stream(
    session: aiohttp.ClientSession, gateway: GatewayProcess, key: str, body: dict[str, Any]
) -> Reply:
    """A streamed completion read to ``[DONE]`` (or its error response)."""
    async with session.post(
        gateway.base_url + "/v1/chat/completions", json=body, headers=bearer(key)
    ) as resp:
        headers = {k.lower(): v for k, v in resp.headers.items()}
        if resp.status != 200:
            error = (await resp.json(content_type=None))["error"]
            return Reply(resp.status, headers, error, None, set(), gateway.name)
        ids: set[str] = set()
        done = False
        in_band: dict[str, Any] | None = None
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                done = True
                break
            chunk = json.loads(line[len(b"data: ") :])
            if "error" in chunk:
                in_band = chunk["error"]
            else:
                ids.add(chunk["id"])
        assert done, f"{gateway.name}: stream ended without [DONE]"
        return Reply(200, headers, in_band, headers["x-stream-id"], ids, gateway.name)


async def wait_for(predicate: Any, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if await predicate():
            return True
        await asyncio.sleep(0.02)
    return bool(await predicate())


async def test_one_rate_limit_across_processes(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    """rpm=6 shared through Redis: 4 concurrent requests to each of two processes → exactly 6 succeed and 2 get 429."""
    record, key = await cluster.create_key("shared-rpm", limits=KeyLimits(rpm=6))
    gateways = await cluster.start(config_text(cluster.redis_prefix))
    body = chat("shared limit", max_tokens=3)
    replies = await asyncio.gather(*(stream(http, gateways[i % 2], key, body) for i in range(8)))
    statuses = sorted(r.status for r in replies)
    assert statuses == [200] * 6 + [429] * 2, [(r.gateway, r.status) for r in replies]
    ok = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status == 429]
    assert {r.gateway for r in replies} == {"gw0", "gw1"}
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]
    assert all(r.headers["x-ratelimit-limit-requests"] == "6" for r in ok)
    for r in refused:
        assert r.error is not None and r.error["code"] == "rate_limit_exceeded", r.error
        assert r.error["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
    for r in ok:
        assert r.error is None and r.chunk_ids == {r.stream_id}

    # a 9th request, to either process, is still refused: the budget is one
    for gateway in gateways:
        again = await stream(http, gateway, key, body)
        assert again.status == 429, (gateway.name, again)

    engine = make_engine(cluster.database_url)
    try:
        ledger = Ledger(engine)

        async def six_rows() -> bool:
            return len(await ledger.rows(key_id=record.id)) == 6

        assert await wait_for(six_rows, 10)
        rows = await ledger.rows(key_id=record.id)
        assert {r.completion_id for r in rows} == {r.stream_id for r in ok}
    finally:
        await engine.dispose()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert list(client.scan_iter(match=cluster.redis_prefix + "*")), (
            "nothing in Redis under the prefix"
        )
    finally:
        client.close()


async def test_one_balance_across_processes(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """Credit for exactly k worst cases: 3k concurrent priced requests over two processes → k completions, balance never below 0, balance == grant - sum(cost)."""
    k = 5
    body = chat("supercalifragilistic", model="priced-sim", max_tokens=20)
    request = decode_chat_request(json.dumps(body).encode())
    bound = prompt_token_bound(request, DEFAULT_CONTEXT_TOKENS)
    worst = bound * INPUT_MICRO_PER_TOKEN + 20 * OUTPUT_MICRO_PER_TOKEN
    sim = plan(request)
    cost = (
        sim.prompt_tokens * INPUT_MICRO_PER_TOKEN + sim.completion_tokens * OUTPUT_MICRO_PER_TOKEN
    )
    assert cost <= worst  # the prompt is not larger than estimated: no overdraft by design
    grant = k * worst
    record, key = await cluster.create_key("shared-balance", grant_micro=grant)
    gateways = await cluster.start(config_text(cluster.redis_prefix))

    engine = make_engine(cluster.database_url)
    try:
        ledger = Ledger(engine)
        lowest = grant
        stop = asyncio.Event()

        async def watch_balance() -> None:
            nonlocal lowest
            while not stop.is_set():
                lowest = min(lowest, await ledger.balance(record.id))
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch_balance())
        try:
            replies = await asyncio.gather(
                *(stream(http, gateways[i % 2], key, body) for i in range(3 * k))
            )
        finally:
            stop.set()
            await watcher
        ok = [r for r in replies if r.status == 200]
        refused = [r for r in replies if r.status != 200]
        assert len(ok) == k, [(r.gateway, r.status) for r in replies]
        assert all(r.status == 402 for r in refused), [
            (r.gateway, r.status, r.error) for r in refused
        ]
        for r in refused:
            assert r.error is not None
            assert (r.error["type"], r.error["code"]) == (
                "insufficient_quota",
                "insufficient_quota",
            )
        assert all(r.error is None and r.chunk_ids == {r.stream_id} for r in ok)

        async def all_settled() -> bool:
            async with engine.connect() as conn:
                open_count = await conn.scalar(
                    sa.select(sa.func.count())
                    .select_from(reservations)
                    .where(reservations.c.key_id == record.id)
                )
            return open_count == 0 and len(await ledger.rows(key_id=record.id)) == len(ok)

        assert await wait_for(all_settled, 10)
        assert lowest >= 0, f"the balance went down to {lowest}"
        rows = await ledger.rows(key_id=record.id)
        assert sorted(r.completion_id for r in rows) == sorted(
            r.stream_id for r in ok if r.stream_id
        )
        assert all(r.charge_micro == cost and r.status == "completed" for r in rows), rows
        async with engine.connect() as conn:
            credited = await conn.scalar(
                sa.select(sa.func.sum(credit_events.c.amount_micro)).where(
                    credit_events.c.key_id == record.id
                )
            )
            billed = await conn.scalar(
                sa.select(sa.func.sum(usage_ledger.c.charge_micro)).where(
                    usage_ledger.c.key_id == record.id
                )
            )
        assert credited == grant
        balance = await ledger.balance(record.id)
        assert balance == grant - int(billed) == grant - k * cost
        assert balance >= 0
    finally:
        await engine.dispose()
