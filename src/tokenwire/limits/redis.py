"""The Redis rate-limit backend: every gateway process shares one budget per key.

Same semantics as :mod:`tokenwire.limits.memory` (codes, messages, ``Retry-After``, headers,
all-or-nothing admission), kept in Redis so several processes agree:

* Each call runs one Lua script (EVALSHA), and a script runs atomically, so an admission
  checks the request GCRA, the token GCRA (or "tokens_exceed_limit") and the stream cap and
  then writes all of them or none, with no race between processes.
* The calls share round trips: the first goes at once, those asked for while it is under way
  (admissions, releases, renewals, authentication checks) go together in the next one, as
  ONE pipeline of EVALSHAs (:class:`tokenwire.batching.Batcher`). A burst of N requests costs
  a few round trips on one connection, not N round trips each waiting for a connection of
  the pool. Scripts Redis no longer knows (NOSCRIPT: a restart, ``SCRIPT FLUSH``) are loaded
  and those calls sent again, as redis-py's ``Script`` does for one.
* A batch that fails (Redis down, hung, refusing) fails its calls only, each with
  :class:`LimiterUnavailable` (503), logged once per batch. A read that times out is not sent
  again (Redis may still run it: its admissions would count twice); a connection found closed
  is retried once. The socket timeout (``SOCKET_TIMEOUT_S``) applies to each reply of the
  pipeline, and Redis answers a batch of ``MAX_BATCH`` scripts in a few ms, so it bounds a
  dead Redis per batch as it did per call.
* Time is the Redis server's (``TIME``), so gateway clocks may disagree.
* A TAT is stored as ``"<server µs when written> <seconds ahead of then>"``: the arithmetic
  stays on small numbers (a double holds epoch microseconds only to ~0.25 µs, too coarse next
  to a small interval) and follows :func:`tokenwire.limits.base.gcra` step for step, relative
  to now. A GCRA key expires (PX) when its bucket would be full again.
* Open streams are a ZSET per key of stream ids scored by an expiry: a **lease** of
  ``SLOT_LEASE_S`` that the admitting process renews while the stream runs (one script for
  all of its slots every third of a lease). Expired entries are removed before counting, so
  the slots of a crashed process, or ones whose release failed while Redis was unreachable,
  free themselves within a lease; a release that failed is sent again at the head of every
  later batch until Redis takes it (the slot only: its token correction may already have
  been applied by a batch that timed out, and is not applied twice), and a Redis that
  restarted empty gets the live slots back from the renewal. An admission whose batch
  failed may still have run when Redis answers again: its slot is taken back like a failed
  release (at the head of a batch, so before the admissions of that batch count the
  slots). So is the slot of an admission whose caller went away while it was being decided.
* Keys: ``{prefix}r:{key_id}`` (requests), ``{prefix}t:{key_id}`` (tokens),
  ``{prefix}s:{key_id}`` (streams), ``{prefix}a:{client}`` (failed authentications).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from tokenwire.batching import MAX_BATCH, Batcher
from tokenwire.errors import LimiterUnavailable
from tokenwire.limits import redis_scripts
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
SOCKET_TIMEOUT_S = 2.0  # for each reply, each connection wait, each connect
UNAVAILABLE = "The rate limiter is unavailable; the request was not admitted."


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


def _unavailable(cause: BaseException | None = None) -> LimiterUnavailable:
    """The 503 each caller of a failed batch raises (its own instance)."""
    error = LimiterUnavailable(UNAVAILABLE)
    error.__cause__ = cause
    return error


@dataclass(frozen=True, slots=True)
class _Release:
    """A slot release (and token correction) Redis has not confirmed: sent again until it is."""

    admission: Admission
    spec: LimitSpec
    actual_tokens: int

    def slot_only(self) -> _Release:
        """This release without its token correction: what is sent again after a failure.
        A batch that timed out may still have run, and freeing a slot twice is harmless
        where correcting the token bucket twice is not."""
        return _Release(self.admission, self.spec, self.admission.tokens)


@dataclass(frozen=True, slots=True)
class _Call:
    """One script run in a batch. ``on_failure``: the release to send again should the call
    fail (it may still have run, or not); ``on_abandon``: the release to send should its
    caller go away before the answer (an admission's slot, which nobody would release)."""

    script: AsyncScript
    keys: list[str]
    args: tuple[str | float, ...]
    on_failure: _Release | None = None
    on_abandon: _Release | None = None


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
            # A connection found closed (Redis restarted) is retried once; a timed-out batch
            # is not (Redis may still run it, and its admissions would count twice).
            retry=Retry(
                ExponentialWithJitterBackoff(cap=0.05, base=0.01),
                retries=1,
                supported_errors=(RedisConnectionError,),
            ),
        )
        self._admit = self._redis.register_script(redis_scripts.ADMIT)
        self._settle = self._redis.register_script(redis_scripts.SETTLE)
        self._renew = self._redis.register_script(redis_scripts.RENEW)
        self._auth = self._redis.register_script(redis_scripts.AUTH)
        self._batcher: Batcher[_Call, list[float]] = Batcher(
            self._run_batch,
            name="limits-redis",
            unavailable=_unavailable,
            abandoned=self._abandoned,
        )
        self._lease_s = slot_lease_s
        # Stream slots this process holds (stream id → key id), renewed until released, and
        # releases Redis did not confirm (sent again at the head of each batch until it does).
        self._held: dict[str, str] = {}
        self._unreleased: dict[str, _Release] = {}
        self._renewer: asyncio.Task[None] | None = None

    def _keys(self, kinds: str, name: str) -> list[str]:
        return [f"{self._prefix}{kind}:{name}" for kind in kinds]

    async def _call(self, call: _Call) -> list[float]:
        """Run ``call`` in the next batch: its script's reply, or :class:`LimiterUnavailable`."""
        return await self._batcher.submit(call)

    async def _run_batch(self, calls: list[_Call]) -> Sequence[list[float] | Exception]:
        """One pipeline: the releases Redis has not confirmed yet, then ``calls`` in order."""
        retried = list(islice(self._unreleased.values(), MAX_BATCH))
        replies = await self._send([*map(self._settle_call, retried), *calls])
        for release, reply in zip(retried, replies, strict=False):
            if not isinstance(reply, Exception):
                self._unreleased.pop(release.admission.stream_id, None)
        outcomes: list[list[float] | Exception] = []
        for call, reply in zip(calls, replies[len(retried) :], strict=True):
            if isinstance(reply, Exception):
                if call.on_failure is not None:
                    release = call.on_failure.slot_only()
                    self._unreleased[release.admission.stream_id] = release
                outcomes.append(_unavailable(reply))
            else:
                outcomes.append([float(v) for v in reply.split()] if isinstance(reply, str) else [])
        if self._unreleased:
            self._start_renewing()
        return outcomes

    async def _send(self, calls: list[_Call]) -> list[Any]:
        """Each call's reply or error (the batch's error for all, if it failed); logged once."""
        try:
            replies = await self._pipeline(calls)
        except Exception as exc:  # noqa: BLE001 - logged; every call of the batch fails with it
            log.error(
                "rate limiter: Redis at %s failed (a batch of %d scripts): %s: %s",
                self._url,
                len(calls),
                type(exc).__name__,
                exc,
            )
            return [exc] * len(calls)
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if errors:
            log.error(
                "rate limiter: Redis at %s refused %d of %d scripts: %s: %s",
                self._url,
                len(errors),
                len(calls),
                type(errors[0]).__name__,
                errors[0],
            )
        return replies

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        """EVALSHA each call in one pipeline; the calls Redis answers NOSCRIPT (it lost the
        scripts) again after loading their scripts, in a second one."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if not missing:
                return replies
            scripts = {calls[i].script.sha: calls[i].script for i in missing}
            for script in scripts.values():
                pipe.script_load(script.script)
            for i in missing:
                call = calls[i]
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            again: list[Any] = await pipe.execute(raise_on_error=False)
        for i, reply in zip(missing, again[len(scripts) :], strict=True):
            replies[i] = reply
        return replies

    def _settle_call(self, release: _Release) -> _Call:
        admission = release.admission
        delta = release.actual_tokens - admission.tokens
        return _Call(
            self._settle,
            self._keys("ts", admission.key_id),
            (admission.stream_id, _opt(release.spec.tpm), delta, self._window_s),
            on_failure=release,
        )

    async def _abandoned(self, call: _Call, reply: list[float]) -> None:
        """An admission whose caller went away: free the slot it may hold (tokens and the
        request stay counted, as for a request that ran)."""
        if call.on_abandon is not None:
            with contextlib.suppress(LimiterUnavailable):  # then sent again with later batches
                await self._call(self._settle_call(call.on_abandon))

    async def admit(self, key_id: str, spec: LimitSpec, tokens: int, stream_id: str) -> Admission:
        window = self._window_s
        slot = None
        if spec.max_streams is not None:
            # The slot this admission may take, to take back if nobody is to hold it.
            slot = _Release(
                Admission(key_id, stream_id, 0), LimitSpec(max_streams=spec.max_streams), 0
            )
        raw = await self._call(
            _Call(
                self._admit,
                self._keys("rts", key_id),
                (
                    window,
                    _opt(spec.rpm),
                    _opt(spec.tpm),
                    tokens,
                    _opt(spec.max_streams),
                    stream_id,
                    self._lease_s,
                ),
                on_failure=slot,
                on_abandon=slot,
            )
        )
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
        await self._call(self._settle_call(_Release(admission, spec, actual_tokens)))

    def release_nowait(self, admission: Admission, spec: LimitSpec, actual_tokens: int) -> bool:
        """Never: a release is a round trip to Redis (:meth:`release`)."""
        return False

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            loop = asyncio.get_running_loop()
            self._renewer = loop.create_task(self._renew_loop(), name="limits-slot-renewer")

    async def _renew_loop(self) -> None:
        """Every third of a lease: renew held slots, retry failed releases; stop when idle."""
        while self._held or self._unreleased:
            await asyncio.sleep(self._lease_s / 3)
            await self.renew_once()

    async def renew_once(self) -> None:
        """One renewal round (also called by tests): extend every held slot's lease, and send
        again the releases Redis did not take. Failures are logged; the next round retries."""
        held = list(self._held.items())
        if not held and not self._unreleased:
            return
        keys = [f"{self._prefix}s:{key_id}" for _, key_id in held]
        renewal = _Call(self._renew, keys, (self._lease_s, *(sid for sid, _ in held)))
        with contextlib.suppress(LimiterUnavailable):  # logged; the leases last two more rounds
            await self._call(renewal)

    @property
    def held_slots(self) -> int:
        """Stream slots this process holds and renews."""
        return len(self._held)

    async def _auth_step(self, client: str, commit: bool) -> float | None:
        keys = self._keys("a", client)
        allowed, retry_after = await self._call(
            _Call(self._auth, keys, (self._auth_limit, self._window_s, int(commit)))
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
        await self._batcher.aclose()
        await self._redis.aclose()
