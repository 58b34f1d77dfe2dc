"""The router: least in-flight, fallback and retries before the first token, cooldowns."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import requests
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tokenwire.accounting.ledger import Ledger, LedgerRow
from tokenwire.config import DeploymentEntry, ModelEntry, RoutingConfig
from tokenwire.errors import (
    InvalidRequest,
    UpstreamAuthError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from tokenwire.providers.base import ProviderCall
from tokenwire.providers.router import (
    CIRCUIT_CLOSED,
    CIRCUIT_HALF_OPEN,
    CIRCUIT_OPEN,
    DeploymentState,
    RoutedModel,
    attempt_outcome,
    circuit_state,
)
from tokenwire.storage.engine import make_engine
from tokenwire.streams.events import (
    AttemptFailed,
    Event,
    Finish,
    PromptUsage,
    Routed,
    TextDelta,
    Usage,
)
from tokenwire.testing import GatewayServer, ServerThread, SimUpstreamServer
from tokenwire.wire.schema import decode_chat_request

FAST = RoutingConfig(max_attempts=3, backoff_base_s=0.001, backoff_max_s=0.002, breaker_threshold=3)


class Scripted:
    """A provider whose calls fail with the queued errors, then succeed."""

    def __init__(
        self,
        name: str,
        failures: list[Exception] | None = None,
        prelude: list[Event] | None = None,
    ) -> None:
        self.name = name
        self.failures = list(failures or [])
        self.prelude = list(prelude or [])  # yielded before each failure or answer
        self.calls = 0
        self.release: asyncio.Event | None = None

    def stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        return self._stream(call)

    async def _stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        self.calls += 1
        for event in self.prelude:
            yield event
        if self.failures:
            raise self.failures.pop(0)
        if self.release is not None:
            await self.release.wait()
        yield TextDelta(f"{self.name}:{call.upstream_model}")
        yield Usage(1, 1)
        yield Finish("stop")

    async def aclose(self) -> None:
        return None


def model(*providers: Scripted, config: RoutingConfig = FAST) -> RoutedModel:
    states = [DeploymentState(DeploymentEntry(p.name, f"m-{p.name}"), p) for p in providers]
    entry = ModelEntry("m", providers[0].name, "m", 0, 0, tuple(s.entry for s in states))
    return RoutedModel(entry, states, config, rng=random.Random(1))


CALL = ProviderCall(
    decode_chat_request(b'{"model":"m","messages":[{"role":"user","content":"x"}]}'), "m", {}
)


async def collect(routed: RoutedModel) -> list[Event]:
    """Every event of one request, the stream closed at the end as the Generation does."""
    events = routed.stream(CALL)
    try:
        return [event async for event in events]
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def test_events_after_the_first_come_from_the_deployment_and_closing_ends_in_flight() -> None:
    """Routed, then the deployment's events in order (handed over after the first), and the
    request counts as in flight until its stream is closed, read to the end or not."""
    routed = model(Scripted("a"))
    (state,) = routed._deployments
    assert await collect(routed) == [
        Routed("a", "m-a"),
        TextDelta("a:m-a"),
        Usage(1, 1),
        Finish("stop"),
    ]
    assert state.in_flight == 0
    events = routed.stream(CALL)
    assert [await anext(events), await anext(events)] == [Routed("a", "m-a"), TextDelta("a:m-a")]
    assert state.in_flight == 1
    await events.aclose()  # type: ignore[attr-defined]
    assert state.in_flight == 0


async def test_falls_back_to_the_second_deployment_on_503() -> None:
    """A 503 from the first deployment: the request is served by the second, which is named."""
    first = Scripted("a", [UpstreamStatusError("down", status=503)] * 10)
    second = Scripted("b")
    routed = model(first, second)
    for _ in range(5):
        events = await collect(routed)
        assert Routed("b", "m-b") in events
        assert TextDelta("b:m-b") in events
    assert first.calls == 3  # then its breaker opened and it was skipped
    assert second.calls == 5


async def test_retry_after_cools_a_deployment_for_that_long() -> None:
    """A 429 with retry-after: 1 skips that deployment for a second, then uses it again."""
    first = Scripted("a", [UpstreamStatusError("slow", status=429, retry_after_s=1.0)])
    second = Scripted("b")
    routed = model(first, second)
    assert TextDelta("b:m-b") in await collect(routed)
    state = routed.pick(set())
    assert state.provider is second  # "a" is cooling down
    routed._deployments[0].cooldown_until = 0.0  # the second has passed
    routed._deployments[0].consecutive_failures = 0
    assert routed.pick(set()).provider in (first, second)
    first_used = False
    for _ in range(6):
        first_used |= TextDelta("a:m-a") in await collect(routed)
    assert first_used


async def test_single_deployment_retries_with_backoff() -> None:
    """An upstream it could not reach, then success on the same deployment: the client sees
    only success."""
    only = Scripted("a", [UpstreamError("refused", request_sent=False)])
    assert TextDelta("a:m-a") in await collect(model(only))
    assert only.calls == 2


async def test_a_request_that_may_have_reached_the_upstream_is_never_sent_again() -> None:
    """A dropped connection or a timeout after the request was sent is not retried (it may be
    generating, and billed, upstream), on this deployment or another; it counts as a failure."""
    for error in (UpstreamError("reset"), UpstreamTimeout("no first token")):
        a, b = Scripted("a", [error]), Scripted("b")
        routed = model(a, b)
        with pytest.raises(UpstreamError):
            await collect(routed)
        assert a.calls + b.calls == 1
        assert max(d.consecutive_failures for d in routed._deployments) == 1


async def test_prompt_usage_before_the_first_token_does_not_commit_the_route() -> None:
    """A PromptUsage reported before an error still lets the router fall back."""
    a = Scripted("a", [UpstreamStatusError("overloaded", status=529)], prelude=[PromptUsage(5)])
    b = Scripted("b")
    events = await collect(model(a, b))
    assert TextDelta("b:m-b") in events and events[0] == PromptUsage(5)


async def test_client_errors_are_not_retried_and_attempts_are_capped() -> None:
    """A 400 goes straight to the client; repeated 5xx stop after max_attempts."""
    bad = Scripted("a", [InvalidRequest("nope")])
    with pytest.raises(InvalidRequest):
        await collect(model(bad))
    assert bad.calls == 1
    down = Scripted("a", [UpstreamStatusError("down", status=500)] * 10)
    with pytest.raises(UpstreamStatusError):
        await collect(model(down))
    assert down.calls == 3


async def test_least_in_flight_wins() -> None:
    """With one request in flight on each of two deployments and two on one, the idle one is picked."""
    a, b = Scripted("a"), Scripted("b")
    routed = model(a, b)
    routed._deployments[0].in_flight = 2
    routed._deployments[1].in_flight = 1
    assert routed.pick(set()).provider is b


async def test_no_replay_after_the_first_token() -> None:
    """A failure after the first event propagates; the other deployment is not tried."""

    class Breaks(Scripted):
        async def _stream(self, call: ProviderCall) -> AsyncIterator[Event]:
            self.calls += 1
            yield TextDelta("partial")
            raise UpstreamError("died")

    broken, spare = Breaks("a"), Scripted("b")
    routed = model(broken, spare)
    routed._deployments[1].in_flight = 5  # make sure "a" is picked
    got: list[Event] = []
    with pytest.raises(UpstreamError):
        async for event in routed.stream(CALL):
            got.append(event)
    assert TextDelta("partial") in got
    assert spare.calls == 0


async def down(_request: Request) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": "maintenance", "type": "server_error"}}, status_code=503
    )


@pytest.fixture(scope="module")
def two_deployments(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    with (
        ServerThread(
            Starlette(routes=[Route("/v1/chat/completions", down, methods=["POST"])])
        ) as broken,
        SimUpstreamServer(ttft_ms=0, itl_ms=0) as healthy,
    ):
        overrides = f"""
[providers.broken]
kind = "openai"
base_url = "{broken.base_url}/v1"

[providers.healthy]
kind = "openai"
base_url = "{healthy.base_url}/v1"

[[models]]
id = "ha-sim"
deployments = [{{provider = "broken", upstream_model = "sim"}}, {{provider = "healthy", upstream_model = "sim"}}]
"""
        with GatewayServer(Path(tmp_path_factory.mktemp("router")), overrides=overrides) as gateway:
            yield gateway


def test_gateway_serves_every_request_through_the_healthy_deployment(
    two_deployments: GatewayServer,
) -> None:
    """Over real HTTP, with one upstream answering 503, all 12 requests succeed."""
    for i in range(12):
        response = requests.post(
            two_deployments.base_url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {two_deployments.api_key}"},
            json={
                "model": "ha-sim",
                "messages": [{"role": "user", "content": f"hi {i}"}],
                "max_tokens": 3,
            },
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 5  # rows are written as each generation settles
    rows = asyncio.run(ledger_rows(two_deployments.settings.database_url))
    while len(rows) < 12 and time.monotonic() < deadline:
        rows = asyncio.run(ledger_rows(two_deployments.settings.database_url))
    assert len(rows) == 12
    assert {row.provider for row in rows} == {"healthy"}  # the ledger names who really served


async def ledger_rows(url: str) -> list[LedgerRow]:
    engine = make_engine(url)
    try:
        return await Ledger(engine).rows()
    finally:
        await engine.dispose()


async def test_a_refused_key_falls_back_and_is_not_retried() -> None:
    """An UpstreamAuthError moves on to the other deployment, counts toward the breaker, and that deployment is not retried."""
    refusing = Scripted("a", [UpstreamAuthError("a", 401)] * 10)
    flaky = Scripted("b", [UpstreamStatusError("down", status=503)])
    routed = model(refusing, flaky)
    routed._deployments[1].in_flight = 1  # "a" is picked first
    try:
        events = await collect(routed)
    finally:
        routed._deployments[1].in_flight = 0
    assert TextDelta("b:m-b") in events  # the third attempt went to "b" again, not to "a"
    assert refusing.calls == 1 and flaky.calls == 2
    assert routed._deployments[0].consecutive_failures == 1


async def test_every_deployment_refusing_the_key_ends_at_once() -> None:
    """When every deployment refused the gateway's key, the client gets the UpstreamAuthError without more tries."""
    only = Scripted("a", [UpstreamAuthError("a", 403)] * 10)
    with pytest.raises(UpstreamAuthError):
        await collect(model(only))
    assert only.calls == 1


async def test_failed_attempts_are_announced_before_the_one_that_serves() -> None:
    """Each attempt that failed before the first token is an AttemptFailed event (naming its
    deployment and how it failed), before the Routed event of the one that served."""
    first = Scripted("a", [UpstreamStatusError("busy", status=429)])
    second = Scripted("b", [UpstreamError("refused", request_sent=False)])
    events = await collect(model(first, second))
    bookkeeping = [e for e in events if isinstance(e, AttemptFailed | Routed)]
    assert len(bookkeeping) == 3
    assert {bookkeeping[0], bookkeeping[1]} == {
        AttemptFailed("a", "m-a", "rate_limited"),
        AttemptFailed("b", "m-b", "connect_error"),
    }
    assert isinstance(bookkeeping[2], Routed)


async def test_a_request_that_fails_everywhere_reports_each_attempt() -> None:
    """When every attempt fails, each one was announced before the last error is raised."""
    only = Scripted("a", [UpstreamStatusError("down", status=502)] * 3)
    events: list[Event] = []
    with pytest.raises(UpstreamStatusError):
        async for event in model(only).stream(CALL):
            events.append(event)
    assert events == [AttemptFailed("a", "m-a", "server_error")] * 3


def test_attempt_outcomes_are_a_fixed_set() -> None:
    """Every upstream error maps to one bounded outcome label."""
    assert attempt_outcome(UpstreamStatusError("x", status=429)) == "rate_limited"
    assert attempt_outcome(UpstreamStatusError("x", status=503)) == "server_error"
    assert attempt_outcome(UpstreamStatusError("x", status=404)) == "client_error"
    assert attempt_outcome(UpstreamAuthError("p", 401)) == "auth_error"
    assert attempt_outcome(UpstreamTimeout("slow")) == "timeout"
    assert attempt_outcome(UpstreamError("no", request_sent=False)) == "connect_error"
    assert attempt_outcome(UpstreamError("reset")) == "error"


def test_circuit_state_follows_cooldown_and_failures() -> None:
    """Closed while healthy, open while cooling down, half-open once the cooldown is over but
    the last attempts failed."""
    state = DeploymentState(DeploymentEntry("a", "m"), Scripted("a"))
    now = time.monotonic()
    assert circuit_state(state, FAST, now) == CIRCUIT_CLOSED
    state.consecutive_failures = 3
    state.cooldown_until = now + 30
    assert circuit_state(state, FAST, now) == CIRCUIT_OPEN
    assert circuit_state(state, FAST, now + 31) == CIRCUIT_HALF_OPEN
    state.consecutive_failures = 0
    assert circuit_state(state, FAST, now + 31) == CIRCUIT_CLOSED
