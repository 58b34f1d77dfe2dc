"""WebSocket tickets: single-use and expiring, in memory or shared through Redis.

The Redis store is what several gateway instances share: a ticket issued by one is redeemed
by another, exactly once even when instances race for it. These tests use the shared Redis
under a prefix of their own (removed afterwards), and a closed port for an outage.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tokenwire.accounting.tickets import MemoryTicketStore, RedisTicketStore
from tokenwire.errors import TicketStoreUnavailable
from tokenwire.testing_cluster import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"tokenwire-test-{secrets.token_hex(6)}:"
    yield name
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        stale = [key async for key in client.scan_iter(match=name + "*")]
        if stale:
            await client.delete(*stale)
    finally:
        await client.aclose()


async def test_memory_ticket_works_once_and_expires() -> None:
    """In memory: a ticket redeems to its key id once; an unknown or expired one to None."""
    store = MemoryTicketStore(60)
    ticket = await store.issue("key_a")
    assert await store.redeem(ticket.value) == "key_a"
    assert await store.redeem(ticket.value) is None
    assert await store.redeem("not-a-ticket") is None
    expired = await MemoryTicketStore(0).issue("key_a")
    assert await MemoryTicketStore(0).redeem(expired.value) is None


async def test_a_ticket_issued_by_one_instance_is_redeemed_once_by_another(prefix: str) -> None:
    """Redis: issued by store A, redeemed by store B; then refused on A and B; only its SHA-256 is stored, with the TTL."""
    a = RedisTicketStore(REDIS_URL, prefix=prefix, ttl_s=60)
    b = RedisTicketStore(REDIS_URL, prefix=prefix, ttl_s=60)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        ticket = await a.issue("key_a")
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        digest = hashlib.sha256(ticket.value.encode()).hexdigest()
        assert keys == [f"{prefix}tk:{digest}".encode()]
        assert 0 < await client.pttl(keys[0]) <= 60_000
        assert await b.redeem(ticket.value) == "key_a"
        assert await a.redeem(ticket.value) is None
        assert await b.redeem(ticket.value) is None
        assert await b.redeem("not-a-ticket") is None
    finally:
        for store in (a, b):
            await store.aclose()
        await client.aclose()


async def test_instances_racing_for_one_ticket_redeem_it_exactly_once(prefix: str) -> None:
    """Redis: 20 concurrent redeems of one ticket on two stores: one key id, 19 None (GETDEL is atomic)."""
    stores = [RedisTicketStore(REDIS_URL, prefix=prefix, ttl_s=60) for _ in range(2)]
    try:
        ticket = await stores[0].issue("key_race")
        results = await asyncio.gather(*(stores[i % 2].redeem(ticket.value) for i in range(20)))
        assert results.count("key_race") == 1 and results.count(None) == 19, results
    finally:
        for store in stores:
            await store.aclose()


async def test_an_unreachable_redis_is_a_503_not_a_crash() -> None:
    """Redis down: issuing and redeeming raise TicketStoreUnavailable (503, Retry-After)."""
    store = RedisTicketStore(f"redis://127.0.0.1:{free_port()}/0", prefix="x:", ttl_s=60)
    try:
        with pytest.raises(TicketStoreUnavailable) as issued:
            await store.issue("key_a")
        assert issued.value.http_status == 503 and issued.value.headers() == {"Retry-After": "1"}
        with pytest.raises(TicketStoreUnavailable):
            await store.redeem("anything")
    finally:
        await store.aclose()
