"""Fixtures of the Redis limiter tests: a key prefix of the test's own on the shared Redis,
and limiters built on it (as separate gateway processes would be), closed afterwards."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tokenwire.limits import redis as redis_limits
from tokenwire.limits.redis import RedisRateLimiter

REDIS_URL = "redis://127.0.0.1:6379/0"

MakeLimiter = Callable[..., RedisRateLimiter]


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A fresh key prefix; every key under it is deleted after the test."""
    name = f"tokenwire-test:{secrets.token_hex(8)}:"
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except RedisConnectionError:
        await client.aclose()
        pytest.fail(f"no Redis server at {REDIS_URL}: scripts/test starts one")
    yield name
    try:
        keys = [key async for key in client.scan_iter(match=name + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def make(prefix: str) -> AsyncIterator[MakeLimiter]:
    """Build limiters on the test's prefix (as separate gateway processes would); closed after."""
    made: list[RedisRateLimiter] = []

    def factory(
        *,
        window_s: float = 60.0,
        auth_failures_per_window: int = 30,
        slot_lease_s: float = redis_limits.SLOT_LEASE_S,
        url: str = REDIS_URL,
    ) -> RedisRateLimiter:
        limiter = RedisRateLimiter(
            url,
            prefix=prefix,
            window_s=window_s,
            auth_failures_per_window=auth_failures_per_window,
            slot_lease_s=slot_lease_s,
        )
        made.append(limiter)
        return limiter

    yield factory
    for limiter in made:
        await limiter.aclose()
