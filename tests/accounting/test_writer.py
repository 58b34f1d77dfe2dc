"""Batched settlement: many completions in few transactions, each exactly once, refunds exact."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenwire.accounting.keys import KeyStore
from tokenwire.accounting.ledger import Ledger, LedgerRow
from tokenwire.accounting.outbox import LedgerOutbox
from tokenwire.accounting.writer import LedgerWriter
from tokenwire.storage.engine import make_engine, migrate
from tokenwire.testing import ledger_row


def row(completion_id: str, key_id: str, charge: int) -> LedgerRow:
    """A completed row charging ``charge`` (costing a third of it)."""
    return ledger_row(key_id, completion_id, cost_micro=charge // 3, charge_micro=charge)


async def test_concurrent_settlements_batch_and_refund_exactly(
    database_url: str, tmp_path: Path
) -> None:
    """100 settlements at once: 100 rows, few commits, balance = grant - charges; replays change nothing."""
    engine = make_engine(database_url)
    commits: list[int] = []

    def count(_conn: object) -> None:
        commits.append(1)

    # every engine: on SQLite the batches are written by the ledger's thread engine
    sa.event.listen(sa.Engine, "commit", count)
    try:
        await migrate(engine)
        record, _ = await KeyStore(engine, b"s").create("batch", grant_micro=1_000_000)
        ledger = Ledger(engine)
        for i in range(100):
            await ledger.reserve(record.id, f"c{i}", 5_000)
        assert await ledger.balance(record.id) == 1_000_000 - 100 * 5_000
        writer = LedgerWriter(ledger)
        commits.clear()
        results = await asyncio.gather(
            *(writer.settle(row(f"c{i}", record.id, 1_000 + i), reserved=True) for i in range(100))
        )
        assert results == [True] * 100
        assert 1 <= len(commits) < 100  # batched, not one transaction per row
        expected = 1_000_000 - sum(1_000 + i for i in range(100))
        assert await ledger.balance(record.id) == expected
        assert len(await ledger.rows(key_id=record.id)) == 100
        again = await asyncio.gather(
            *(writer.settle(row(f"c{i}", record.id, 1), reserved=True) for i in range(0, 100, 7))
        )
        assert not any(again)
        assert await ledger.balance(record.id) == expected
        await writer.aclose()
    finally:
        sa.event.remove(sa.Engine, "commit", count)
        await engine.dispose()


async def test_free_completion_is_one_insert(tmp_path: Path) -> None:
    """A free model's settlement writes its row and leaves the balance alone."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await migrate(engine)
        record, _ = await KeyStore(engine, b"s").create("free", grant_micro=7)
        ledger = Ledger(engine)
        assert await ledger.settle(row("f1", record.id, 0), reserved=False)
        assert not await ledger.settle(row("f1", record.id, 0), reserved=False)
        assert await ledger.balance(record.id) == 7
    finally:
        await engine.dispose()


class FlakyLedger(Ledger):
    """A ledger whose batch writes fail while ``down`` (the database refuses them)."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.down = False
        self.failed = 0

    async def settle_many(self, items: list[tuple[LedgerRow, bool]]) -> set[str]:
        if self.down:
            self.failed += 1
            raise OSError("database unreachable")
        return await super().settle_many(items)


async def _books(tmp_path: Path, grant: int) -> tuple[AsyncEngine, FlakyLedger, str]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await migrate(engine)
    record, _ = await KeyStore(engine, b"s").create("flaky", grant_micro=grant)
    return engine, FlakyLedger(engine), record.id


async def test_a_write_that_fails_briefly_is_retried(tmp_path: Path) -> None:
    """A batch the database refuses once is written by the retry: one row, nothing spilled."""
    engine, ledger, key_id = await _books(tmp_path, 10_000)
    try:
        await ledger.reserve(key_id, "c1", 5_000)
        outbox = LedgerOutbox(tmp_path / "outbox")
        writer = LedgerWriter(ledger, outbox, retry_delays_s=(0.01, 0.01))
        ledger.down = True
        settling = asyncio.ensure_future(writer.settle(row("c1", key_id, 700), reserved=True))
        async with asyncio.timeout(5):
            while ledger.failed == 0:  # noqa: ASYNC110 - a counter of the fake; no event
                await asyncio.sleep(0.001)
        ledger.down = False
        assert await settling is True
        assert outbox.files() == [] and writer.write_failures >= 1
        assert await ledger.balance(key_id) == 10_000 - 700
        await writer.aclose()
    finally:
        await engine.dispose()


async def test_a_database_that_stays_down_spills_to_the_outbox_then_replays(
    tmp_path: Path,
) -> None:
    """Rows the database keeps refusing go to the outbox (settle returns; reservations stay
    held), and are written exactly once when it answers again, even by a new process."""
    engine, ledger, key_id = await _books(tmp_path, 100_000)
    try:
        for i in range(5):
            await ledger.reserve(key_id, f"c{i}", 10_000)
        outbox = LedgerOutbox(tmp_path / "outbox")
        writer = LedgerWriter(ledger, outbox, retry_delays_s=(0.01,))
        ledger.down = True
        async with asyncio.timeout(5):
            results = await asyncio.gather(
                *(writer.settle(row(f"c{i}", key_id, 1_000 + i), reserved=True) for i in range(5))
            )
        assert results == [True] * 5
        assert outbox.pending_rows() == 5
        assert await ledger.balance(key_id) == 100_000 - 5 * 10_000  # still reserved
        assert not await writer.replay()  # still down: everything stays
        await writer.aclose()  # the process ends with the rows only on disk

        ledger.down = False
        restarted = LedgerWriter(Ledger(engine), LedgerOutbox(tmp_path / "outbox"))
        assert await restarted.replay()
        assert await restarted.replay()  # nothing left, nothing doubled
        assert outbox.files() == []
        assert len(await ledger.rows(key_id=key_id)) == 5
        assert await ledger.balance(key_id) == 100_000 - sum(1_000 + i for i in range(5))
        await restarted.aclose()
    finally:
        await engine.dispose()


async def test_rows_neither_the_database_nor_the_disk_takes_stay_in_memory(
    tmp_path: Path,
) -> None:
    """An outbox that cannot be written keeps the rows in memory, replayed when the database
    is back; a half-written outbox file (a crash mid-write) is never read."""
    engine, ledger, key_id = await _books(tmp_path, 10_000)
    try:
        await ledger.reserve(key_id, "c1", 5_000)
        blocked = tmp_path / "not-a-directory"
        blocked.write_text("")
        writer = LedgerWriter(ledger, LedgerOutbox(blocked), retry_delays_s=(0.01,))
        ledger.down = True
        async with asyncio.timeout(5):
            assert await writer.settle(row("c1", key_id, 300), reserved=True) is True
        assert writer.held == 1
        ledger.down = False
        assert await writer.replay()
        assert writer.held == 0
        assert await ledger.balance(key_id) == 10_000 - 300
        torn = tmp_path / "outbox"
        torn.mkdir()
        (torn / "ledger-1-2-3.tmp").write_text('{"row": {"completion_id": "x"')
        assert LedgerOutbox(torn).files() == []
        await writer.aclose()
    finally:
        await engine.dispose()


async def test_a_batch_spilled_during_a_replay_is_replayed_too(tmp_path: Path) -> None:
    """A batch written to the outbox while the replay task is busy with an earlier one is
    replayed by that same task, without another spill or a restart to wake it."""
    engine, _, key_id = await _books(tmp_path, 10_000)

    class GatedLedger(FlakyLedger):
        def __init__(self) -> None:
            super().__init__(engine)
            self.gate = asyncio.Event()
            self.replaying = asyncio.Event()  # a replay is inside settle_many, at the gate
            self.refuse: set[str] = set()

        async def settle_many(self, items: list[tuple[LedgerRow, bool]]) -> set[str]:
            if {row.completion_id for row, _ in items} & self.refuse:
                raise OSError("refused")
            if not self.down:
                self.replaying.set()
                await self.gate.wait()
            return await super().settle_many(items)

    gated = GatedLedger()
    try:
        outbox = LedgerOutbox(tmp_path / "outbox")
        writer = LedgerWriter(gated, outbox, retry_delays_s=(0.0,))
        gated.down = True
        await writer.settle(row("first", key_id, 100), reserved=False)  # spilled
        gated.down = False  # the replay of "first" will wait at the gate
        gated.refuse.add("second")
        async with asyncio.timeout(5):
            await gated.replaying.wait()  # the replay has listed the outbox: only "first"
            await writer.settle(row("second", key_id, 200), reserved=False)  # spilled too
        assert len(outbox.files()) == 2
        gated.refuse.clear()
        gated.gate.set()
        async with asyncio.timeout(10):
            while outbox.files():  # noqa: ASYNC110 - files on disk; no event to wait on
                await asyncio.sleep(0.05)
        ids = {r.completion_id for r in await gated.rows(key_id=key_id)}
        assert ids == {"first", "second"}
        await writer.aclose()
    finally:
        await engine.dispose()


async def test_aclose_writes_every_queued_row_before_it_stops(tmp_path: Path) -> None:
    """Settlements still queued when the writer is closed (a process's exit) are committed first: every settle returns True and every row is in the ledger."""
    engine, ledger, key_id = await _books(tmp_path, 100_000)
    try:
        for i in range(10):
            await ledger.reserve(key_id, f"q{i}", 5_000)
        writer = LedgerWriter(ledger, LedgerOutbox(tmp_path / "outbox"))
        settles = [
            asyncio.create_task(writer.settle(row(f"q{i}", key_id, 1_000), reserved=True))
            for i in range(10)
        ]
        closing = asyncio.create_task(writer.aclose())  # runs after the settles queued
        async with asyncio.timeout(10):
            assert await asyncio.gather(*settles) == [True] * 10
            await closing
        assert len(await ledger.rows(key_id=key_id)) == 10
        assert await ledger.balance(key_id) == 100_000 - 10 * 1_000
    finally:
        await engine.dispose()
