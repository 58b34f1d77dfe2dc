"""What ``/healthz`` reports: a live event loop, generations that progress, Redis reachable.

:class:`HealthMonitor` runs one small task per process. Every ``interval`` it wakes up and
records how late it woke (the event loop's scheduling lag) and whether any live generation
moved since the last tick. A loop that is blocked (a synchronous call, a CPU-bound hot spot)
shows as a late or missing tick; generations that stopped moving while some are live (an
upstream or model thread wedged past every timeout, a settlement that never returns) show as
a silence longer than ``server.health_stall_s``. The Redis probe is a ``PING`` with a short
timeout on a client of its own, so a dead Redis cannot hang the health check.

Nothing here runs per request or per token: a tick reads each live generation's last sequence
number once (a dict of a few thousand ints at most, once a second by default).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError


class _Log(Protocol):
    @property
    def last_seq(self) -> int: ...


class _Live(Protocol):
    @property
    def log(self) -> _Log: ...


class HealthMonitor:
    """The loop-lag and generation-progress watchdog, and the Redis probe.

    ``redis_url`` is None when no feature uses Redis.
    """

    def __init__(
        self,
        *,
        max_loop_lag_s: float,
        stall_s: float,
        probe_timeout_s: float,
        redis_url: str | None = None,
        redis_used_for: tuple[str, ...] = (),
    ) -> None:
        self._live: Mapping[str, _Live] = {}
        self.max_loop_lag_s = max_loop_lag_s
        self.interval_s = max(0.01, min(1.0, max_loop_lag_s / 4))
        self.stall_s = stall_s
        self.probe_timeout_s = probe_timeout_s
        self.redis_used_for = redis_used_for
        self._redis: Redis | None = None
        if redis_url is not None:
            self._redis = Redis.from_url(
                redis_url,
                socket_timeout=probe_timeout_s,
                socket_connect_timeout=probe_timeout_s,
                retry_on_timeout=False,
            )
        self._task: asyncio.Task[None] | None = None
        self._last_tick = 0.0
        self._last_lag_s = 0.0
        self._progress: dict[str, int] = {}
        self._progress_at = 0.0

    def start(self, live: Mapping[str, _Live]) -> None:
        """Start ticking on the running loop, watching ``live`` (read, never changed)."""
        self._live = live
        loop = asyncio.get_running_loop()
        self._last_tick = self._progress_at = loop.time()
        self._task = loop.create_task(self._run(), name="health-monitor")

    async def aclose(self) -> None:
        """Stop ticking; close the Redis probe's connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._redis is not None:
            await self._redis.aclose()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            now = loop.time()
            self._last_lag_s = max(0.0, now - due)
            self._last_tick = now
            self._sample(now)

    def _sample(self, now: float) -> None:
        progress = {key: generation.log.last_seq for key, generation in self._live.items()}
        if not progress or progress != self._progress:
            self._progress_at = now
        self._progress = progress

    def loop_check(self) -> dict[str, Any]:
        """The event loop: live unless the last tick was late, or the next one is overdue.

        Call it first thing in a handler: a request that waited out a blocked loop runs before
        the monitor's own tick, and then sees the overdue tick.
        """
        now = asyncio.get_running_loop().time()
        since_tick = now - self._last_tick
        running = self._task is not None and not self._task.done()
        ok = (
            running
            and self._last_lag_s <= self.max_loop_lag_s
            and since_tick <= self.interval_s + self.max_loop_lag_s
        )
        return {
            "ok": ok,
            "lag_ms": round(self._last_lag_s * 1000, 1),
            "last_tick_ms_ago": round(since_tick * 1000, 1),
        }

    def generations_check(self) -> dict[str, Any]:
        """Live generations: fine unless some are live and none has moved for ``stall_s``."""
        live = len(self._live)
        silent = 0.0 if not live else asyncio.get_running_loop().time() - self._progress_at
        ok = self.stall_s <= 0 or silent <= self.stall_s
        return {"ok": ok, "live": live, "silent_s": round(silent, 1)}

    async def redis_check(self) -> dict[str, Any] | None:
        """``PING`` with a short timeout, or None when Redis is not used."""
        if self._redis is None:
            return None
        used_for = list(self.redis_used_for)
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                await self._redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            return {"ok": False, "used_for": used_for, "error": type(exc).__name__}
        return {"ok": True, "used_for": used_for}
