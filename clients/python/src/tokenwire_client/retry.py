"""When to try again, and how long to wait: the one retry policy of the client.

* **Connection failures** (refused, reset, cut mid-answer, nothing for ``timeout`` seconds)
  are retried; a streamed request is *resumed* from the last event it received, never sent
  again. A connection that delivered events before it dropped is re-established at once; only
  consecutive failures back off.
* **Answers** are retried by status: 429 (except ``tokens_exceed_limit``, which no wait can
  fix), 409 ``idempotency_key_in_use`` (the first attempt of this very request is still being
  admitted), 500, 502, 503, 504 and 529. Never 400, 401, 402, 403, 404, other 409s or 410.
* **Waits** are exponential backoff with full jitter (a uniform draw in ``[0, min(cap, base *
  2^n)]``, AWS's "full jitter"), and never shorter than the gateway asked for: ``Retry-After``
  (seconds or an HTTP date), ``retry-after-ms``, the WebSocket error's ``retry_after_ms``, else
  the reset header of an exhausted limit (``x-ratelimit-reset-requests`` / ``-tokens``, or
  ``X-RateLimit-Reset``); the jitter is added on top, so clients refused together do not come
  back together.
* **Bounds**: at most ``max_retries`` consecutive failed attempts, and at most
  ``max_retry_time_s`` spent retrying since the last progress. A wait that would end past that
  budget is not started: the error is raised at once (a ``RateLimitError`` keeps its
  ``retry_after``).
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from tokenwire_client.errors import APIStatusError

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
NEVER_RETRIED_CODES = frozenset({"tokens_exceed_limit"})
RETRIED_CONFLICT_CODES = frozenset({"idempotency_key_in_use"})
_NUM = r"(\d+(?:\.\d+)?)"
_GO_DURATION = re.compile(rf"(?:{_NUM}h)?(?:{_NUM}m(?!s))?(?:{_NUM}s)?(?:{_NUM}ms)?")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many attempts, how long to wait between them, and how long to keep trying."""

    max_retries: int = 4
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    max_retry_time_s: float = 60.0

    def backoff(self, failures: int, rng: random.Random | None = None) -> float:
        """Full jitter: a uniform wait in ``[0, min(cap, base * 2^(failures-1))]``."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2 ** max(0, failures - 1))
        return (rng or random).uniform(0.0, ceiling)


def is_retryable(error: APIStatusError) -> bool:
    """Whether another attempt of the same request may succeed."""
    if error.code in NEVER_RETRIED_CODES:
        return False
    if error.status == 409:
        return error.code in RETRIED_CONFLICT_CODES
    return error.status in RETRYABLE_STATUSES


def parse_go_duration(text: str) -> float | None:
    """OpenAI's reset durations (``20ms``, ``1.5s``, ``6m0s``) in seconds, or None."""
    text = text.strip()
    match = _GO_DURATION.fullmatch(text)
    if not text or match is None:
        return None
    hours, minutes, seconds, millis = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def retry_after_from_headers(
    headers: Mapping[str, str], *, now: float | None = None
) -> float | None:
    """Seconds the gateway asked to wait, from the response headers; None if it did not say."""
    lower = {k.lower(): v for k, v in headers.items()}
    wall = time.time() if now is None else now
    millis = _number(lower.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    raw = lower.get("retry-after")
    if raw is not None:
        seconds = _number(raw)
        if seconds is not None:
            return seconds
        when = _http_date(raw)
        if when is not None:
            return max(0.0, when - wall)
    resets = []
    for bucket in ("requests", "tokens"):
        if lower.get(f"x-ratelimit-remaining-{bucket}") == "0":
            reset = parse_go_duration(lower.get(f"x-ratelimit-reset-{bucket}", ""))
            if reset is not None:
                resets.append(reset)
    if resets:
        return max(resets)
    if lower.get("x-ratelimit-remaining") == "0":
        epoch = _number(lower.get("x-ratelimit-reset"))
        if epoch is not None:
            return max(0.0, epoch - wall)
    return None


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _http_date(value: str) -> float | None:
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return moment.timestamp()


class RetryState:
    """One request's retrying: counts consecutive failures and the time since progress."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rng = rng
        self.failures = 0
        self.attempts = 1
        self._since: float | None = None  # when the current run of failures began

    def progress(self) -> None:
        """The request made progress (events arrived): the next failure starts afresh."""
        self.failures = 0
        self._since = None

    def next_wait(self, *, asked_s: float | None = None, after_progress: bool = False) -> float:
        """The wait before the next attempt; raises ``GiveUp`` when the bounds are reached.

        ``asked_s`` is what the gateway asked for; ``after_progress`` is true for the first
        failure of a connection that had delivered events (re-established at once).
        """
        now = time.monotonic()
        if self._since is None:
            self._since = now
        self.failures += 1
        if self.failures > self.policy.max_retries:
            raise GiveUp(f"gave up after {self.policy.max_retries} retries")
        wait = (
            0.0
            if after_progress and asked_s is None
            else self.policy.backoff(self.failures, self._rng)
        )
        if asked_s is not None:
            wait += asked_s
        if now + wait - self._since > self.policy.max_retry_time_s:
            raise GiveUp(f"the next attempt would start after {self.policy.max_retry_time_s:g} s")
        self.attempts += 1
        return wait


class GiveUp(Exception):
    """The retry bounds are reached: the last error goes to the caller."""
