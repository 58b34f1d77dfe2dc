"""Per-key rate limits: the interface, the GCRA arithmetic, and OpenAI's headers.

Three limits per key, each optional: requests per window (``rpm``), tokens per window
(``tpm``; estimated at admission from the prompt and ``max_tokens``, reconciled with real
usage when the completion ends) and concurrent streams. The window is 60 s unless configured.

Requests and tokens use GCRA (the generic cell rate algorithm, a token bucket kept as one
"theoretical arrival time" per limit): a limit of L per window allows a burst of L and then
one more every window/L. One admission checks all three limits and commits either all or
none, so a refused request consumes nothing. Backends: :mod:`tokenwire.limits.memory` (one
process) and :mod:`tokenwire.limits.redis` (one Lua script per admission; processes share).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

from tokenwire.errors import RateLimited
from tokenwire.observability.records import LimitReason


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A key's limits (None: unlimited)."""

    rpm: int | None = None
    tpm: int | None = None
    max_streams: int | None = None


@dataclass(frozen=True, slots=True)
class BucketState:
    """One limit after an admission: for the headers."""

    limit: int
    remaining: int
    reset_s: float  # until the bucket is full again


@dataclass(frozen=True, slots=True)
class Admission:
    """What an admitted request holds until it settles."""

    key_id: str
    stream_id: str
    tokens: int
    requests: BucketState | None = None
    token_bucket: BucketState | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GcraResult:
    """The outcome of one GCRA step (``allowed`` false: nothing was consumed)."""

    allowed: bool
    new_tat: float
    retry_after_s: float
    remaining: int
    reset_s: float


def gcra(tat: float, now: float, cost: int, limit: int, window_s: float) -> GcraResult:
    """Consume ``cost`` from a bucket of ``limit`` per ``window_s`` whose TAT is ``tat``."""
    if limit <= 0:  # a limit of zero admits nothing
        return GcraResult(False, tat, window_s, 0, window_s)
    interval = window_s / limit
    new_tat = max(tat, now) + cost * interval
    allow_at = new_tat - window_s
    if new_tat - now > window_s + 1e-9:  # relative: no float noise from absolute clocks
        current = max(tat, now)
        remaining = max(0, math.floor((window_s - (current - now)) / interval + 1e-3))
        return GcraResult(False, tat, allow_at - now, remaining, current - now)
    remaining = max(0, math.floor((window_s - (new_tat - now)) / interval + 1e-3))
    return GcraResult(True, new_tat, 0.0, remaining, new_tat - now)


def go_duration(seconds: float) -> str:
    """A duration the way OpenAI's reset headers write it: ``20ms``, ``1s``, ``6m0s``."""
    millis = max(0, math.ceil(seconds * 1000 - 1e-6))  # up to the millisecond, not float noise
    if millis < 1000:
        return f"{millis}ms"
    total = millis / 1000
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def rate_headers(
    requests: BucketState | None, tokens: BucketState | None, *, now_wall: float | None = None
) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers plus the common ``X-RateLimit-*`` trio."""
    headers: dict[str, str] = {}
    wall = time.time() if now_wall is None else now_wall
    if requests is not None:
        headers["x-ratelimit-limit-requests"] = str(requests.limit)
        headers["x-ratelimit-remaining-requests"] = str(requests.remaining)
        headers["x-ratelimit-reset-requests"] = go_duration(requests.reset_s)
    if tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(tokens.limit)
        headers["x-ratelimit-remaining-tokens"] = str(tokens.remaining)
        headers["x-ratelimit-reset-tokens"] = go_duration(tokens.reset_s)
    main = requests or tokens
    if main is not None:
        headers["X-RateLimit-Limit"] = str(main.limit)
        headers["X-RateLimit-Remaining"] = str(main.remaining)
        headers["X-RateLimit-Reset"] = str(math.ceil(wall + main.reset_s))
    return headers


def raise_if_refused(
    spec: LimitSpec,
    window_s: float,
    tokens: int,
    *,
    requests_retry_s: float | None,
    tokens_retry_s: float | None,
    open_streams: int,
    headers: dict[str, str],
) -> None:
    """Raise :class:`LimitExceeded` for the refusal that lasts longest, if any limit refused.

    ``*_retry_s`` is None where that bucket admitted the request. Both backends call this, so
    their codes and messages cannot drift apart.
    """
    refusals: list[tuple[float, str, str, LimitReason]] = []
    if requests_retry_s is not None:
        message = f"Rate limit reached: {spec.rpm} requests per {window_s:g} s."
        refusals.append((requests_retry_s, "rate_limit_exceeded", message, "requests"))
    if spec.tpm is not None and tokens > spec.tpm:
        message = (
            f"Request too large: about {tokens} tokens (prompt + max_tokens) against "
            f"a limit of {spec.tpm} tokens per {window_s:g} s; lower max_tokens."
        )
        refusals.append((window_s, "tokens_exceed_limit", message, "request_too_large"))
    elif tokens_retry_s is not None:
        message = f"Rate limit reached: {spec.tpm} tokens per {window_s:g} s."
        refusals.append((tokens_retry_s, "rate_limit_exceeded", message, "tokens"))
    if spec.max_streams is not None and open_streams >= spec.max_streams:
        message = f"At most {spec.max_streams} streams may run at once for this key."
        refusals.append((1.0, "concurrent_streams_exceeded", message, "streams"))
    if refusals:
        retry_after, code, message, reason = max(refusals, key=lambda r: r[0])
        raise LimitExceeded(
            message, retry_after_s=retry_after, code=code, limit_headers=headers, reason=reason
        )


class LimitExceeded(RateLimited):
    """A key's limit was hit; carries the rate-limit headers next to ``Retry-After``, and
    which limit refused (``reason``, for metrics)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        code: str,
        limit_headers: dict[str, str],
        reason: LimitReason = "requests",
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s, code=code)
        self.limit_headers = limit_headers
        self.reason: LimitReason = reason

    def headers(self) -> dict[str, str]:
        return {**self.limit_headers, **super().headers()}


class RateLimiter(Protocol):
    """A rate-limit backend."""

    async def admit(self, key_id: str, spec: LimitSpec, tokens: int, stream_id: str) -> Admission:
        """Admit a request or raise :class:`LimitExceeded` (consuming nothing)."""
        ...

    async def release(self, admission: Admission, spec: LimitSpec, actual_tokens: int) -> None:
        """Release the stream slot and correct the token bucket by actual - estimated."""
        ...

    def release_nowait(self, admission: Admission, spec: LimitSpec, actual_tokens: int) -> bool:
        """:meth:`release` at once if this backend needs no I/O for it (True); False, having
        done nothing, if it does (then :meth:`release` is awaited)."""
        ...

    @property
    def held_slots(self) -> int:
        """Stream slots this process holds (admitted, not yet released)."""
        ...

    async def auth_blocked(self, client: str) -> float | None:
        """Seconds until ``client`` may try a key again, or None if it may now."""
        ...

    async def auth_failed(self, client: str) -> None:
        """Count a failed authentication from ``client``."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
