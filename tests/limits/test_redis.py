"""The Redis rate limiter: ``test_memory.py``'s suite mirrored, plus what sharing adds.

Needs the Redis server at 127.0.0.1:6379. Each test uses its own random key prefix and
deletes its keys afterwards. Real time passes, so time-dependent tests use short windows
and poll until a deadline; the rest use a 60 s window in which a few ms do not matter.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from tokenwire.errors import LimiterUnavailable
from tokenwire.limits.base import Admission, LimitExceeded, LimitSpec, RateLimiter
from tokenwire.limits.memory import MemoryRateLimiter
from tokenwire.limits.redis import RedisRateLimiter, redact_url
from tokenwire.testing_services import PrivateRedis

REDIS_URL = "redis://127.0.0.1:6379/0"

MakeLimiter = Callable[..., RedisRateLimiter]


async def refused(
    limiter: RateLimiter, key: str, spec: LimitSpec, tokens: int, stream: str = "x"
) -> LimitExceeded:
    """The LimitExceeded an admission raises (fails the test if it is admitted)."""
    with pytest.raises(LimitExceeded) as info:
        await limiter.admit(key, spec, tokens, stream)
    return info.value


async def admit_eventually(
    limiter: RateLimiter, key: str, spec: LimitSpec, tokens: int, timeout_s: float
) -> Admission:
    """Poll admissions (a refusal consumes nothing) until one passes or the deadline does."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await limiter.admit(key, spec, tokens, secrets.token_hex(4))
        except LimitExceeded:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)


@pytest.mark.parametrize(("rpm", "window_s"), [(5, 1.0), (1, 0.5), (4, 1.0), (16, 4.0)])
async def test_rpm_admits_the_limit_then_refuses_until_one_interval_passes(
    make: MakeLimiter, rpm: int, window_s: float
) -> None:
    """rpm=N admits N (remaining counts down), refuses the next for window/N, then admits."""
    limiter = make(window_s=window_s)
    spec = LimitSpec(rpm=rpm)
    interval = window_s / rpm
    started = time.monotonic()
    for i in range(rpm):
        admission = await limiter.admit("k", spec, 0, f"s{i}")
        assert admission.headers["x-ratelimit-remaining-requests"] == str(rpm - 1 - i)
        assert admission.headers["X-RateLimit-Remaining"] == str(rpm - 1 - i)
    exc = await refused(limiter, "k", spec, 0)
    refused_at = time.monotonic()
    assert exc.code == "rate_limit_exceeded"
    assert exc.http_status == 429
    assert exc.message == f"Rate limit reached: {rpm} requests per {window_s:g} s."
    assert interval - (refused_at - started) - 0.01 <= exc.retry_after_s <= interval
    headers = exc.headers()
    assert headers["x-ratelimit-limit-requests"] == str(rpm)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"]
    assert headers["X-RateLimit-Limit"] == str(rpm)
    assert headers["X-RateLimit-Remaining"] == "0"
    assert abs(int(headers["X-RateLimit-Reset"]) - (time.time() + window_s)) <= 2
    assert headers["Retry-After"] == str(max(1, math.ceil(exc.retry_after_s)))
    admission = await admit_eventually(limiter, "k", spec, 0, timeout_s=interval + 2.0)
    assert time.monotonic() - refused_at >= exc.retry_after_s - 0.005
    assert admission.headers["x-ratelimit-remaining-requests"] == "0"


async def test_header_values_count_down(make: MakeLimiter) -> None:
    """Both buckets' limit, remaining and reset headers, and the X-RateLimit trio."""
    limiter = make(window_s=60.0)
    spec = LimitSpec(rpm=5, tpm=1000)
    first = await limiter.admit("k", spec, 100, "a")
    reset = int(first.headers.pop("X-RateLimit-Reset"))
    assert abs(reset - (time.time() + 12)) <= 2
    assert first.headers == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "12s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "6s",
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "4",
    }
    second = await limiter.admit("k", spec, 250, "b")
    assert second.headers["x-ratelimit-remaining-requests"] == "3"
    assert second.headers["x-ratelimit-remaining-tokens"] == "650"
    assert second.requests is not None and second.token_bucket is not None
    assert second.token_bucket.remaining == 650


async def test_token_estimates_are_reconciled_on_settle(make: MakeLimiter) -> None:
    """Fewer actual tokens refund the bucket; more actual tokens consume the difference."""
    limiter = make(window_s=60.0)
    spec = LimitSpec(tpm=100)
    first = await limiter.admit("k", spec, 60, "a")
    assert first.headers["x-ratelimit-remaining-tokens"] == "40"
    exc = await refused(limiter, "k", spec, 50)
    assert exc.code == "rate_limit_exceeded"
    assert exc.message == "Rate limit reached: 100 tokens per 60 s."
    await limiter.release(first, spec, 20)  # 40 tokens refunded
    second = await limiter.admit("k", spec, 50, "b")
    assert second.headers["x-ratelimit-remaining-tokens"] == "30"
    await limiter.release(second, spec, 79)  # 29 more consumed
    third = await limiter.admit("k", spec, 1, "c")
    assert third.headers["x-ratelimit-remaining-tokens"] == "0"
    await refused(limiter, "k", spec, 1)


async def test_request_larger_than_tpm_is_refused_outright(make: MakeLimiter) -> None:
    """tokens > tpm: code tokens_exceed_limit, Retry-After a whole window, nothing consumed."""
    limiter = make(window_s=60.0)
    spec = LimitSpec(rpm=1, tpm=100)
    exc = await refused(limiter, "k", spec, 101)
    assert exc.code == "tokens_exceed_limit"
    assert "about 101 tokens" in exc.message and "limit of 100 tokens per 60 s" in exc.message
    assert exc.retry_after_s == 60.0
    assert exc.headers()["Retry-After"] == "60"
    assert exc.headers()["x-ratelimit-limit-tokens"] == "100"  # the bucket as it stands
    assert exc.headers()["x-ratelimit-remaining-tokens"] == "100"
    assert exc.headers()["x-ratelimit-remaining-requests"] == "1"  # refused: nothing consumed
    admission = await limiter.admit("k", spec, 100, "a")
    assert admission.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_concurrent_streams_are_capped_and_released_on_settle(make: MakeLimiter) -> None:
    """max_streams=2: a third stream is refused until one of the two settles."""
    limiter = make(window_s=60.0)
    spec = LimitSpec(max_streams=2)
    first = await limiter.admit("k", spec, 10, "a")
    await limiter.admit("k", spec, 10, "b")
    exc = await refused(limiter, "k", spec, 10, "c")
    assert exc.code == "concurrent_streams_exceeded"
    assert exc.message == "At most 2 streams may run at once for this key."
    assert exc.retry_after_s == 1.0
    await limiter.admit("other-key", spec, 10, "c")
    await limiter.release(first, spec, 10)
    await limiter.admit("k", spec, 10, "c")
    await refused(limiter, "k", spec, 10, "d")


async def test_a_burst_larger_than_the_connection_pool_is_admitted(make: MakeLimiter) -> None:
    """600 admissions at once (more than the 128 pooled connections, and redis-py's default
    of 100 that refused the rest): each waits for a connection, all are admitted and counted."""
    limiter = make()
    spec = LimitSpec(max_streams=1000)
    admissions = await asyncio.gather(
        *(limiter.admit("burst", spec, 10, f"s{i}") for i in range(600))
    )
    assert len(admissions) == 600
    await asyncio.gather(*(limiter.release(a, spec, 10) for a in admissions))
    await limiter.admit("burst", LimitSpec(max_streams=1), 10, "after")  # all slots were freed


REFUSALS = {
    "requests": (LimitSpec(rpm=1, tpm=100, max_streams=2), 10, "rate_limit_exceeded"),
    "tokens": (LimitSpec(rpm=2, tpm=100, max_streams=2), 95, "rate_limit_exceeded"),
    "streams": (LimitSpec(rpm=2, tpm=100, max_streams=1), 10, "concurrent_streams_exceeded"),
}


@pytest.mark.parametrize("blocker", sorted(REFUSALS))
async def test_a_refused_admission_consumes_nothing(make: MakeLimiter, blocker: str) -> None:
    """When one limit refuses, the request, token and stream budgets stay untouched."""
    limiter = make(window_s=60.0)
    spec = LimitSpec(rpm=2, tpm=100, max_streams=2)
    await limiter.admit("k", spec, 10, "a")
    refusing_spec, tokens, code = REFUSALS[blocker]
    assert (await refused(limiter, "k", refusing_spec, tokens, "b")).code == code
    last = await limiter.admit("k", spec, 89, "c")  # exactly what is left
    assert last.headers["x-ratelimit-remaining-requests"] == "0"
    assert last.headers["x-ratelimit-remaining-tokens"] == "1"


async def test_failed_authentications_are_throttled_per_client(make: MakeLimiter) -> None:
    """3 failures per 0.6 s: blocked for about 0.2 s, not extended by more failures, then free."""
    limiter = make(window_s=0.6, auth_failures_per_window=3)
    assert await limiter.auth_blocked("1.2.3.4") is None
    for _ in range(3):
        await limiter.auth_failed("1.2.3.4")
    blocked = await limiter.auth_blocked("1.2.3.4")
    assert blocked is not None and 0.15 <= blocked <= 0.2
    for _ in range(5):
        await limiter.auth_failed("1.2.3.4")
    still = await limiter.auth_blocked("1.2.3.4")
    assert still is not None and still <= blocked
    assert await limiter.auth_blocked("5.6.7.8") is None
    deadline = time.monotonic() + 2.0
    while await limiter.auth_blocked("1.2.3.4") is not None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


# What only a shared backend has.


async def test_keys_are_named_by_prefix_and_expire(make: MakeLimiter, prefix: str) -> None:
    """r:/t:/s:/a: keys under the prefix, each with a TTL (GCRA: until the bucket is full)."""
    limiter = make(window_s=60.0, auth_failures_per_window=30)
    await limiter.admit("key1", LimitSpec(rpm=5, tpm=1000, max_streams=2), 100, "st")
    await limiter.auth_failed("9.9.9.9")
    client = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        ttls = {
            k: await client.pttl(prefix + k) for k in ("r:key1", "t:key1", "s:key1", "a:9.9.9.9")
        }
        assert await client.zrange(prefix + "s:key1", 0, -1) == ["st"]
    finally:
        await client.aclose()
    assert 11_000 < ttls["r:key1"] <= 12_000  # 1 of 5 per 60 s
    assert 5_000 < ttls["t:key1"] <= 6_000  # 100 of 1000 per 60 s
    assert 1_000 < ttls["a:9.9.9.9"] <= 2_000  # 1 of 30 per 60 s
    assert 25_000 < ttls["s:key1"] <= 30_000  # one slot lease, renewed while the stream runs


async def test_slots_of_a_process_that_stopped_renewing_age_out(make: MakeLimiter) -> None:
    """A slot whose process died (no release, no renewal) frees itself when its lease ends."""
    crashed = make(slot_lease_s=0.3)
    alive = make()
    spec = LimitSpec(max_streams=2)
    await crashed.admit("k", spec, 0, "crashed")
    await crashed.aclose()  # the process is gone: nobody renews its slot
    await alive.admit("k", spec, 0, "alive")  # keeps the set itself from expiring
    await refused(alive, "k", spec, 0)
    await admit_eventually(alive, "k", spec, 0, timeout_s=5.0)
    await refused(alive, "k", spec, 0)


async def test_release_nowait_is_never_taken_and_leaves_the_slot_held(make: MakeLimiter) -> None:
    """Releasing needs a round trip to Redis: ``release_nowait`` does nothing and says so
    (False), the slot stays taken, and the awaited ``release`` frees it."""
    limiter = make()
    spec = LimitSpec(max_streams=1)
    admission = await limiter.admit("k", spec, 0, "a")
    assert limiter.release_nowait(admission, spec, 0) is False
    assert limiter.held_slots == 1
    await refused(limiter, "k", spec, 0)
    await limiter.release(admission, spec, 0)
    await limiter.admit("k", spec, 0, "b")


async def test_a_renewed_slot_outlives_its_lease(make: MakeLimiter) -> None:
    """While its process renews it, a slot stays taken for several leases."""
    limiter = make(slot_lease_s=0.3)
    spec = LimitSpec(max_streams=1)
    await limiter.admit("k", spec, 0, "long")
    deadline = time.monotonic() + 1.2  # four leases
    while time.monotonic() < deadline:
        await limiter.renew_once()
        await refused(limiter, "k", spec, 0)
        await asyncio.sleep(0.05)
    assert limiter.held_slots == 1


async def test_a_redis_that_restarted_empty_gets_live_slots_back(
    make: MakeLimiter, private_redis: PrivateRedis
) -> None:
    """After Redis restarts empty, the next renewal puts the live slots back: the stream cap
    holds again, and releases still free them."""
    limiter = make(url=private_redis.url)
    spec = LimitSpec(max_streams=1)
    first = await limiter.admit("k", spec, 0, "live")
    private_redis.restart()
    other = make(url=private_redis.url)
    probe = await other.admit("k", spec, 0, "probe")  # the empty Redis admits one more
    await other.release(probe, spec, 0)
    await limiter.renew_once()
    await refused(other, "k", spec, 0)
    await limiter.release(first, spec, 0)
    await other.admit("k", spec, 0, "next")


async def test_a_release_that_failed_is_retried_until_redis_takes_it(
    make: MakeLimiter, private_redis: PrivateRedis
) -> None:
    """A release while Redis is unreachable raises, stops renewing the slot, and is sent
    again by the renewal once Redis answers: the slot frees without waiting for its lease."""
    limiter = make(url=private_redis.url)
    spec = LimitSpec(max_streams=1)
    admission = await limiter.admit("k", spec, 0, "s")
    private_redis.pause()
    try:
        with pytest.raises(LimiterUnavailable):
            await limiter.release(admission, spec, 0)
    finally:
        private_redis.resume()
    assert limiter.held_slots == 0
    client = Redis.from_url(private_redis.url)
    try:
        assert await client.zcard(f"{limiter._prefix}s:k") == 1  # Redis never heard of it
        await limiter.renew_once()
        assert await client.zcard(f"{limiter._prefix}s:k") == 0
    finally:
        await client.aclose()
    await limiter.admit("k", spec, 0, "next")


async def test_an_admission_that_timed_out_gives_back_the_slot_it_may_have_taken(
    make: MakeLimiter, private_redis: PrivateRedis
) -> None:
    """Redis hung: the admission times out (503), but Redis runs it once it answers again;
    the next admission first takes that slot back, so it is admitted, not refused."""
    limiter = make(url=private_redis.url)
    spec = LimitSpec(max_streams=1)
    warm = await limiter.admit("k", spec, 0, "warm")  # the script is loaded in Redis
    await limiter.release(warm, spec, 0)
    private_redis.pause()
    try:
        with pytest.raises(LimiterUnavailable):
            await limiter.admit("k", spec, 0, "timed-out")
    finally:
        private_redis.resume()
    client = Redis.from_url(private_redis.url)
    try:
        async with asyncio.timeout(5):
            while await client.zcard(f"{limiter._prefix}s:k") == 0:  # noqa: ASYNC110 - Redis state
                await asyncio.sleep(0.01)  # the queued script ran after the resume
    finally:
        await client.aclose()
    await limiter.admit("k", spec, 0, "next")


async def test_two_processes_share_one_budget(make: MakeLimiter) -> None:
    """Two limiters (as two gateway processes) on rpm=6: 3 + 3 admitted, the 7th refused by both."""
    one, two = make(), make()
    spec = LimitSpec(rpm=6)
    for i in range(3):
        await one.admit("k", spec, 0, f"one{i}")
        await two.admit("k", spec, 0, f"two{i}")
    await refused(one, "k", spec, 0)
    await refused(two, "k", spec, 0)


async def test_concurrent_admissions_are_atomic(make: MakeLimiter) -> None:
    """50 admissions at once on rpm=10 (over two limiters): exactly 10 pass."""
    limiters = [make(), make()]
    spec = LimitSpec(rpm=10, tpm=10_000, max_streams=20)
    results = await asyncio.gather(
        *(limiters[i % 2].admit("k", spec, 100, f"s{i}") for i in range(50)),
        return_exceptions=True,
    )
    admitted = [r for r in results if isinstance(r, Admission)]
    assert len(admitted) == 10
    assert all(isinstance(r, LimitExceeded) for r in results if not isinstance(r, Admission))
    assert sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in admitted) == list(
        range(10)
    )


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_redis_down_raises_limiter_unavailable() -> None:
    """Connection refused: every method raises a 503 naming the URL, never its password."""
    port = closed_port()
    limiter = RedisRateLimiter(f"redis://user:s3cret@127.0.0.1:{port}/0")
    spec = LimitSpec(rpm=1)
    admission = Admission("k", "s", 1)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: limiter.admit("k", spec, 1, "s"),
        lambda: limiter.release(admission, spec, 1),
        lambda: limiter.auth_blocked("c"),
        lambda: limiter.auth_failed("c"),
    ]
    started = time.monotonic()
    try:
        for call in calls:
            with pytest.raises(LimiterUnavailable) as info:
                await call()
            exc = info.value
            assert exc.http_status == 503
            assert exc.to_body()["error"]["type"] == "api_error"
            assert exc.code == "rate_limiter_unavailable"
            assert "unavailable" in exc.message and "127.0.0.1" not in exc.message
            assert "s3cret" not in exc.message
    finally:
        await limiter.aclose()
    assert time.monotonic() - started < 5.0  # fails fast, no long retry loop


def test_redact_url_drops_passwords() -> None:
    """Passwords in the userinfo or the query never reach a message."""
    assert redact_url("redis://:pw@example.com:6380/1") == "redis://example.com:6380/1"
    assert redact_url("rediss://u:pw@[::1]:6379/0") == "rediss://u@[::1]:6379/0"
    assert redact_url("unix:///run/redis.sock?db=0&password=pw") == "unix:///run/redis.sock"


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_memory_and_redis_agree_on_a_random_sequence(make: MakeLimiter, seed: int) -> None:
    """The same random admits and settles give the same outcomes, codes and remaining counts."""
    # Intervals of seconds or more, so the ms the test takes change nothing; limits whose
    # intervals share no ratio, so no two refusals tie on retry-after (float noise would pick).
    window = 3600.0
    backends: list[RateLimiter] = [MemoryRateLimiter(window_s=window), make(window_s=window)]
    specs = {
        "a": LimitSpec(rpm=7, tpm=997, max_streams=2),
        "b": LimitSpec(tpm=499),
        "c": LimitSpec(rpm=3, max_streams=1),
        "d": LimitSpec(max_streams=2),
    }
    rng = random.Random(seed)
    pending: list[tuple[Admission, Admission]] = []
    outcomes: list[tuple[object, ...]] = []
    # The two backends see each call a little apart in time (a Redis round trip, more on a
    # loaded machine), so their retry-afters differ by up to the largest such gap so far.
    widest_gap_s = 0.0
    for step in range(300):
        if pending and rng.random() < 0.4:
            pair = pending.pop(rng.randrange(len(pending)))
            actual = rng.randint(0, 300)
            for backend, admission in zip(backends, pair, strict=True):
                await backend.release(admission, specs[admission.key_id], actual)
            continue
        key = rng.choice(sorted(specs))
        tokens = rng.randint(0, 600)
        seen: list[tuple[object, ...]] = []
        retry_after: list[float] = []
        admissions: list[Admission] = []
        started = time.monotonic()
        for backend in backends:
            try:
                admission = await backend.admit(key, specs[key], tokens, f"s{step}")
            except LimitExceeded as exc:
                headers = exc.limit_headers
                seen.append((exc.code, exc.message))
                retry_after.append(exc.retry_after_s)
            else:
                admissions.append(admission)
                headers = admission.headers
                seen.append(("ok",))
            seen[-1] += tuple(v for k, v in sorted(headers.items()) if "remaining" in k.lower())
        widest_gap_s = max(widest_gap_s, time.monotonic() - started)
        assert seen[0] == seen[1], f"step {step}: {seen}"
        if retry_after:
            tolerance = 0.05 + 2 * widest_gap_s
            assert retry_after[0] == pytest.approx(retry_after[1], abs=tolerance), f"step {step}"
        outcomes.append(seen[0])
        if len(admissions) == 2:
            pending.append((admissions[0], admissions[1]))
    codes = {outcome[0] for outcome in outcomes}
    assert codes == {
        "ok",
        "rate_limit_exceeded",
        "tokens_exceed_limit",
        "concurrent_streams_exceeded",
    }
