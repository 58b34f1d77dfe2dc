"""Cost and charge in the ledger, on SQLite and PostgreSQL: balances move by charges, reports
sum both, credits keep what was paid, and migration 0004 reads the old rows right."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenwire.accounting.currency import Credit
from tokenwire.accounting.keys import KeyStore
from tokenwire.accounting.ledger import Ledger, LedgerRow
from tokenwire.accounting.outbox import LedgerOutbox
from tokenwire.storage.engine import MIGRATIONS, make_engine, migrate
from tokenwire.storage.tables import api_keys, credit_events
from tokenwire.testing import ledger_row

DAY_MS = 86_400_000
JAN_1 = 1_735_689_600_000  # 2025-01-01T00:00:00Z


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """A fresh, migrated database (SQLite or PostgreSQL)."""
    engine = make_engine(database_url)
    await migrate(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


def bill(key_id: str, completion_id: str, **fields: object) -> LedgerRow:
    """A completed gpt-4.1 row on 1 January 2025; cost, charge and the rest given by the test."""
    defaults = {"model": "gpt-4.1", "provider": "openai", "created_at": JAN_1}
    return ledger_row(key_id, completion_id, **(defaults | fields))


async def test_balances_move_by_the_charge_and_the_cost_is_kept(engine: AsyncEngine) -> None:
    """A completion costing 600 and charged 1,200 takes 1,200 from a 5,000 reservation: the
    balance ends at grant - 1,200, and the row keeps both figures and the cache counts."""
    keys, ledger = KeyStore(engine, b"s"), Ledger(engine)
    record, _ = await keys.create("charged", grant_micro=10_000)
    await ledger.reserve(record.id, "c1", 5_000)
    row = bill(
        record.id,
        "c1",
        cost_micro=600,
        charge_micro=1_200,
        cache_write_tokens=30,
        cache_read_tokens=40,
    )
    assert await ledger.settle(row)
    assert await ledger.balance(record.id) == 10_000 - 1_200
    [stored] = await ledger.rows(key_id=record.id)
    assert stored == row and stored.margin_micro == 600


async def test_report_sums_cost_charge_and_margin_by_every_group(engine: AsyncEngine) -> None:
    """Rows on two keys, plans, models, providers and days: each grouping's groups add up to
    the overall total exactly, and the figures are the hand-added ones."""
    keys, ledger = KeyStore(engine, b"s"), Ledger(engine)
    one, _ = await keys.create("one", grant_micro=10**9)
    two, _ = await keys.create("two", grant_micro=10**9, plan="at-cost")
    rows = [
        bill(one.id, "a", cost_micro=250, charge_micro=400),
        bill(one.id, "b", cost_micro=175, charge_micro=210, model="deepseek-v3.2",
             provider="deepseek", created_at=JAN_1 + DAY_MS),
        bill(two.id, "c", cost_micro=250, charge_micro=250, plan="at-cost",
             cache_read_tokens=60),
        bill(two.id, "d", cost_micro=900, charge_micro=700, model="claude-sonnet-4.5",
             provider="anthropic", plan="promo", cache_write_tokens=10),
    ]  # fmt: skip
    for row in rows:
        assert await ledger.settle(row, reserved=False)
    (overall,) = await ledger.totals(group_by=())
    assert (overall["cost_micro"], overall["charge_micro"]) == (1_575, 1_560)
    assert (overall["cache_write_tokens"], overall["cache_read_tokens"]) == (10, 60)
    for group_by in [("key_id",), ("model",), ("provider",), ("plan",), ("day",)]:
        groups = await ledger.totals(group_by=group_by)
        for name in ("requests", "prompt_tokens", "cost_micro", "charge_micro"):
            assert sum(g[name] for g in groups) == overall[name], (group_by, name)
    by_plan = {
        g["plan"]: (g["cost_micro"], g["charge_micro"])
        for g in await ledger.totals(group_by=("plan",))
    }
    assert by_plan == {"standard": (425, 610), "at-cost": (250, 250), "promo": (900, 700)}
    by_provider = await ledger.totals(group_by=("provider", "day"))
    assert [(g["provider"], g["day"], g["charge_micro"]) for g in by_provider] == [
        ("anthropic", "2025-01-01", 700),
        ("deepseek", "2025-01-02", 210),
        ("openai", "2025-01-01", 650),
    ]


async def test_credits_record_what_was_paid(engine: AsyncEngine) -> None:
    """A USD top-up records USD at 1; a payment in CNY records the yuan and the rate; a grant
    at creation is a USD credit too."""
    keys, ledger = KeyStore(engine, b"s"), Ledger(engine)
    record, _ = await keys.create("payer", grant_micro=2_000_000)
    await ledger.credit(record.id, 5_000_000, kind="topup")
    paid = Credit(9_828_000, "CNY", 70_000_000, "0.1404")
    balance, applied = await ledger.credit(
        record.id, 9_828_000, kind="payment", payment_id="pi_cny", paid=paid
    )
    assert (balance, applied) == (2_000_000 + 5_000_000 + 9_828_000, True)
    with pytest.raises(ValueError, match="differ"):
        await ledger.credit(record.id, 1, kind="payment", paid=paid)
    async with engine.connect() as conn:
        events = (
            await conn.execute(
                sa.select(
                    credit_events.c.kind,
                    credit_events.c.amount_micro,
                    credit_events.c.currency,
                    credit_events.c.original_micro,
                    credit_events.c.rate,
                )
                .where(credit_events.c.key_id == record.id)
                .order_by(credit_events.c.id)
            )
        ).all()
    assert [tuple(e) for e in events] == [
        ("grant", 2_000_000, "USD", 2_000_000, "1"),
        ("topup", 5_000_000, "USD", 5_000_000, "1"),
        ("payment", 9_828_000, "CNY", 70_000_000, "0.1404"),
    ]


def _to_revision(connection: sa.Connection, revision: str, *, down: bool = False) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    (command.downgrade if down else command.upgrade)(config, revision)


async def test_migration_0004_reads_old_rows_as_charged(database_url: str) -> None:
    """A database at 0003 with a ledger row (cost_micro 219: what the key paid) and a top-up
    migrates to: charge 219 (cost kept, margin 0), a USD credit of the same amount, no plan;
    downgrading writes the charge back into cost_micro."""
    engine = make_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to_revision, "0003")
            await conn.execute(
                sa.text(
                    "INSERT INTO api_keys (id, name, prefix, secret_hash, is_admin, created_at,"
                    " balance_micro) VALUES ('key_old', 'old', 'tw-old', 'digest', false, 1, 781)"
                )
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO usage_ledger (completion_id, key_id, model, provider, transport,"
                    " prompt_tokens, completion_tokens, usage_estimated, cost_micro, ttft_ms,"
                    " duration_ms, finish_reason, status, created_at) VALUES ('chatcmpl-old',"
                    " 'key_old', 'priced-sim', 'sim', 'sse', 13, 12, false, 219, 1, 2, 'stop',"
                    " 'completed', 1735689600000)"
                )
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO credit_events (key_id, kind, amount_micro, created_at)"
                    " VALUES ('key_old', 'topup', 1000, 1)"
                )
            )
        await migrate(engine)
        ledger = Ledger(engine)
        [row] = await ledger.rows(key_id="key_old")
        assert (row.cost_micro, row.charge_micro, row.margin_micro, row.plan) == (219, 219, 0, None)
        assert (row.cache_write_tokens, row.cache_read_tokens) == (0, 0)
        async with engine.connect() as conn:
            event = (await conn.execute(sa.select(credit_events))).one()
            plan = await conn.scalar(sa.select(api_keys.c.plan))
        assert (event.currency, event.original_micro, event.rate) == ("USD", 1000, "1")
        assert plan is None
        record = await KeyStore(engine, b"s").get("key_old")
        assert record is not None and record.plan is None
        assert await ledger.settle(
            bill("key_old", "chatcmpl-new", cost_micro=5, charge_micro=9), reserved=False
        )
        by_plan = await ledger.totals(group_by=("plan",))  # the old row's null plan first
        assert [(g["plan"], g["charge_micro"], g["cost_micro"]) for g in by_plan] == [
            (None, 219, 219),
            ("standard", 9, 5),
        ]
        async with engine.begin() as conn:
            await conn.run_sync(_to_revision, "0003", down=True)
        async with engine.connect() as conn:
            old = dict(
                (
                    await conn.execute(
                        sa.text("SELECT completion_id, cost_micro FROM usage_ledger")
                    )
                ).all()
            )
        assert old == {"chatcmpl-old": 219, "chatcmpl-new": 9}
    finally:
        await engine.dispose()


def test_outbox_rows_from_before_plans_read_as_charged(tmp_path: Path) -> None:
    """A row spilled by a version before plans (one amount, cost_micro) replays with that
    amount as its charge, as migration 0004 reads the ledger's old rows."""
    outbox = LedgerOutbox(tmp_path)
    path = tmp_path / "ledger-000000000000001-1-abcd.jsonl"
    old = {
        "completion_id": "chatcmpl-spilled",
        "key_id": "key_x",
        "model": "priced-sim",
        "provider": "sim",
        "transport": "sse",
        "prompt_tokens": 13,
        "completion_tokens": 12,
        "usage_estimated": False,
        "cost_micro": 219,
        "ttft_ms": 1,
        "duration_ms": 2,
        "finish_reason": "stop",
        "status": "completed",
        "created_at": JAN_1,
    }
    path.write_text(json.dumps({"row": old, "reserved": True}) + "\n")
    [(row, reserved)] = outbox.read(path)
    assert reserved and (row.cost_micro, row.charge_micro, row.plan) == (219, 219, None)
    assert (row.cache_write_tokens, row.cache_read_tokens) == (0, 0)


async def test_concurrent_replays_of_one_batch_charge_once(engine: AsyncEngine) -> None:
    """Two settlements of the same rows at once (two processes replaying one outbox file, or
    the replay task beside a start-up replay) write each row once and charge it once: the
    balance ends at grant - charges, whatever the interleaving."""
    keys, ledger = KeyStore(engine, b"s"), Ledger(engine)
    record, _ = await keys.create("replayed", grant_micro=1_000_000)
    rows = []
    for i in range(20):
        await ledger.reserve(record.id, f"c{i}", 5_000)
        rows.append(bill(record.id, f"c{i}", cost_micro=400, charge_micro=1_000 + i))
    batches = [[(row, True)] for row in rows]
    written = await asyncio.gather(
        *(ledger.settle_many(batch) for batch in batches for _ in range(3))
    )
    assert sorted(cid for ids in written for cid in ids) == sorted(r.completion_id for r in rows)
    assert await ledger.balance(record.id) == 1_000_000 - sum(r.charge_micro for r in rows)
    abandoned = replace(rows[0], completion_id="late", status="abandoned", charge_micro=0)
    await ledger.settle(abandoned, reserved=False)
    real = replace(abandoned, status="completed", charge_micro=700)
    results = await asyncio.gather(*(ledger.settle_many([(real, False)]) for _ in range(3)))
    assert sum(len(ids) for ids in results) == 1
    assert await ledger.balance(record.id) == 1_000_000 - sum(r.charge_micro for r in rows) - 700
