"""Calls many to one: the items asked for while one call runs share the next call.

Some work costs a round trip per call whatever its size: a database transaction (credit
reservations, :mod:`tokenwire.accounting.reserver`), a Redis pipeline (rate limits,
:mod:`tokenwire.limits.redis`). A :class:`Batcher` sends the first item at once and gathers
the items submitted while that call is under way into the next one, so no caller waits for a
timer and a burst of N costs a few calls, not N. One call runs at a time, in submission
order, at most ``max_batch`` items each.

The batch function answers each item with a result or an exception (that item's caller
raises it); it handles and logs its own failures, once per batch. Should it raise anyway, or
the batcher be cancelled (a shutdown), the callers left get ``unavailable()``.

A caller cancelled while its item is in a call (a client gone, a shutdown) does not cancel
the call: the item is done for everyone else in the batch, and ``abandoned(item, result)``
then runs in a task of its own, to give back what the result holds (a reservation, a slot).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger("tokenwire.batching")

T = TypeVar("T")
R = TypeVar("R")
MAX_BATCH = 256
"""Calls one batch carries at most (the rest wait for the next): a reservation transaction,
a Redis pipeline."""


class Batcher(Generic[T, R]):
    """Runs ``run(items)`` for the items submitted meanwhile; one call at a time."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R | Exception]]],
        *,
        name: str,
        unavailable: Callable[[], Exception],
        abandoned: Callable[[T, R], Awaitable[None]] | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._run = run
        self._name = name
        self._unavailable = unavailable
        self._abandoned = abandoned
        self._max_batch = max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None
        self._giving_back: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """The item's result from the next call, or its exception."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, done))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain(), name=self._name)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            done.add_done_callback(lambda finished: self._orphaned(item, finished))
            raise

    def _orphaned(self, item: T, finished: asyncio.Future[R]) -> None:
        if self._abandoned is None or finished.cancelled() or finished.exception() is not None:
            return  # nothing was taken
        task = finished.get_loop().create_task(self._give_back(item, finished.result()))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def _give_back(self, item: T, result: R) -> None:
        assert self._abandoned is not None
        try:
            await self._abandoned(item, result)
        except Exception:
            log.exception("%s: could not give back what an abandoned call held", self._name)

    async def aclose(self) -> None:
        """Wait for the call under way and for what abandoned callers held to be given back
        (which may take one more call)."""
        while pending := [t for t in (self._task, *self._giving_back) if t and not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                size = self._max_batch
                batch, self._waiting = self._waiting[:size], self._waiting[size:]
                try:
                    outcomes = await self._run([item for item, _ in batch])
                    if len(outcomes) != len(batch):
                        raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} items")
                except Exception:
                    log.exception("%s: a batch of %d failed", self._name, len(batch))
                    outcomes = [self._unavailable() for _ in batch]
                for (_, done), outcome in zip(batch, outcomes, strict=True):
                    if done.done():
                        continue
                    if isinstance(outcome, Exception):
                        done.set_exception(outcome)
                    else:
                        done.set_result(outcome)
                batch = []
        finally:
            self._task = None
            left, self._waiting = [*batch, *self._waiting], []
            for _, done in left:  # cancelled (a shutdown) with callers waiting: release them
                if not done.done():
                    done.set_exception(self._unavailable())
