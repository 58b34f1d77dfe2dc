"""Reservations many to a transaction (``Ledger.reserve_many`` and the ``Reserver``), on SQLite
and PostgreSQL: the same outcome as one call each, fewer transactions, nothing left held."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenwire.accounting.keys import KeyStore
from tokenwire.accounting.ledger import Ledger, Reservation
from tokenwire.accounting.reserver import Reserver
from tokenwire.errors import DatabaseUnavailable, InsufficientQuota
from tokenwire.storage.engine import make_engine, migrate
from tokenwire.storage.tables import reservations


class CountingLedger(Ledger):
    """A ledger that counts reserve_many transactions and can hold them at a gate."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.batches: list[int] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.fail = False

    async def reserve_many(self, items: list[Reservation]) -> list[bool]:
        self.batches.append(len(items))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise DatabaseUnavailable("The database is unavailable (test).")
        return await super().reserve_many(items)


@pytest.fixture
async def engine(database_url: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A fresh migrated database (SQLite or PostgreSQL)."""
    engine = make_engine(database_url)
    await migrate(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


async def open_reservations(engine: AsyncEngine, key_id: str) -> int:
    async with engine.connect() as conn:
        value = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(reservations)
            .where(reservations.c.key_id == key_id)
        )
    return int(value or 0)


async def test_reserve_many_takes_all_or_one_by_one_in_order(engine: AsyncEngine) -> None:
    """A batch the balance covers is taken whole; one it does not is taken item by item in
    order, as separate calls would: 1000 against 600, 500, 400 holds the first and the last."""
    keys = KeyStore(engine, b"secret")
    ledger = Ledger(engine)
    rich, _ = await keys.create("rich", grant_micro=10_000)
    poor, _ = await keys.create("poor", grant_micro=1_000)
    granted = await ledger.reserve_many(
        [
            Reservation(poor.id, "p1", 600),
            Reservation(rich.id, "r1", 3_000),
            Reservation(poor.id, "p2", 500),
            Reservation(rich.id, "r2", 7_000),
            Reservation(poor.id, "p3", 400),
        ]
    )
    assert granted == [True, True, False, True, True]
    assert await ledger.balance(rich.id) == 0
    assert await ledger.balance(poor.id) == 0
    assert await open_reservations(engine, rich.id) == 2
    assert await open_reservations(engine, poor.id) == 2


async def test_concurrent_reservations_share_transactions(engine: AsyncEngine) -> None:
    """Twenty requests reserving at once all hold their credit, in fewer than twenty
    transactions; the twenty-first that the balance no longer covers gets 402."""
    keys = KeyStore(engine, b"secret")
    ledger = CountingLedger(engine)
    record, _ = await keys.create("burst", grant_micro=20 * 100)
    reserver = Reserver(ledger)
    await asyncio.gather(
        *(reserver.reserve(Reservation(record.id, f"c{i}", 100)) for i in range(20))
    )
    assert sum(ledger.batches) == 20 and len(ledger.batches) < 20
    assert await ledger.balance(record.id) == 0
    assert await open_reservations(engine, record.id) == 20
    with pytest.raises(InsufficientQuota):
        await reserver.reserve(Reservation(record.id, "c20", 1))


async def test_a_caller_gone_while_its_reservation_is_written_leaves_nothing_held(
    engine: AsyncEngine,
) -> None:
    """A request cancelled while its reservation is being written: the reservation is given
    back once written (balance whole again, no row held, no ledger row)."""
    keys = KeyStore(engine, b"secret")
    ledger = CountingLedger(engine)
    ledger.gate = asyncio.Event()
    record, _ = await keys.create("gone", grant_micro=1_000)
    reserver = Reserver(ledger)
    waiting = asyncio.ensure_future(reserver.reserve(Reservation(record.id, "c1", 700)))
    await ledger.entered.wait()  # the transaction is under way
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    ledger.gate.set()
    await reserver.aclose()  # the transaction, then the reservation given back
    assert await ledger.balance(record.id) == 1_000
    assert await open_reservations(engine, record.id) == 0


async def test_a_database_failure_fails_every_waiter_and_holds_nothing(
    engine: AsyncEngine,
) -> None:
    """When the batch's transaction fails, each request gets DatabaseUnavailable (503) and
    the next batch works again."""
    keys = KeyStore(engine, b"secret")
    ledger = CountingLedger(engine)
    record, _ = await keys.create("down", grant_micro=1_000)
    reserver = Reserver(ledger)
    ledger.fail = True
    outcomes = await asyncio.gather(
        *(reserver.reserve(Reservation(record.id, f"c{i}", 100)) for i in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(o, DatabaseUnavailable) for o in outcomes), outcomes
    assert await ledger.balance(record.id) == 1_000
    ledger.fail = False
    await reserver.reserve(Reservation(record.id, "c9", 100))
    assert await ledger.balance(record.id) == 900
