"""One way to open Redis: a bounded connection pool that makes callers wait their turn.

redis-py's default pool (100 connections since redis-py 8) raises ``MaxConnectionsError`` for
the 101st concurrent command: a burst of 600 requests had 500 refused as "rate limiter
unavailable". Redis runs commands one at a time anyway, so more connections add nothing past
a few dozen; here a command waits up to ``wait_s`` for a free connection instead.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis

MAX_CONNECTIONS = 128


def connect(url: str, *, wait_s: float, **options: Any) -> Redis:
    """A client for ``url`` on its own pool (closed with the client); ``options`` are
    redis-py's connection options (timeouts, ``decode_responses``, ``retry``…)."""
    pool = BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=wait_s, **options
    )
    return Redis.from_pool(pool)
