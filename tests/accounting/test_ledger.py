"""The Ledger on SQLite and PostgreSQL: reservations, settling once, idempotent credits, totals."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenwire.accounting.keys import KeyStore
from tokenwire.accounting.ledger import Ledger, LedgerRow
from tokenwire.errors import InsufficientQuota, NotFound
from tokenwire.storage.engine import make_engine, migrate
from tokenwire.storage.tables import credit_events, reservations, usage_ledger
from tokenwire.testing import ledger_row as completed_row


class Books:
    """A migrated database with a key store and a ledger."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.keys = KeyStore(engine, b"test-secret")
        self.ledger = Ledger(engine)

    async def count(self, table: sa.Table, key_id: str) -> int:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                sa.select(sa.func.count()).select_from(table).where(table.c.key_id == key_id)
            )
        return int(value or 0)


@pytest.fixture
async def books(database_url: str, tmp_path: Path) -> AsyncIterator[Books]:
    """A fresh database (SQLite or PostgreSQL) with the schema."""
    engine = make_engine(database_url)
    await migrate(engine)
    try:
        yield Books(engine)
    finally:
        await engine.dispose()


def ledger_row(key_id: str, completion_id: str, charge: int, **changes: object) -> LedgerRow:
    """A completed row charging ``charge`` micro-dollars, at a cost of half of it."""
    return completed_row(
        key_id, completion_id, cost_micro=charge // 2, charge_micro=charge, **changes
    )


async def test_reserve_refuses_when_short(books: Books) -> None:
    """reserve takes the amount off the balance if it is covered, else raises InsufficientQuota and changes nothing."""
    record, _ = await books.keys.create("short", grant_micro=1_000)
    await books.ledger.reserve(record.id, "chatcmpl-a", 600)
    assert await books.ledger.balance(record.id) == 400
    with pytest.raises(InsufficientQuota) as caught:
        await books.ledger.reserve(record.id, "chatcmpl-b", 401)
    assert caught.value.http_status == 402
    assert await books.ledger.balance(record.id) == 400
    assert await books.count(reservations, record.id) == 1
    await books.ledger.reserve(record.id, "chatcmpl-c", 400)  # exactly the balance is enough
    assert await books.ledger.balance(record.id) == 0


async def test_concurrent_reservations_never_overdraw(books: Books) -> None:
    """Twenty concurrent reservations of 100 against a balance of 1000: exactly ten succeed, the balance ends at 0."""
    record, _ = await books.keys.create("race", grant_micro=1_000)

    async def attempt(i: int) -> bool:
        try:
            await books.ledger.reserve(record.id, f"chatcmpl-{i}", 100)
        except InsufficientQuota:
            return False
        return True

    results = await asyncio.gather(*(attempt(i) for i in range(20)))
    assert sum(results) == 10
    assert await books.ledger.balance(record.id) == 0


async def test_settle_twice_writes_once(books: Books) -> None:
    """Settling a completion twice writes one ledger row and changes the balance once (reserved - cost given back)."""
    record, _ = await books.keys.create("settle", grant_micro=10_000)
    await books.ledger.reserve(record.id, "chatcmpl-x", 3_000)
    row = ledger_row(record.id, "chatcmpl-x", 1_234)
    assert await books.ledger.settle(row) is True
    assert await books.ledger.balance(record.id) == 10_000 - 1_234
    assert await books.ledger.settle(row) is False
    assert await books.ledger.settle(replace(row, charge_micro=9)) is False
    assert await books.ledger.balance(record.id) == 10_000 - 1_234
    assert await books.count(usage_ledger, record.id) == 1
    assert await books.count(reservations, record.id) == 0
    (stored,) = await books.ledger.rows(key_id=record.id)
    assert stored == row


async def test_release_gives_back_each_reservation_once(books: Books) -> None:
    """release refunds reservations still held and nothing else: releasing again, or one
    already settled, or one never made, changes no balance; two at once refund both."""
    record, _ = await books.keys.create("release", grant_micro=10_000)
    other, _ = await books.keys.create("release-other", grant_micro=10_000)
    await books.ledger.reserve(record.id, "chatcmpl-r1", 1_000)
    await books.ledger.reserve(record.id, "chatcmpl-r2", 2_000)
    await books.ledger.reserve(other.id, "chatcmpl-r3", 3_000)
    await books.ledger.reserve(record.id, "chatcmpl-s", 500)
    assert await books.ledger.settle(ledger_row(record.id, "chatcmpl-s", 100)) is True
    assert await books.ledger.balance(record.id) == 10_000 - 3_000 - 100
    ids = ["chatcmpl-r1", "chatcmpl-r2", "chatcmpl-r3", "chatcmpl-s", "chatcmpl-none"]
    assert await books.ledger.release(ids) == 3
    assert await books.ledger.balance(record.id) == 10_000 - 100
    assert await books.ledger.balance(other.id) == 10_000
    assert await books.ledger.release(ids) == 0
    assert await books.ledger.balance(record.id) == 10_000 - 100
    assert await books.count(reservations, record.id) == 0


async def test_settle_without_reservation_charges_the_cost(books: Books) -> None:
    """A row settled with no reservation (e.g. released as stale first) still takes its cost off the balance."""
    record, _ = await books.keys.create("late", grant_micro=5_000)
    assert await books.ledger.settle(ledger_row(record.id, "chatcmpl-late", 700)) is True
    assert await books.ledger.balance(record.id) == 4_300


async def test_credit_is_idempotent_on_payment_id(books: Books) -> None:
    """The same payment_id credits once: the second call reports applied=False and the balance is unchanged."""
    record, _ = await books.keys.create("payer", grant_micro=0)
    assert await books.ledger.credit(record.id, 10_000_000, kind="payment", payment_id="pi_1") == (
        10_000_000,
        True,
    )
    assert await books.ledger.credit(record.id, 10_000_000, kind="payment", payment_id="pi_1") == (
        10_000_000,
        False,
    )
    assert await books.ledger.credit(record.id, 5, kind="payment", payment_id="pi_2") == (
        10_000_005,
        True,
    )
    # Credits without a payment id (admin top-ups) are never deduplicated.
    await books.ledger.credit(record.id, 1, kind="topup")
    balance, applied = await books.ledger.credit(record.id, 1, kind="topup")
    assert (balance, applied) == (10_000_007, True)
    assert await books.count(credit_events, record.id) == 4
    with pytest.raises(NotFound):
        await books.ledger.credit("key_missing", 1, payment_id="pi_3")
    async with books.engine.connect() as conn:
        orphan = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(credit_events)
            .where(credit_events.c.payment_id == "pi_3")
        )
    assert orphan == 0


async def test_abandon_stale_reservations(books: Books) -> None:
    """Reservations older than the cutoff get one free ``abandoned`` row and are given back;
    newer ones stay held; the real row replayed later replaces it and is charged then."""
    record, _ = await books.keys.create("stale", grant_micro=10_000)
    await books.ledger.reserve(
        record.id, "chatcmpl-old", 2_000, model="priced", provider="sim", transport="ws"
    )
    await books.ledger.reserve(record.id, "chatcmpl-new", 3_000)
    async with books.engine.begin() as conn:
        await conn.execute(
            reservations.update()
            .where(reservations.c.completion_id == "chatcmpl-old")
            .values(created_at=int(time.time()) - 7 * 3600)
        )
    assert await books.ledger.balance(record.id) == 5_000
    assert await books.ledger.abandon_stale_reservations(older_than_s=6 * 3600) == 1
    assert await books.ledger.balance(record.id) == 7_000
    assert await books.ledger.abandon_stale_reservations(older_than_s=6 * 3600) == 0
    assert await books.count(reservations, record.id) == 1
    [abandoned] = await books.ledger.rows(key_id=record.id)
    assert (abandoned.completion_id, abandoned.status) == ("chatcmpl-old", "abandoned")
    assert (abandoned.cost_micro, abandoned.charge_micro, abandoned.plan) == (0, 0, None)
    assert (abandoned.model, abandoned.provider, abandoned.transport) == ("priced", "sim", "ws")
    late = replace(
        abandoned,
        status="completed",
        cost_micro=500,
        charge_micro=1_200,
        plan="standard",
        prompt_tokens=9,
    )
    assert await books.ledger.settle_many([(late, True)]) == {"chatcmpl-old"}
    assert await books.ledger.settle_many([(late, True)]) == set()  # a second replay: nothing
    [row] = await books.ledger.rows(key_id=record.id)
    assert (row.status, row.cost_micro, row.charge_micro, row.prompt_tokens) == (
        "completed",
        500,
        1_200,
        9,
    )
    assert await books.ledger.balance(record.id) == 7_000 - 1_200


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


async def test_rows_filters_and_order(books: Books) -> None:
    """rows() filters by key, model and [since, until) and returns the newest first, up to limit."""
    one, _ = await books.keys.create("one", grant_micro=10**9)
    two, _ = await books.keys.create("two", grant_micro=10**9)
    times = ["2025-03-01T01:00:00", "2025-03-01T23:00:00", "2025-03-02T10:00:00"]
    for i, moment in enumerate(times):
        await books.ledger.settle(ledger_row(one.id, f"c-one-{i}", 100, created_at=_ms(moment)))
    await books.ledger.settle(ledger_row(two.id, "c-two", 7, model="sim", created_at=_ms(times[0])))
    rows = await books.ledger.rows(key_id=one.id)
    assert [r.completion_id for r in rows] == ["c-one-2", "c-one-1", "c-one-0"]
    window = await books.ledger.rows(
        since_ms=_ms("2025-03-01T01:00:00"), until_ms=_ms("2025-03-02T10:00:00")
    )
    assert {r.completion_id for r in window} == {"c-one-0", "c-one-1", "c-two"}
    assert [r.completion_id for r in await books.ledger.rows(model="sim")] == ["c-two"]
    assert len(await books.ledger.rows(key_id=one.id, limit=2)) == 2


async def test_totals_group_by_utc_day(books: Books) -> None:
    """totals() groups by key, model and UTC day: a row at 23:00 UTC belongs to that day, not the next."""
    record, _ = await books.keys.create("days", grant_micro=10**9)
    for i, moment in enumerate(
        ["2025-03-01T01:00:00", "2025-03-01T23:00:00", "2025-03-02T10:00:00"]
    ):
        await books.ledger.settle(ledger_row(record.id, f"c-{i}", 100 + i, created_at=_ms(moment)))
    by_day = await books.ledger.totals(key_id=record.id, group_by=("day",))
    assert [(r["day"], r["requests"], r["charge_micro"]) for r in by_day] == [
        ("2025-03-01", 2, 201),
        ("2025-03-02", 1, 102),
    ]


async def test_totals_sums(books: Books) -> None:
    """totals() sums requests, tokens and charge per key and model, and overall with no grouping."""
    one, _ = await books.keys.create("one", grant_micro=10**9)
    two, _ = await books.keys.create("two", grant_micro=10**9)
    await books.ledger.settle(ledger_row(one.id, "a", 100))
    await books.ledger.settle(ledger_row(one.id, "b", 50, model="sim", prompt_tokens=1))
    await books.ledger.settle(ledger_row(two.id, "c", 25, completion_tokens=2))
    grouped = await books.ledger.totals(group_by=("key_id", "model"))
    as_tuples = {
        (r["key_id"], r["model"]): (
            r["requests"],
            r["prompt_tokens"],
            r["completion_tokens"],
            r["charge_micro"],
        )
        for r in grouped
    }
    assert as_tuples == {
        (one.id, "priced-sim"): (1, 10, 20, 100),
        (one.id, "sim"): (1, 1, 20, 50),
        (two.id, "priced-sim"): (1, 10, 2, 25),
    }
    (overall,) = await books.ledger.totals(group_by=())
    assert (overall["requests"], overall["charge_micro"], overall["cost_micro"]) == (3, 175, 87)
    (empty,) = await books.ledger.totals(key_id="key_none", group_by=())
    assert (empty["requests"], empty["prompt_tokens"], empty["charge_micro"]) == (0, 0, 0)
