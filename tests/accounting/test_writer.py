"""Batched settlement: many completions in few transactions, each exactly once, refunds exact."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa

from tokenwire.accounting.keys import KeyStore
from tokenwire.accounting.ledger import Ledger, LedgerRow
from tokenwire.accounting.writer import LedgerWriter
from tokenwire.storage.engine import make_engine, migrate


def row(completion_id: str, key_id: str, cost: int) -> LedgerRow:
    return LedgerRow(
        completion_id=completion_id,
        key_id=key_id,
        model="priced",
        provider="sim",
        transport="sse",
        prompt_tokens=10,
        completion_tokens=5,
        usage_estimated=False,
        cost_micro=cost,
        ttft_ms=1,
        duration_ms=2,
        finish_reason="stop",
        status="completed",
        created_at=1_700_000_000_000,
    )


async def test_concurrent_settlements_batch_and_refund_exactly(
    database_url: str, tmp_path: Path
) -> None:
    """100 settlements at once: 100 rows, few commits, balance = grant - costs; replays change nothing."""
    engine = make_engine(database_url)
    commits: list[int] = []

    @sa.event.listens_for(engine.sync_engine, "commit")
    def count(_conn: object) -> None:
        commits.append(1)

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
        assert len(commits) < 100  # batched, not one transaction per row
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
