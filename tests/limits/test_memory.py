"""The in-process rate limiter (the reference semantics), on an injected clock.

``tests/limits/test_redis.py`` mirrors this suite test for test against Redis.
"""

from __future__ import annotations

import math
import time

import pytest

from tokenwire.limits import memory
from tokenwire.limits.base import Admission, LimitExceeded, LimitSpec
from tokenwire.limits.memory import MemoryRateLimiter

START = 1000.0


class FakeClock:
    """Stands in for the ``time`` module inside :mod:`tokenwire.limits.memory`."""

    def __init__(self) -> None:
        self.now = START

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Freeze the memory backend's clock; tests move it by setting ``now``."""
    fake = FakeClock()
    monkeypatch.setattr(memory, "time", fake)
    return fake


async def refused(
    limiter: MemoryRateLimiter, key: str, spec: LimitSpec, tokens: int, stream: str = "x"
) -> LimitExceeded:
    """The LimitExceeded an admission raises (fails the test if it is admitted)."""
    with pytest.raises(LimitExceeded) as info:
        await limiter.admit(key, spec, tokens, stream)
    return info.value


# Windows and limits whose interval is exact in binary, so the boundary can be hit exactly.
@pytest.mark.parametrize(("rpm", "window_s"), [(5, 60.0), (1, 60.0), (4, 1.0), (16, 2.0)])
async def test_rpm_admits_the_limit_then_refuses_until_one_interval_passes(
    clock: FakeClock, rpm: int, window_s: float
) -> None:
    """rpm=N admits N (remaining counts down), refuses the next for window/N, then admits."""
    limiter = MemoryRateLimiter(window_s=window_s)
    spec = LimitSpec(rpm=rpm)
    interval = window_s / rpm
    for i in range(rpm):
        admission = await limiter.admit("k", spec, 0, f"s{i}")
        assert admission.headers["x-ratelimit-remaining-requests"] == str(rpm - 1 - i)
        assert admission.headers["X-RateLimit-Remaining"] == str(rpm - 1 - i)
    exc = await refused(limiter, "k", spec, 0)
    assert exc.code == "rate_limit_exceeded"
    assert exc.http_status == 429
    assert exc.message == f"Rate limit reached: {rpm} requests per {window_s:g} s."
    assert exc.retry_after_s == pytest.approx(interval)
    headers = exc.headers()
    assert headers["x-ratelimit-limit-requests"] == str(rpm)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"]
    assert headers["X-RateLimit-Limit"] == str(rpm)
    assert headers["X-RateLimit-Remaining"] == "0"
    assert abs(int(headers["X-RateLimit-Reset"]) - (time.time() + window_s)) <= 2
    assert headers["Retry-After"] == str(max(1, math.ceil(interval)))
    clock.now = START + interval - 1e-6
    await refused(limiter, "k", spec, 0)
    clock.now = START + interval
    admission = await limiter.admit("k", spec, 0, "again")
    assert admission.headers["x-ratelimit-remaining-requests"] == "0"


async def test_header_values_count_down(clock: FakeClock) -> None:
    """Both buckets' limit, remaining and reset headers, and the X-RateLimit trio."""
    limiter = MemoryRateLimiter(window_s=60.0)
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


async def test_token_estimates_are_reconciled_on_settle(clock: FakeClock) -> None:
    """Fewer actual tokens refund the bucket; more actual tokens consume the difference."""
    limiter = MemoryRateLimiter(window_s=60.0)
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


async def test_request_larger_than_tpm_is_refused_outright(clock: FakeClock) -> None:
    """tokens > tpm: code tokens_exceed_limit, Retry-After a whole window, nothing consumed."""
    limiter = MemoryRateLimiter(window_s=60.0)
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


async def test_concurrent_streams_are_capped_and_released_on_settle(clock: FakeClock) -> None:
    """max_streams=2: a third stream is refused until one of the two settles."""
    limiter = MemoryRateLimiter(window_s=60.0)
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


# The spec and tokens of an admission that one limit refuses after a first admission of 10.
REFUSALS = {
    "requests": (LimitSpec(rpm=1, tpm=100, max_streams=2), 10, "rate_limit_exceeded"),
    "tokens": (LimitSpec(rpm=2, tpm=100, max_streams=2), 95, "rate_limit_exceeded"),
    "streams": (LimitSpec(rpm=2, tpm=100, max_streams=1), 10, "concurrent_streams_exceeded"),
}


@pytest.mark.parametrize("blocker", sorted(REFUSALS))
async def test_a_refused_admission_consumes_nothing(clock: FakeClock, blocker: str) -> None:
    """When one limit refuses, the request, token and stream budgets stay untouched."""
    limiter = MemoryRateLimiter(window_s=60.0)
    spec = LimitSpec(rpm=2, tpm=100, max_streams=2)
    await limiter.admit("k", spec, 10, "a")
    refusing_spec, tokens, code = REFUSALS[blocker]
    assert (await refused(limiter, "k", refusing_spec, tokens, "b")).code == code
    last: Admission = await limiter.admit("k", spec, 89, "c")  # exactly what is left
    assert last.headers["x-ratelimit-remaining-requests"] == "0"
    assert last.headers["x-ratelimit-remaining-tokens"] == "1"


async def test_failed_authentications_are_throttled_per_client(clock: FakeClock) -> None:
    """30/window failures by default; here 3 per 60 s: blocked for 20 s, then free again."""
    limiter = MemoryRateLimiter(window_s=60.0, auth_failures_per_window=3)
    assert await limiter.auth_blocked("1.2.3.4") is None
    for _ in range(3):
        await limiter.auth_failed("1.2.3.4")
    assert await limiter.auth_blocked("1.2.3.4") == pytest.approx(20.0)
    for _ in range(5):  # failures while blocked do not extend the block
        await limiter.auth_failed("1.2.3.4")
    assert await limiter.auth_blocked("1.2.3.4") == pytest.approx(20.0)
    assert await limiter.auth_blocked("5.6.7.8") is None
    clock.now = START + 20.0
    assert await limiter.auth_blocked("1.2.3.4") is None
    await limiter.aclose()


async def test_release_nowait_frees_the_slot_and_corrects_tokens_at_once(clock: FakeClock) -> None:
    """The in-process limiter releases without I/O: ``release_nowait`` says so (True), the
    slot is free at once, and the token bucket is corrected as ``release`` would."""
    limiter = MemoryRateLimiter(window_s=60.0)
    spec = LimitSpec(max_streams=1, tpm=100)
    admission = await limiter.admit("k", spec, 90, "a")
    await refused(limiter, "k", spec, 5, "b")  # the slot is taken
    assert limiter.release_nowait(admission, spec, 10) is True  # 80 of the 90 given back
    assert limiter.held_slots == 0
    await limiter.admit("k", spec, 85, "b")  # 10 + 85 <= 100
