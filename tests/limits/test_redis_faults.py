"""Redis killed under load and restarted (limits and resumable streams on Redis).

A gateway whose limiter and stream store use a private Redis serves 30 clients streaming
priced completions (half of them resumable) on a key limited to 30 concurrent streams, while
Redis is killed, left down for two seconds, and started again, empty. Then:

* every answer a client got is whole, or ended with a clear in-band error, never a hang;
* a request during the outage gets a clear 503 within the Redis timeouts, never a 500;
* without a gateway restart, requests are served again;
* nothing leaks: no stream slot is left taken (in this process or in Redis), no reservation
  stays open, and every completion has exactly one ledger row.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import sqlalchemy as sa

from tokenwire.accounting.keys import KeyLimits
from tokenwire.limits.redis import RedisRateLimiter
from tokenwire.providers.sim import plan
from tokenwire.storage.tables import reservations
from tokenwire.testing import FAST_SIM, GatewayServer, paced_sim, priced_model, read_sse_answer
from tokenwire.testing_services import PrivateRedis
from tokenwire.wire.schema import decode_chat_request

CLIENTS = 30
PREFIX = "tw-fault:"
TOKENS = 15


def catalog(redis_url: str) -> str:
    return (
        FAST_SIM
        + f"""
[server]
stream_backend = "redis"

[limits]
backend = "redis"
redis_url = "{redis_url}"
redis_prefix = "{PREFIX}"
"""
        + paced_sim()
        + priced_model(provider="paced")
    )


@dataclass
class Seen:
    served: dict[str, str] = field(default_factory=dict)  # stream id -> text
    cut: list[str] = field(default_factory=list)  # answers ended by an in-band error
    refused: list[tuple[int, str, float]] = field(default_factory=list)  # status, code, seconds
    broken: list[str] = field(default_factory=list)  # must stay empty


def body(i: int) -> dict[str, Any]:
    return {
        "model": "priced-sim",
        "stream": True,
        "max_tokens": TOKENS,
        "messages": [{"role": "user", "content": f"redis fault request {i}"}],
    }


async def one(http: aiohttp.ClientSession, gw: GatewayServer, key: str, i: int, seen: Seen) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    if i % 2:
        headers["X-Tokenwire-Resumable"] = "true"
    started = time.monotonic()
    try:
        async with http.post(
            f"{gw.base_url}/v1/chat/completions", json=body(i), headers=headers
        ) as response:
            if response.status != 200:
                error = (await response.json())["error"]
                seen.refused.append((response.status, error["code"], time.monotonic() - started))
                return
            answer = await read_sse_answer(response.content)
            stream_id = response.headers["x-stream-id"]
            expected = plan(decode_chat_request(json.dumps(body(i)).encode())).text
            if answer.errors and answer.done:
                seen.cut.append(stream_id)
            elif answer.done and answer.text == expected:
                seen.served[stream_id] = answer.text
            else:
                seen.broken.append(f"{stream_id}: {answer}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        seen.broken.append(repr(exc))


@pytest.fixture
def gateway(
    tmp_path: Path, private_redis: PrivateRedis
) -> Iterator[tuple[GatewayServer, str, str]]:
    with GatewayServer(tmp_path, overrides=catalog(private_redis.url)) as gw:

        async def create() -> tuple[str, str]:
            record, key = await gw.state.keys.create(
                "faulty", limits=KeyLimits(max_concurrent_streams=CLIENTS), grant_micro=10**8
            )
            return record.id, key

        key_id, key = asyncio.run_coroutine_threadsafe(create(), gw.loop_of_server()).result()
        yield gw, key_id, key


async def on_server(gw: GatewayServer, coro: Any) -> Any:
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, gw.loop_of_server()))


@pytest.mark.parametrize("outage", ["killed", "hung"])
async def test_redis_failing_under_load(
    gateway: tuple[GatewayServer, str, str], private_redis: PrivateRedis, outage: str
) -> None:
    """Redis killed (and restarted empty), or hung (and resumed with its data): in-flight
    answers finish or end with an in-band error, new requests get a 503 in bounded time,
    service resumes without a restart, and no slot or reservation leaks, in particular no
    slot whose release Redis never received."""
    gw, key_id, key = gateway
    seen = Seen()
    stop = threading.Event()
    counter = iter(range(1_000_000))

    async def client(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            await one(http, gw, key, next(counter), seen)

    def fault() -> None:
        threading.Event().wait(0.7)
        if outage == "killed":
            private_redis.kill()
            threading.Event().wait(2.0)
            private_redis.start()
        else:  # longer than two socket timeouts (a try and its retry): releases fail
            private_redis.pause()
            threading.Event().wait(5.0)
            private_redis.resume()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        clients = [asyncio.ensure_future(client(http)) for _ in range(CLIENTS)]
        try:
            await asyncio.to_thread(fault)
            before = len(seen.served)
            async with asyncio.timeout(30):  # served again, without a gateway restart
                while len(seen.served) < before + CLIENTS:  # noqa: ASYNC110 - a count of answers
                    await asyncio.sleep(0.01)
        finally:
            stop.set()
            await asyncio.gather(*clients)

    assert seen.broken == []
    assert seen.refused, "no request met the outage"
    assert {status for status, _, _ in seen.refused} == {503}
    assert {code for _, code, _ in seen.refused} <= {
        "rate_limiter_unavailable",
        "stream_store_unavailable",
    }
    assert max(seconds for _, _, seconds in seen.refused) < 10  # Redis timeouts, not a hang

    limiter = gw.state.limiter
    assert isinstance(limiter, RedisRateLimiter)

    async def quiet() -> bool:
        await limiter.renew_once()  # what the renewal task does every few seconds
        async with gw.state.engine.connect() as conn:
            held = await conn.scalar(sa.select(sa.func.count()).select_from(reservations))
        return not gw.state.completions.live and limiter.held_slots == 0 and not held

    async with asyncio.timeout(30):
        while not await on_server(gw, quiet()):  # noqa: ASYNC110 - state on the server
            await asyncio.sleep(0.05)
    client = redis.Redis.from_url(private_redis.url)
    try:
        assert client.zcard(f"{PREFIX}s:{key_id}") == 0  # no slot left taken in Redis either
    finally:
        client.close()
    rows = await on_server(gw, gw.state.ledger.rows(key_id=key_id, limit=100_000))
    ids = [row.completion_id for row in rows]
    assert len(ids) == len(set(ids))
    assert set(seen.served) | set(seen.cut) <= set(ids)
    balance = await on_server(gw, gw.state.ledger.balance(key_id))
    assert balance == 10**8 - sum(row.charge_micro for row in rows)
