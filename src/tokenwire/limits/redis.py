"""The Redis rate-limit backend: every gateway process shares one budget per key.

Same semantics as :mod:`tokenwire.limits.memory` (codes, messages, ``Retry-After``, headers,
all-or-nothing admission), kept in Redis so several processes agree:

* One round trip per call: each method runs one Lua script (``register_script``, EVALSHA;
  redis-py reloads it after NOSCRIPT). A script runs atomically, so an admission checks the
  request GCRA, the token GCRA (or "tokens_exceed_limit") and the stream cap and then writes
  all of them or none, with no race between processes.
* Time is the Redis server's (``TIME``), so gateway clocks may disagree.
* A TAT is stored as ``"<server µs when written> <seconds ahead of then>"``: the arithmetic
  stays on small numbers (a double holds epoch microseconds only to ~0.25 µs, too coarse next
  to a small interval) and follows :func:`tokenwire.limits.base.gcra` step for step, relative
  to now. A GCRA key expires (PX) when its bucket would be full again.
* Open streams are a ZSET per key of stream ids scored by an expiry: a **lease** of
  ``SLOT_LEASE_S`` that the admitting process renews while the stream runs (one pipelined
  script for all of its slots every third of a lease). Expired entries are removed before
  counting, so the slots of a crashed process, or ones whose release failed while Redis was
  unreachable, free themselves within a lease; a release that failed is retried with the next
  renewal, and a Redis that restarted empty gets the live slots back from the renewal. An
  admission that timed out may still have run when Redis answers again: its slot is taken
  back like a failed release (before the next admission counts the slots).
* Keys: ``{prefix}r:{key_id}`` (requests), ``{prefix}t:{key_id}`` (tokens),
  ``{prefix}s:{key_id}`` (streams), ``{prefix}a:{client}`` (failed authentications).

Redis errors become :class:`LimiterUnavailable` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import urlsplit

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from tokenwire.errors import LimiterUnavailable
from tokenwire.limits.base import (
    Admission,
    BucketState,
    LimitSpec,
    raise_if_refused,
    rate_headers,
)
from tokenwire.redis_client import connect

log = logging.getLogger("tokenwire.limits")

SLOT_LEASE_S = 30.0  # a stream slot its process stops renewing is freed after this
SOCKET_TIMEOUT_S = 2.0

_COMMON = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function fmt(x) return string.format('%.17g', x) end
local function ahead(key, now)
  local v = redis.call('GET', key)
  if not v then return 0 end
  local at, rel = string.match(v, '^(%S+) (%S+)$')
  return tonumber(rel) - (now - tonumber(at)) / 1e6
end
local function store(key, now, rel)
  if rel > 0 then
    redis.call('SET', key, string.format('%.0f ', now) .. fmt(rel), 'PX', math.ceil(rel * 1000))
  else
    redis.call('DEL', key)
  end
end
-- base.gcra() with now = 0: {allowed, new tat, retry after, remaining, reset}
local function gcra(tat, cost, limit, window)
  local interval = window / limit
  local current = math.max(tat, 0)
  local new_tat = current + cost * interval
  if new_tat - window > 0 then
    local remaining = math.max(0, math.floor((window - current) / interval + 1e-3))
    return {0, tat, new_tat - window, remaining, current}
  end
  local remaining = math.max(0, math.floor((window - new_tat) / interval + 1e-3))
  return {1, new_tat, 0, remaining, new_tat}
end
local function push(out, g)  -- allowed (-1: not checked), retry after, remaining, reset
  g = g or {-1, 0, 0, 0, 0}
  for _, i in ipairs({1, 3, 4, 5}) do table.insert(out, fmt(g[i])) end
end
"""

# KEYS: r, t, s. ARGV: window, rpm, tpm, tokens, max_streams (-1: none), stream id, stream ttl.
# Returns now (µs), the request and token states (allowed -1: not checked), open streams.
_ADMIT = (
    _COMMON
    + """
local window, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, max_streams = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = clock()
local ok, r, t, open = true, nil, nil, 0
if rpm >= 0 then
  r = gcra(ahead(KEYS[1], now), 1, rpm, window)
  ok = r[1] == 1
end
if tpm >= 0 then
  if tokens > tpm then
    ok = false
  else
    t = gcra(ahead(KEYS[2], now), tokens, tpm, window)
    ok = ok and t[1] == 1
  end
end
if max_streams >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', fmt(now))
  open = redis.call('ZCARD', KEYS[3])
  ok = ok and open < max_streams
end
if not ok then
  -- refused: nothing is consumed, so the headers report the buckets as they stand
  if r then
    local p = gcra(ahead(KEYS[1], now), 0, rpm, window)
    r = {r[1], r[2], r[3], p[4], p[5]}
  end
  if tpm >= 0 then
    local p = gcra(ahead(KEYS[2], now), 0, tpm, window)
    if t then t = {t[1], t[2], t[3], p[4], p[5]} else t = {1, 0, 0, p[4], p[5]} end
  end
end
if ok then
  if r then store(KEYS[1], now, r[2]) end
  if t then store(KEYS[2], now, t[2]) end
  if max_streams >= 0 then
    local ttl = tonumber(ARGV[7])
    redis.call('ZADD', KEYS[3], fmt(now + ttl * 1e6), ARGV[6])
    redis.call('PEXPIRE', KEYS[3], math.ceil(ttl * 1000))
  end
end
local out = {fmt(now)}
push(out, r)
push(out, t)
table.insert(out, fmt(open))
return out
"""
)

# KEYS: t, s. ARGV: stream id, tpm (-1: none), actual - estimated tokens, window.
_SETTLE = (
    _COMMON
    + """
redis.call('ZREM', KEYS[2], ARGV[1])
local tpm, delta, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tpm > 0 and delta ~= 0 then
  local now = clock()
  store(KEYS[1], now, math.max(0, ahead(KEYS[1], now) + delta * (window / tpm)))
end
return 0
"""
)

# KEYS: the stream ZSETs, one per slot. ARGV: lease seconds, then the stream ids (same order).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, string.format('%.17g', now + lease * 1e6), ARGV[i + 1])
  redis.call('PEXPIRE', key, math.ceil(lease * 1000))
end
return #KEYS
"""

# KEYS: a. ARGV: limit, window, commit (1: count a failure). Returns {allowed, retry after}.
_AUTH = (
    _COMMON
    + """
local now = clock()
local g = gcra(ahead(KEYS[1], now), 1, tonumber(ARGV[1]), tonumber(ARGV[2]))
if g[1] == 1 and ARGV[3] == '1' then store(KEYS[1], now, g[2]) end
return {fmt(g[1]), fmt(g[3])}
"""
)


def redact_url(url: str) -> str:
    """``url`` without its password (and without a query, which may hold one)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host += f":{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{parts.path}"


def _opt(value: int | None) -> int:
    return -1 if value is None else value


def _bucket(limit: int | None, state: list[float]) -> BucketState | None:
    """``state``: the script's ``allowed, retry after, remaining, reset`` (allowed -1: none)."""
    allowed, _, remaining, reset = state
    return None if limit is None or allowed < 0 else BucketState(limit, int(remaining), reset)


class RedisRateLimiter:
    """Rate limits kept in Redis, shared by every process that uses the same URL and prefix."""

    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = "tokenwire:",
        window_s: float = 60.0,
        auth_failures_per_window: int = 30,
        slot_lease_s: float = SLOT_LEASE_S,
    ) -> None:
        self._url = redact_url(redis_url)
        self._prefix = prefix
        self._window_s = window_s
        self._auth_limit = auth_failures_per_window
        self._redis = connect(
            redis_url,
            wait_s=SOCKET_TIMEOUT_S,
            decode_responses=True,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.05, base=0.01), retries=1),
        )
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._renew = self._redis.register_script(_RENEW)
        self._auth = self._redis.register_script(_AUTH)
        self._lease_s = slot_lease_s
        # Stream slots this process holds (stream id → key id), renewed until released, and
        # releases that failed (retried with each renewal until Redis takes them).
        self._held: dict[str, str] = {}
        self._unreleased: dict[str, tuple[Admission, LimitSpec, int]] = {}
        self._renewer: asyncio.Task[None] | None = None

    def _keys(self, kinds: str, name: str) -> list[str]:
        return [f"{self._prefix}{kind}:{name}" for kind in kinds]

    async def _run(self, script: AsyncScript, keys: list[str], *args: str | float) -> list[float]:
        try:
            result = await script(keys=keys, args=args)
        except RedisError as exc:
            log.error("rate limiter: Redis at %s failed: %r", self._url, exc)
            raise LimiterUnavailable(
                "The rate limiter is unavailable; the request was not admitted."
            ) from exc
        return [float(v) for v in result] if isinstance(result, list) else []

    async def admit(self, key_id: str, spec: LimitSpec, tokens: int, stream_id: str) -> Admission:
        if self._unreleased:  # Redis missed releases: count the slots right before admitting
            await self._retry_releases()
        window = self._window_s
        try:
            raw = await self._run(
                self._admit,
                self._keys("rts", key_id),
                window,
                _opt(spec.rpm),
                _opt(spec.tpm),
                tokens,
                _opt(spec.max_streams),
                stream_id,
                self._lease_s,
            )
        except LimiterUnavailable:
            if spec.max_streams is not None:
                # A script that timed out may still run once Redis answers again (it got the
                # bytes): take back the slot it may have added, as soon as Redis is back.
                ghost = Admission(key_id, stream_id, 0)
                self._unreleased[stream_id] = (ghost, LimitSpec(max_streams=spec.max_streams), 0)
                self._start_renewing()
            raise
        now_us, open_streams = raw[0], raw[9]
        (r_ok, r_retry, *_), (t_ok, t_retry, *_) = raw[1:5], raw[5:9]
        request_state = _bucket(spec.rpm, raw[1:5])
        token_state = _bucket(spec.tpm, raw[5:9])
        headers = rate_headers(request_state, token_state, now_wall=now_us / 1e6)
        raise_if_refused(
            spec,
            window,
            tokens,
            requests_retry_s=r_retry if r_ok == 0 else None,
            tokens_retry_s=t_retry if t_ok == 0 else None,
            open_streams=int(open_streams),
            headers=headers,
        )
        if spec.max_streams is not None:
            self._held[stream_id] = key_id
            self._start_renewing()
        return Admission(key_id, stream_id, tokens, request_state, token_state, headers)

    async def release(self, admission: Admission, spec: LimitSpec, actual_tokens: int) -> None:
        """Free the slot and correct the token bucket; if Redis is unreachable, keep trying.

        The slot stops being renewed at once, so even a release that never gets through frees
        the slot when its lease runs out.
        """
        self._held.pop(admission.stream_id, None)
        try:
            await self._release(admission, spec, actual_tokens)
        except LimiterUnavailable:
            self._unreleased[admission.stream_id] = (admission, spec, actual_tokens)
            self._start_renewing()
            raise

    async def _release(self, admission: Admission, spec: LimitSpec, actual_tokens: int) -> None:
        delta = actual_tokens - admission.tokens
        keys = self._keys("ts", admission.key_id)
        await self._run(
            self._settle, keys, admission.stream_id, _opt(spec.tpm), delta, self._window_s
        )

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            loop = asyncio.get_running_loop()
            self._renewer = loop.create_task(self._renew_loop(), name="limits-slot-renewer")

    async def _renew_loop(self) -> None:
        """Every third of a lease: renew held slots, retry failed releases; stop when idle."""
        while self._held or self._unreleased:
            await asyncio.sleep(self._lease_s / 3)
            await self.renew_once()

    async def _retry_releases(self) -> None:
        """Send again the releases Redis did not take; stop at the first that still fails."""
        for stream_id, (admission, spec, actual) in list(self._unreleased.items()):
            try:
                await self._release(admission, spec, actual)
            except LimiterUnavailable:
                return  # Redis is still away; keep the rest for the next round
            self._unreleased.pop(stream_id, None)

    async def renew_once(self) -> None:
        """One renewal round (also called by tests): extend every held slot's lease, and send
        again the releases Redis did not take. Failures are logged; the next round retries."""
        await self._retry_releases()
        held = list(self._held.items())
        if not held:
            return
        keys = [f"{self._prefix}s:{key_id}" for _, key_id in held]
        try:
            await self._run(self._renew, keys, self._lease_s, *(sid for sid, _ in held))
        except LimiterUnavailable:
            return  # logged by _run; the leases last another two renewal periods

    @property
    def held_slots(self) -> int:
        """Stream slots this process holds and renews."""
        return len(self._held)

    async def _auth_step(self, client: str, commit: bool) -> float | None:
        keys = self._keys("a", client)
        allowed, retry_after = await self._run(
            self._auth, keys, self._auth_limit, self._window_s, int(commit)
        )
        return None if allowed else retry_after

    async def auth_blocked(self, client: str) -> float | None:
        return await self._auth_step(client, commit=False)

    async def auth_failed(self, client: str) -> None:
        await self._auth_step(client, commit=True)

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self._redis.aclose()
