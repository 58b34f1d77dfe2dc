"""Routing a model to its deployments: least in-flight, retries and fallback, a circuit breaker.

A model maps to one or more deployments (provider + upstream model + weight). Each request:

1. picks, among deployments that are not cooling down, the one with the fewest requests in
   flight (ties broken at random by weight); if all are cooling down, the one that recovers
   first;
2. **before the first token**, a retryable failure (the upstream could not be reached, or
   answered 429 or 5xx; never one the request may have reached) moves on: to another
   healthy deployment at once, or, when there is none, to the same one after an exponential
   backoff with jitter, or after the upstream's ``Retry-After`` when it is short enough; at
   most ``routing.max_attempts`` tries in all;
3. **after the first token** nothing is replayed: a failure ends the stream with an in-band
   error (the Generation does that).

A 429 with ``Retry-After`` cools its deployment down for that long; ``breaker_threshold``
consecutive failures cool it down for ``breaker_cooldown_s``; a success resets the count.
A deployment that refused the gateway's own key (:class:`~tokenwire.errors.UpstreamAuthError`)
counts as failed and is not tried again by the same request; others still are.
The deployment that served is announced with a :class:`~tokenwire.streams.events.Routed`
event, so the ledger names the provider that really answered; each attempt that failed before
it with an :class:`~tokenwire.streams.events.AttemptFailed` event, so the generation knows its
routing history (metrics count attempts, retries and fallbacks from it when it settles).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass

from tokenwire.config import DeploymentEntry, ModelEntry, RoutingConfig
from tokenwire.errors import (
    GatewayError,
    ProviderUnavailable,
    UpstreamAuthError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from tokenwire.providers.base import Provider, ProviderCall
from tokenwire.streams.events import AttemptFailed, AttemptOutcome, Event, PromptUsage, Routed


@dataclass
class DeploymentState:
    """A deployment and its health, shared by every request of this process."""

    entry: DeploymentEntry
    provider: Provider
    in_flight: int = 0
    consecutive_failures: int = 0
    cooldown_until: float = 0.0

    def healthy(self, now: float) -> bool:
        return now >= self.cooldown_until


CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN = 0, 1, 2


def circuit_state(deployment: DeploymentState, config: RoutingConfig, now: float) -> int:
    """The deployment's circuit as the router sees it at ``now`` (``time.monotonic()``).

    Open (2) while it cools down (the router avoids it while another deployment is healthy);
    half-open (1) once the cooldown is over but its last ``breaker_threshold`` attempts failed
    (the next request is the trial); closed (0) otherwise.
    """
    if not deployment.healthy(now):
        return CIRCUIT_OPEN
    if deployment.consecutive_failures >= config.breaker_threshold:
        return CIRCUIT_HALF_OPEN
    return CIRCUIT_CLOSED


def attempt_outcome(error: UpstreamError) -> AttemptOutcome:
    """How an upstream attempt failed, as a bounded label value."""
    if isinstance(error, UpstreamAuthError):
        return "auth_error"
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamStatusError):
        if error.http_status == 429:
            return "rate_limited"
        return "server_error" if error.http_status >= 500 else "client_error"
    return "error" if error.request_sent else "connect_error"


def is_retryable(error: GatewayError) -> bool:
    """Whether another attempt may be made: an upstream that answered 429 or 5xx, or one the
    request provably never reached. A request that may have reached an upstream (a dropped
    connection, a timeout) is never sent again: it may be generating, and billed, there."""
    if isinstance(error, UpstreamStatusError):
        return error.is_retryable
    return isinstance(error, UpstreamError) and not error.request_sent


class RoutedModel:
    """A Provider for one model that spreads requests over its deployments."""

    def __init__(
        self,
        entry: ModelEntry,
        deployments: list[DeploymentState],
        config: RoutingConfig,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.name = entry.id
        self._deployments = deployments
        self._config = config
        self._rng = rng or random.Random()

    def stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        routed = RoutedStream()
        routed.start(self._stream(call, routed))
        return routed

    async def aclose(self) -> None:
        return None  # the providers belong to the registry

    def pick(self, exclude: set[int]) -> DeploymentState:
        """The deployment for the next attempt (never one of ``exclude`` unless all are)."""
        now = time.monotonic()
        candidates = [d for i, d in enumerate(self._deployments) if i not in exclude]
        candidates = candidates or list(self._deployments)
        healthy = [d for d in candidates if d.healthy(now)]
        if not healthy:
            return min(candidates, key=lambda d: d.cooldown_until)
        least = min(d.in_flight for d in healthy)
        tied = [d for d in healthy if d.in_flight == least]
        if len(tied) == 1:
            return tied[0]
        return self._rng.choices(tied, weights=[d.entry.weight for d in tied])[0]

    def _failed(self, deployment: DeploymentState, error: GatewayError) -> None:
        now = time.monotonic()
        deployment.consecutive_failures += 1
        retry_after = getattr(error, "retry_after_s", None)
        if isinstance(retry_after, int | float) and retry_after > 0:
            deployment.cooldown_until = max(deployment.cooldown_until, now + retry_after)
        if deployment.consecutive_failures >= self._config.breaker_threshold:
            deployment.cooldown_until = max(
                deployment.cooldown_until, now + self._config.breaker_cooldown_s
            )

    def _delay(self, attempt: int, error: GatewayError, next_up: DeploymentState) -> float:
        """How long to wait before the next attempt."""
        if next_up.healthy(time.monotonic()) and next_up.consecutive_failures == 0:
            return 0.0  # a fresh deployment: fall back at once
        retry_after = getattr(error, "retry_after_s", None)
        if (
            isinstance(retry_after, int | float)
            and 0 < retry_after <= self._config.max_retry_after_s
        ):
            return float(retry_after)
        backoff = min(self._config.backoff_max_s, self._config.backoff_base_s * 2.0**attempt)
        return backoff * self._rng.uniform(0.5, 1.5)

    async def _stream(self, call: ProviderCall, routed: RoutedStream) -> AsyncIterator[Event]:
        tried: set[int] = set()
        refused: set[int] = set()  # refused the gateway's key: not worth a second try
        last_error: GatewayError | None = None
        for attempt in range(self._config.max_attempts):
            if len(refused) == len(self._deployments):
                break
            exclude = tried | refused
            deployment = self.pick(exclude if len(exclude) < len(self._deployments) else refused)
            index = self._deployments.index(deployment)
            if last_error is not None:
                delay = self._delay(attempt, last_error, deployment)
                if delay > 0:
                    await asyncio.sleep(delay)
            tried.add(index)
            routed_call = ProviderCall(
                request=call.request,
                upstream_model=deployment.entry.upstream_model,
                raw_body=call.raw_body,
            )
            deployment.in_flight += 1
            events = deployment.provider.stream(routed_call)
            handed_off = False
            try:
                try:
                    first = await anext(events)
                    while isinstance(first, PromptUsage):  # bookkeeping commits to nothing
                        yield first
                        first = await anext(events)
                except StopAsyncIteration:
                    entry = deployment.entry
                    yield AttemptFailed(entry.provider, entry.upstream_model, "error")
                    return
                except GatewayError as exc:
                    if isinstance(exc, UpstreamError):
                        self._failed(deployment, exc)  # the deployment's health either way
                        entry = deployment.entry
                        yield AttemptFailed(
                            entry.provider, entry.upstream_model, attempt_outcome(exc)
                        )
                    if not is_retryable(exc):
                        raise
                    if isinstance(exc, UpstreamAuthError):
                        refused.add(index)
                    last_error = exc
                    continue
                deployment.consecutive_failures = 0
                yield Routed(deployment.entry.provider, deployment.entry.upstream_model)
                routed.hand_off(events, deployment)  # the next events come from it directly
                handed_off = True
                yield first
                return
            finally:
                if not handed_off:
                    deployment.in_flight -= 1
                    await _aclose(events)
        assert last_error is not None
        raise last_error


class RoutedStream:
    """The events of one routed request.

    Until the first output event they come from :meth:`RoutedModel._stream` (attempts,
    retries, fallback); from then on ``__anext__`` hands out the chosen deployment's own
    iterator's awaitables, so a token costs no extra generator hop. :meth:`aclose` (the
    Generation always calls it) closes both and ends the request's count in flight.
    """

    __slots__ = ("_attempts", "_deployment", "_inner")

    def __init__(self) -> None:
        self._attempts: AsyncGenerator[Event, None] | None = None
        self._inner: AsyncIterator[Event] | None = None
        self._deployment: DeploymentState | None = None

    def start(self, attempts: AsyncIterator[Event]) -> None:
        assert isinstance(attempts, AsyncGenerator)
        self._attempts = attempts

    def hand_off(self, events: AsyncIterator[Event], deployment: DeploymentState) -> None:
        self._inner, self._deployment = events, deployment

    def __aiter__(self) -> RoutedStream:
        return self

    def __anext__(self) -> Awaitable[Event]:
        if self._inner is not None:
            return self._inner.__anext__()
        assert self._attempts is not None
        return self._attempts.__anext__()

    async def aclose(self) -> None:
        try:
            if self._attempts is not None:
                await self._attempts.aclose()
        finally:
            inner, deployment = self._inner, self._deployment
            self._inner = self._deployment = None
            if deployment is not None:
                deployment.in_flight -= 1
            if inner is not None:
                await _aclose(inner)


async def _aclose(events: AsyncIterator[Event]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def route(
    entry: ModelEntry,
    providers: dict[str, Provider],
    unavailable: dict[str, str],
    states: dict[tuple[str, str], DeploymentState],
    config: RoutingConfig,
) -> Provider:
    """The provider for ``entry``: itself for one deployment, a :class:`RoutedModel` for several.

    ``states`` keeps each (provider, upstream model) pair's health across requests.
    """
    usable: list[DeploymentState] = []
    reasons: list[str] = []
    for deployment in entry.all_deployments():
        provider = providers.get(deployment.provider)
        if provider is None:
            reasons.append(unavailable.get(deployment.provider, f"{deployment.provider} missing"))
            continue
        key = (deployment.provider, deployment.upstream_model)
        if key not in states:
            states[key] = DeploymentState(deployment, provider)
        usable.append(states[key])
    if not usable:
        raise ProviderUnavailable(f"The model {entry.id!r} is unavailable: {'; '.join(reasons)}.")
    return RoutedModel(entry, usable, config)
