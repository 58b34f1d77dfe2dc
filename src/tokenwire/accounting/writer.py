"""Batches ledger settlements, and never loses one: retries, then a durable outbox, then replay.

A settle call queues its row and waits until the row is durable: committed to the database,
or, when the database keeps refusing, written to the outbox on local disk
(:mod:`tokenwire.accounting.outbox`). One background task drains the queue: it waits
``_FLUSH_DELAY_S`` after the first queued row, then writes every row queued by then in one
transaction (:meth:`Ledger.settle_many`: on SQLite the whole transaction in one hop to a
worker thread, see :mod:`tokenwire.storage.transactions`). The delay keeps the write off the
moment a client that just read ``[DONE]`` sends its next request; under load it also makes
batches larger, and a batch's cost is mostly fixed (the hop, the statements, the commit).

A batch the database refuses is tried again after ``RETRY_DELAYS_S``; if it still fails, it
goes to the outbox, and a replay task settles the outbox into the database as soon as it
answers again (backing off up to ``_REPLAY_MAX_S``), including at the next start. Without an
outbox (or with a disk that refuses it too), the batch stays in memory and is retried with the
replay. Settling is idempotent per completion id, so a row written twice is billed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tokenwire.accounting.ledger import Ledger, LedgerRow
from tokenwire.accounting.outbox import LedgerOutbox, Settlement

log = logging.getLogger("tokenwire.ledger")
_MAX_BATCH = 500
_FLUSH_DELAY_S = 0.010
RETRY_DELAYS_S = (0.05, 0.25, 1.0)
_REPLAY_MIN_S = 0.5
_REPLAY_MAX_S = 15.0


class LedgerWriter:
    """The single writer of ledger rows for one process."""

    def __init__(
        self,
        ledger: Ledger,
        outbox: LedgerOutbox | None = None,
        *,
        retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S,
    ) -> None:
        self._ledger = ledger
        self._outbox = outbox
        self._retry_delays_s = retry_delays_s
        self._queue: asyncio.Queue[tuple[LedgerRow, bool, asyncio.Future[bool]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._held: list[Settlement] = []  # refused by the database and by the outbox: in memory
        self.write_failures = 0  # batches the database refused (each attempt)

    @property
    def queued(self) -> int:
        """Settlements waiting for the writer."""
        return self._queue.qsize()

    @property
    def held(self) -> int:
        """Settlements kept in memory because neither the database nor the outbox took them."""
        return len(self._held)

    async def settle(self, row: LedgerRow, *, reserved: bool) -> bool:
        """Queue ``row`` and wait until it is durable; True if it was new (or spilled)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((row, reserved, done))
        return await asyncio.shield(done)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(_FLUSH_DELAY_S)
            while len(batch) < _MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            items = [(row, reserved) for row, reserved, _ in batch]
            written: set[str] | None = None
            try:
                written = await self._write(items)
            finally:  # whatever happened, nobody waits for ever
                for row, _, done in batch:
                    if not done.done():
                        done.set_result(written is None or row.completion_id in written)
                    self._queue.task_done()

    async def _write(self, items: list[Settlement]) -> set[str] | None:
        """Commit ``items`` (the ids new to the ledger), or keep them durable: None."""
        for delay in (*self._retry_delays_s, None):
            try:
                return await self._ledger.settle_many(items)
            except Exception as exc:  # noqa: BLE001 - any database failure: retry, then spill
                self.write_failures += 1
                if delay is None:
                    log.error("could not write %d ledger rows: %r", len(items), exc)
                    break
                log.warning("ledger write failed (%r); retrying in %g s", exc, delay)
                await asyncio.sleep(delay)
        await self._spill(items)
        return None

    async def _spill(self, items: list[Settlement]) -> None:
        try:
            if self._outbox is None:
                raise OSError("no ledger outbox is configured")
            path = await asyncio.to_thread(self._outbox.write, items)
            log.error("%d ledger rows kept in %s until the database takes them", len(items), path)
        except Exception as exc:  # noqa: BLE001 - a disk that refuses too: keep them in memory
            self._held.extend(items)
            log.critical(
                "%d ledger rows are held in memory only (the outbox failed: %r); they are "
                "retried, and lost if this process dies first",
                len(items),
                exc,
            )
        self._start_replaying()

    def _start_replaying(self) -> None:
        if self._replayer is None or self._replayer.done():
            loop = asyncio.get_running_loop()
            self._replayer = loop.create_task(self._replay_loop(), name="ledger-replay")

    async def _replay_loop(self) -> None:
        delay = _REPLAY_MIN_S
        while True:
            await asyncio.sleep(delay)
            if await self.replay():
                if not self._pending():
                    return  # nothing came in meanwhile (a later spill starts a new loop)
                delay = _REPLAY_MIN_S  # a batch spilled while this one was replayed
            else:
                delay = min(_REPLAY_MAX_S, delay * 2)

    def _pending(self) -> bool:
        """Whether anything waits to be replayed (checked with no await before returning, so a
        spill either is seen here or finds the loop ended and starts another)."""
        return bool(self._held) or (self._outbox is not None and bool(self._outbox.files()))

    async def replay(self) -> bool:
        """Settle what the outbox and memory hold; True when nothing is left.

        Called by the replay task, at start-up, and by tests; a database still down leaves
        everything where it was.
        """
        if self._held:
            held, self._held = self._held, []
            try:
                await self._ledger.settle_many(held)
            except asyncio.CancelledError:  # stopped (aclose): they go to the outbox there
                self._held = held + self._held
                raise
            except Exception as exc:  # noqa: BLE001 - still down: keep them for the next round
                self._held = held + self._held
                log.warning("ledger replay: database still unavailable (%r)", exc)
                return False
        if self._outbox is None:
            return True
        for path in self._outbox.files():
            items = await asyncio.to_thread(self._outbox.read, path)
            try:
                for start in range(0, len(items), _MAX_BATCH):
                    await self._ledger.settle_many(items[start : start + _MAX_BATCH])
            except Exception as exc:  # noqa: BLE001 - still down: the file stays for next time
                log.warning("ledger replay: database still unavailable (%r)", exc)
                return False
            await asyncio.to_thread(self._outbox.remove, path)
            log.warning("ledger replay: %d rows from %s written", len(items), path.name)
        return True

    async def aclose(self) -> None:
        """Flush, then stop the writer (a process's last step: see tokenwire.drain).

        Every queued row is written first: committed, or (the database refusing it through
        every retry) put in the outbox; so this takes at most the retry delays and a disk
        write. Rows still held in memory are then written to the outbox if it can take them,
        so the next start replays them.
        """
        if not self._queue.empty() and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")
        await self._queue.join()  # the writer always finishes a batch (retries, then spill)
        for task in (self._task, self._replayer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._held and self._outbox is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._outbox.write, self._held)
                self._held = []
