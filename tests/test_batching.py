"""The Batcher: items submitted while a call runs share the next call, in order; each caller
gets its own outcome; failures, cancelled callers and shutdown leave nobody waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tokenwire.batching import Batcher


class Unavailable(Exception):
    """What callers get when their batch could not run."""


class Refused(Exception):
    """A per-item failure."""


class Recorder:
    """A batch function that records each batch and can hold it at a gate."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.fail = False
        self.abandoned: list[tuple[int, int]] = []

    async def run(self, items: list[int]) -> Sequence[int | Exception]:
        self.batches.append(list(items))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("the batch broke")
        return [Refused(str(i)) if i < 0 else i * 10 for i in items]

    async def give_back(self, item: int, result: int) -> None:
        self.abandoned.append((item, result))

    def batcher(self, max_batch: int = 256) -> Batcher[int, int]:
        return Batcher(
            self.run,
            name="test",
            unavailable=Unavailable,
            abandoned=self.give_back,
            max_batch=max_batch,
        )


async def test_items_submitted_meanwhile_share_the_next_call_in_order() -> None:
    """The first item goes alone; the ones submitted while it runs go together, in order,
    and each caller gets its own result or its own exception."""
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    batcher = recorder.batcher()
    first = asyncio.ensure_future(batcher.submit(1))
    await recorder.entered.wait()
    rest = asyncio.gather(*(batcher.submit(i) for i in (2, -3, 4)), return_exceptions=True)
    recorder.gate.set()
    assert await first == 10
    outcomes = await rest
    assert outcomes[0] == 20 and outcomes[2] == 40
    assert isinstance(outcomes[1], Refused) and str(outcomes[1]) == "-3"
    assert recorder.batches == [[1], [2, -3, 4]]


async def test_batches_hold_at_most_max_batch_items() -> None:
    """Ten items at once with max_batch 4: batches of 4, 4 and 2, every item answered."""
    recorder = Recorder()
    batcher = recorder.batcher(max_batch=4)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    assert [len(batch) for batch in recorder.batches] == [4, 4, 2]


async def test_a_batch_that_raises_fails_its_callers_only() -> None:
    """Every caller of a batch whose function raised gets its own ``unavailable()``; the
    next batch runs normally."""
    recorder = Recorder()
    batcher = recorder.batcher()
    recorder.fail = True
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert len({id(o) for o in outcomes}) == 3
    recorder.fail = False
    assert await batcher.submit(7) == 70


async def test_a_cancelled_caller_gets_its_result_given_back() -> None:
    """A caller cancelled while its batch runs: the batch still finishes for the others, and
    ``abandoned`` receives the item and its result; a failed item is not given back."""
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    batcher = recorder.batcher()
    gone = asyncio.ensure_future(batcher.submit(5))
    also_gone = asyncio.ensure_future(batcher.submit(-6))
    stays = asyncio.ensure_future(batcher.submit(8))
    await recorder.entered.wait()
    gone.cancel()
    also_gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    recorder.gate.set()
    assert await stays == 80
    await batcher.aclose()
    assert also_gone.cancelled()
    assert recorder.abandoned == [(5, 50)]


async def test_cancelling_the_batcher_releases_every_waiting_caller() -> None:
    """A shutdown that cancels the call under way: its callers and the ones queued behind it
    get ``unavailable()`` instead of waiting forever."""
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    batcher = recorder.batcher(max_batch=1)
    first = asyncio.ensure_future(batcher.submit(1))
    queued = asyncio.ensure_future(batcher.submit(2))  # waits for the next batch
    await recorder.entered.wait()
    assert recorder.batches == [[1]]
    running = [t for t in asyncio.all_tasks() if t.get_name() == "test"]
    assert len(running) == 1
    running[0].cancel()
    outcomes = await asyncio.gather(first, queued, return_exceptions=True)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    recorder.gate.set()
    assert await batcher.submit(3) == 30  # a new call starts afterwards
