"""The Redis limiter's round trips: calls asked for while one is under way share the next, as
one pipeline of EVALSHAs, and get exactly the answers separate calls would have given.

Pipelines are counted by wrapping redis-py's ``Pipeline.execute`` (which can also hold a
pipeline at a gate). Fault tests use a private Redis to kill or hang.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenwire.errors import LimiterUnavailable
from tokenwire.limits.base import Admission, LimitExceeded, LimitSpec, RateLimiter
from tokenwire.limits.memory import MemoryRateLimiter
from tokenwire.limits.redis import RedisRateLimiter
from tokenwire.testing_services import PrivateRedis

MakeLimiter = Callable[..., RedisRateLimiter]


@dataclass
class Pipelines:
    """The pipelines executed (each as its command names), and a gate to hold them at."""

    sent: list[list[str]] = field(default_factory=list)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event | None = None

    def since(self, start: int) -> list[list[str]]:
        return self.sent[start:]


@pytest.fixture
def pipelines(monkeypatch: pytest.MonkeyPatch) -> Pipelines:
    """Record every redis-py pipeline execution of the test."""
    seen = Pipelines()
    original = Pipeline.execute

    async def execute(self: Pipeline, raise_on_error: bool = True) -> list[Any]:
        seen.sent.append([str(args[0]).upper() for args, _ in self.command_stack])
        seen.entered.set()
        if seen.gate is not None:
            await seen.gate.wait()
        return await original(self, raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", execute)
    return seen


Outcome = tuple[object, ...]


async def outcome(limiter: RateLimiter, key: str, spec: LimitSpec, tokens: int, sid: str) -> Any:
    """What one admission answered: ``("ok", remaining…)`` or ``(code, message, remaining…)``,
    and the admission (None when refused)."""
    try:
        admission = await limiter.admit(key, spec, tokens, sid)
    except LimitExceeded as exc:
        remaining = tuple(v for k, v in sorted(exc.limit_headers.items()) if "remaining" in k)
        return (exc.code, exc.message, *remaining), None
    remaining = tuple(v for k, v in sorted(admission.headers.items()) if "remaining" in k)
    return ("ok", *remaining), admission


async def test_each_call_alone_is_one_pipeline_of_one_script(
    make: MakeLimiter, pipelines: Pipelines
) -> None:
    """admit, release, auth_blocked and auth_failed, one at a time: one EVALSHA each, in a
    pipeline of its own (one round trip)."""
    limiter = make()
    spec = LimitSpec(rpm=5, tpm=1000, max_streams=2)
    warm = await limiter.admit("warm", spec, 1, "w")  # loads the script if the server lacks it
    await limiter.release(warm, spec, 1)
    await limiter.auth_blocked("c")
    start = len(pipelines.sent)
    admission = await limiter.admit("k", spec, 10, "a")
    await limiter.release(admission, spec, 5)
    await limiter.auth_blocked("c")
    await limiter.auth_failed("c")
    assert pipelines.since(start) == [["EVALSHA"]] * 4


SPECS = {
    "a": LimitSpec(rpm=100, max_streams=150),
    "b": LimitSpec(tpm=5000, max_streams=40),
    "c": LimitSpec(max_streams=25),
    "d": LimitSpec(rpm=30, tpm=2000),
}


def request(i: int) -> tuple[str, LimitSpec, int, str]:
    key = "abcd"[i % 4]
    return key, SPECS[key], (i % 7) * 40, f"s{i}"


async def test_a_burst_shares_few_pipelines_and_answers_as_separate_calls(
    make: MakeLimiter, pipelines: Pipelines
) -> None:
    """600 admissions at once over four keys (rpm, tpm, stream caps): a few pipelines, not
    600, and every request gets what the same calls one after another get from the in-process
    limiter (the stream cap of 25 admits exactly 25); releasing them all at once frees every
    slot, again in a few pipelines."""
    window = 3600.0  # intervals of seconds: the ms a burst takes change no count
    limiter = make(window_s=window)
    await limiter.auth_blocked("warm")  # scripts loaded: the counts below are the burst's
    start = len(pipelines.sent)
    burst = 600
    got = await asyncio.gather(*(outcome(limiter, *request(i)) for i in range(burst)))
    batches = pipelines.since(start)
    assert sum(len(batch) for batch in batches) == burst
    assert {name for batch in batches for name in batch} == {"EVALSHA"}
    assert len(batches) <= 4, [len(b) for b in batches]  # 600 = 256 + 256 + 88

    memory = MemoryRateLimiter(window_s=window)
    expected = [(await outcome(memory, *request(i)))[0] for i in range(burst)]
    assert [answer for answer, _ in got] == expected
    codes = [answer[0] for answer in expected]
    assert {"ok", "rate_limit_exceeded", "concurrent_streams_exceeded"} <= set(codes)
    admitted = [admission for _, admission in got if admission is not None]
    assert sum(1 for a in admitted if a.key_id == "c") == 25
    assert limiter.held_slots == 25 + 40 + 100  # c, b (its cap), a (its rpm)

    start = len(pipelines.sent)
    await asyncio.gather(*(limiter.release(a, SPECS[a.key_id], 0) for a in admitted))
    assert len(pipelines.since(start)) <= 3  # 165 releases
    assert limiter.held_slots == 0
    again = await asyncio.gather(
        *(outcome(limiter, "c", SPECS["c"], 0, f"again{i}") for i in range(30))
    )
    assert [answer[0] for answer, _ in again] == ["ok"] * 25 + ["concurrent_streams_exceeded"] * 5


async def test_a_caller_gone_while_its_admission_is_decided_gives_its_slot_back(
    make: MakeLimiter, pipelines: Pipelines, prefix: str
) -> None:
    """A request cancelled while its admission's round trip is under way: the others in the
    batch get their answers, and the slot it was given is released, not held for a lease."""
    limiter = make()
    spec = LimitSpec(max_streams=5)
    pipelines.gate = asyncio.Event()
    gone = asyncio.ensure_future(limiter.admit("k", spec, 0, "gone"))
    stays = asyncio.ensure_future(limiter.admit("k", spec, 0, "stays"))
    await pipelines.entered.wait()
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    pipelines.gate.set()
    assert (await stays).stream_id == "stays"
    await limiter.aclose()  # waits for the round trip and for the slot given back
    client = Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    try:
        assert await client.zrange(f"{prefix}s:k", 0, -1) == ["stays"]
    finally:
        await client.aclose()
    assert pipelines.sent[-1] == ["EVALSHA"]  # the release of "gone", after the batch


@pytest.mark.parametrize("outage", ["killed", "hung"])
async def test_redis_failing_mid_batch_fails_that_batch_and_slots_come_back(
    make: MakeLimiter,
    pipelines: Pipelines,
    private_redis: PrivateRedis,
    caplog: pytest.LogCaptureFixture,
    outage: str,
) -> None:
    """Redis killed (or hung) while a batch of 20 admissions is under way, 5 more waiting for
    the next round trip: all 25 get LimiterUnavailable in bounded time, one ERROR line per
    failed batch; the next batch sends their slot releases first (a hung Redis still ran the
    first 20 when it woke), so once Redis is back the stream cap of 20 admits 20 again."""
    limiter = make(url=private_redis.url)
    spec = LimitSpec(max_streams=20)
    warm = await limiter.admit("k", spec, 0, "warm")
    await limiter.release(warm, spec, 0)
    caplog.set_level(logging.ERROR, logger="tokenwire.limits")
    start = len(pipelines.sent)
    pipelines.entered.clear()
    private_redis.pause()
    try:
        first = [asyncio.ensure_future(limiter.admit("k", spec, 0, f"a{i}")) for i in range(20)]
        await pipelines.entered.wait()
        later = [asyncio.ensure_future(limiter.admit("k", spec, 0, f"b{i}")) for i in range(5)]
        if outage == "killed":
            private_redis.kill()
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(*first, *later, return_exceptions=True)
    finally:
        if outage == "hung":
            private_redis.resume()
    assert all(isinstance(o, LimiterUnavailable) for o in outcomes), outcomes
    failed = pipelines.since(start)
    assert [len(batch) for batch in failed] == [20, 20 + 5]  # the second: 20 releases first
    errors = [r for r in caplog.records if r.name == "tokenwire.limits"]
    assert len(errors) == len(failed), [r.getMessage() for r in errors]
    assert limiter.held_slots == 0

    client = Redis.from_url(private_redis.url)
    try:
        if outage == "killed":
            private_redis.start()  # empty
        else:
            async with asyncio.timeout(5):  # the hung batch ran when Redis woke: 20 ghosts
                while await client.zcard(f"{limiter._prefix}s:k") < 20:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        back = await asyncio.gather(*(outcome(limiter, "k", spec, 0, f"c{i}") for i in range(21)))
        assert [answer[0] for answer, _ in back] == ["ok"] * 20 + ["concurrent_streams_exceeded"]
        assert await client.zcard(f"{limiter._prefix}s:k") == 20
    finally:
        await client.aclose()
    assert limiter.held_slots == 20


async def test_scripts_redis_lost_are_loaded_again(
    make: MakeLimiter, pipelines: Pipelines, private_redis: PrivateRedis
) -> None:
    """After SCRIPT FLUSH, a batch answered NOSCRIPT loads the scripts and sends those calls
    again in one more round trip; every caller gets its answer."""
    limiter = make(url=private_redis.url)
    spec = LimitSpec(rpm=10, max_streams=3)
    await limiter.admit("k", spec, 0, "first")
    client = Redis.from_url(private_redis.url)
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    start = len(pipelines.sent)
    admitted = await asyncio.gather(
        *(limiter.admit("k", spec, 0, f"s{i}") for i in range(2)),
        limiter.auth_failed("1.2.3.4"),
    )
    assert [a.stream_id for a in admitted[:2] if isinstance(a, Admission)] == ["s0", "s1"]
    assert pipelines.since(start) == [
        ["EVALSHA"] * 3,
        ["SCRIPT LOAD"] * 2 + ["EVALSHA"] * 3,
    ]
    third = await outcome(limiter, "k", spec, 0, "s3")
    assert third[0][0] == "concurrent_streams_exceeded"


async def test_a_release_resent_after_a_lost_reply_corrects_the_tokens_once(
    make: MakeLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release (estimate 600 tokens, used 100) that Redis runs but whose reply is lost (a
    read timing out after Redis ran the batch) fails; the renewal sends it again. The slot is
    free and the token bucket was given back the 500 once: 100 are counted, so 950 more do
    not fit in the 1,000 a window while 850 do (given back twice, 950 would fit)."""
    limiter = make(window_s=3600.0)
    spec = LimitSpec(tpm=1000, max_streams=1)
    admission = await limiter.admit("k", spec, 600, "s")
    original = Pipeline.execute
    sent: list[int] = []

    async def reply_lost(self: Pipeline, raise_on_error: bool = True) -> list[Any]:
        sent.append(len(self.command_stack))
        await original(self, raise_on_error)  # Redis runs the batch...
        raise RedisTimeoutError("Timeout reading from Redis")  # ...and its answer is lost

    monkeypatch.setattr(Pipeline, "execute", reply_lost)
    with pytest.raises(LimiterUnavailable):
        await limiter.release(admission, spec, 100)
    monkeypatch.setattr(Pipeline, "execute", original)
    assert sent == [1] and limiter.held_slots == 0
    await limiter.renew_once()  # sends the unconfirmed release again
    refused, _ = await outcome(limiter, "k", LimitSpec(tpm=1000), 950, "t")
    assert refused[0] == "rate_limit_exceeded", refused
    admitted, _ = await outcome(limiter, "k", LimitSpec(tpm=1000), 850, "u")
    assert admitted[0] == "ok", admitted
    await slot_is_free(limiter, spec)


async def slot_is_free(limiter: RedisRateLimiter, spec: LimitSpec) -> None:
    """The key's one stream slot is free: a stream-only admission gets it."""
    admission = await limiter.admit("k", LimitSpec(max_streams=spec.max_streams), 0, "v")
    await limiter.release(admission, LimitSpec(max_streams=spec.max_streams), 0)
