"""The Generation: canonical event order, states, cancellation when readers leave, settling once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tokenwire.completions import ledger_status
from tokenwire.errors import ServerShuttingDown, UpstreamError
from tokenwire.observability.logs import completion_id_var
from tokenwire.observability.outcomes import completion_outcome
from tokenwire.streams.events import (
    AttemptFailed,
    Event,
    Finish,
    PromptUsage,
    Routed,
    StreamError,
    TextDelta,
    Usage,
)
from tokenwire.streams.generation import Generation, GenerationState, read_events


async def scripted(events: list[Event], gate: asyncio.Event | None = None) -> AsyncIterator[Event]:
    for i, event in enumerate(events):
        if gate is not None and i == 1:
            await gate.wait()
        yield event


def make(
    events: AsyncIterator[Event], settled: list[Generation] | None = None, grace: float = 0.0
) -> Generation:
    async def settle(generation: Generation) -> None:
        if settled is not None:
            settled.append(generation)

    return Generation(
        completion_id="chatcmpl-test",
        model="sim",
        events=events,
        prompt_tokens_estimate=7,
        disconnect_grace_s=grace,
        on_settle=settle,
    )


async def collect(generation: Generation, after: int = 0) -> list[Event]:
    out: list[Event] = []
    async for batch in read_events(generation, after=after):
        out.extend(batch or ())
    return out


async def test_log_order_is_canonical_whatever_the_provider_order() -> None:
    """Usage before Finish from the provider still logs deltas, Finish, then Usage."""
    settled: list[Generation] = []
    gen = make(scripted([TextDelta("a"), Usage(3, 1), Finish("stop")]), settled)
    gen.start()
    events = await collect(gen)
    assert events == [TextDelta("a"), Finish("stop"), Usage(3, 1)]
    await gen.wait_settled()
    assert gen.state is GenerationState.COMPLETED
    assert settled == [gen]
    assert gen.first_token_at is not None


async def test_missing_finish_becomes_an_upstream_error() -> None:
    """A provider that stops without Finish ends the log with a StreamError."""
    gen = make(scripted([TextDelta("a")]))
    gen.start()
    events = await collect(gen)
    assert isinstance(events[-1], StreamError)
    assert isinstance(events[-1].error, UpstreamError)
    assert gen.state is GenerationState.FAILED
    assert gen.usage == Usage(7, 1, estimated=True)


async def test_a_cut_stream_bills_the_early_prompt_with_its_cached_parts() -> None:
    """A stream that fails after the upstream's early prompt count is billed for that prompt,
    its cache-written and cache-read parts kept apart, plus the deltas received."""
    early = PromptUsage(1200, cache_write_tokens=200, cache_read_tokens=900)
    gen = make(scripted([early, TextDelta("a"), TextDelta("b")]))
    gen.start()
    await collect(gen)
    assert gen.usage == Usage(1200, 2, True, cache_write_tokens=200, cache_read_tokens=900)
    assert gen.reported_prompt == early


async def test_provider_error_before_first_token_is_logged() -> None:
    """A GatewayError raised by the provider becomes the log's only event."""

    async def failing() -> AsyncIterator[Event]:
        raise UpstreamError("boom")
        yield TextDelta("never")  # pragma: no cover

    gen = make(failing())
    gen.start()
    events = await collect(gen)
    assert len(events) == 1 and isinstance(events[0], StreamError)
    assert events[0].error.message == "boom"


async def test_last_reader_leaving_cancels_and_settles_once() -> None:
    """Closing the only reader early cancels the generation: usage so far, finish 'cancelled'."""
    gate = asyncio.Event()
    settled: list[Generation] = []
    gen = make(scripted([TextDelta("a"), TextDelta("b"), Finish("stop")], gate), settled)
    gen.start()
    reader = read_events(gen)
    first = await anext(reader)
    assert first == [TextDelta("a")]
    await reader.aclose()
    await gen.wait_settled()
    assert gen.state is GenerationState.CANCELLED
    assert gen.cancel_cause == "client_disconnected"
    assert gen.log.read_after(1) == [Finish("cancelled"), Usage(7, 1, estimated=True)]
    assert settled == [gen]


async def test_grace_period_lets_a_reader_come_back() -> None:
    """With a grace period, a new reader attaching in time keeps the generation alive."""
    gate = asyncio.Event()
    gen = make(scripted([TextDelta("a"), TextDelta("b"), Finish("stop")], gate), grace=60)
    gen.start()
    reader = read_events(gen)
    await anext(reader)
    await reader.aclose()
    assert not gen.finished
    second = asyncio.create_task(collect(gen, after=1))
    await asyncio.sleep(0)
    gate.set()
    assert await second == [TextDelta("b"), Finish("stop"), Usage(7, 2, estimated=True)]
    assert gen.state is GenerationState.COMPLETED


async def test_two_readers_see_the_same_events() -> None:
    """Readers are independent cursors over one log."""
    gen = make(scripted([TextDelta("a"), TextDelta("b"), Usage(1, 2), Finish("length")]))
    gen.start()
    a, b = await asyncio.gather(collect(gen), collect(gen))
    assert a == b == [TextDelta("a"), TextDelta("b"), Finish("length"), Usage(1, 2)]


async def test_illegal_transition_raises() -> None:
    """The state table refuses a move out of a terminal state."""
    gen = make(scripted([Finish("stop")]))
    gen.start()
    await gen.wait_settled()
    with pytest.raises(RuntimeError):
        gen._move(GenerationState.STREAMING)


async def test_cancel_before_the_first_step_still_finishes_and_settles() -> None:
    """A cancel that lands before the task ever ran ends the log as cancelled and settles once."""
    settled: list[Generation] = []
    gen = make(scripted([TextDelta("a"), Finish("stop")]), settled)
    gen.start()
    gen.cancel("client_cancelled")  # same loop iteration: the task has not run yet
    await asyncio.wait_for(gen.wait_settled(), 5)
    assert gen.state is GenerationState.CANCELLED
    assert gen.log.read_after(0) == [Finish("cancelled"), Usage(7, 0, estimated=True)]
    assert settled == [gen]


async def test_routing_history_and_token_times_are_kept() -> None:
    """The router's AttemptFailed and Routed events become the generation's attempts (not
    logged); the first and last delta times bound the inter-token gap."""
    history: list[Event] = [
        AttemptFailed("a", "m", "server_error"),
        Routed("b", "m"),
        TextDelta("x"),
        TextDelta("y"),
        TextDelta("z"),
        Finish("stop"),
        Usage(1, 3),
    ]
    gen = make(scripted(history))
    gen.start()
    events = await collect(gen)
    assert events == [TextDelta("x"), TextDelta("y"), TextDelta("z"), Finish("stop"), Usage(1, 3)]
    await gen.wait_settled()
    assert gen.attempts == [AttemptFailed("a", "m", "server_error"), Routed("b", "m")]
    assert gen.provider == "b"
    assert gen.deltas == 3
    assert gen.first_token_at is not None and gen.last_token_at is not None
    assert gen.started_at <= gen.first_token_at <= gen.last_token_at


async def test_lines_logged_while_generating_carry_the_completion_id() -> None:
    """What the provider logs runs with the completion id set; the settle hook, and any task
    it starts (a writer that outlives the completion), run without it."""
    seen: dict[str, str | None] = {}

    async def provider() -> AsyncIterator[Event]:
        seen["provider"] = completion_id_var.get()
        yield TextDelta("a")
        yield Finish("stop")

    async def settle(generation: Generation) -> None:
        seen["hook"] = completion_id_var.get()

        async def long_lived() -> None:
            seen["task"] = completion_id_var.get()

        await asyncio.get_running_loop().create_task(long_lived())

    gen = Generation(
        completion_id="chatcmpl-ctx",
        model="sim",
        events=provider(),
        prompt_tokens_estimate=1,
        on_settle=settle,
    )
    gen.start()
    await collect(gen)
    await gen.wait_settled()
    assert seen == {"provider": "chatcmpl-ctx", "hook": None, "task": None}


async def test_an_interrupted_generation_ends_with_the_drain_error_and_is_named_shutdown() -> None:
    """interrupt(error) (a drain's timeout) stops the provider, ends the log with that error after the deltas so far, settles once; the ledger status and the metrics outcome are both 'shutdown'."""
    gate = asyncio.Event()  # never set: the provider waits after its first delta
    settled: list[Generation] = []
    gen = make(scripted([TextDelta("a"), TextDelta("b"), Finish("stop")], gate), settled)
    gen.start()
    reader = read_events(gen)
    assert await anext(reader) == [TextDelta("a")]
    error = ServerShuttingDown("drained", stream_id=gen.id)
    gen.interrupt(error)
    rest = [event async for batch in reader for event in batch or ()]
    await gen.wait_settled()
    assert rest == [StreamError(error)]
    assert gen.interrupted and gen.error is error and settled == [gen]
    assert gen.usage == Usage(7, 1, estimated=True)  # the prompt and the one delta generated
    assert ledger_status(gen) == "shutdown" and completion_outcome(gen) == "shutdown"
    gen.interrupt(error)  # a finished generation: nothing changes
    assert settled == [gen]
