"""Credits, reservations and the usage ledger: every write is one transaction.

A ledger row carries two amounts: ``cost_micro``, what the completion cost the operator
(the model's upstream prices), and ``charge_micro``, what the key was charged (its plan's
prices). Balances move by charges only. The invariant, for every key at every moment::

    balance = grants + top-ups + payments - sum(ledger charge) - sum(open reservations)

* **reserve** (at admission, models the key's plan charges for): subtract the worst-case
  charge from the balance if the balance covers it (one conditional ``UPDATE``, atomic on
  SQLite and PostgreSQL alike) and record the reservation. Concurrent requests therefore
  never take a balance below zero, and since a completion is never charged more than its
  reservation (``completions.py``), no completion can either.
  Reservations asked for while one is being written share the next transaction
  (``accounting/reserver.py``); one whose request went away before it started is given back
  (**release**: no ledger row, nothing was used).
* **settle** (when the completion ends, once): insert the ledger row keyed by the completion
  id (a second attempt inserts nothing and changes nothing), delete the reservation, and give
  back ``reserved - charge``.
* **abandon** (at start-up, for reservations older than hours: their process died before it
  could settle them): one ``abandoned`` row at no cost or charge, and the reservation given
  back. If the real row turns up later (replayed from that process's outbox), it replaces the
  abandoned one and its charge is taken then.
* **credit**: a credit event plus the balance change; a payment id can be applied only once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenwire.accounting.currency import Credit, usd_credit
from tokenwire.errors import InsufficientQuota, NotFound
from tokenwire.storage.engine import database_errors, insert_ignoring_duplicates
from tokenwire.storage.tables import api_keys, credit_events, reservations, usage_ledger
from tokenwire.storage.transactions import Transactions

ABANDONED = "abandoned"
LEDGER_STATUSES = ("completed", "cancelled", "client_disconnected", "upstream_error", ABANDONED)
GROUPS = ("key_id", "model", "provider", "plan", "day")
"""What usage totals can be grouped by."""
SUMMED = (
    "prompt_tokens",
    "completion_tokens",
    "cache_write_tokens",
    "cache_read_tokens",
    "cost_micro",
    "charge_micro",
)
"""The ledger's columns that totals add up."""


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One completion's bill: what it cost the operator and what the key was charged."""

    completion_id: str
    key_id: str
    model: str
    provider: str
    transport: str  # "sse", "ws" or "json"
    prompt_tokens: int  # the whole prompt, cached parts included
    completion_tokens: int
    usage_estimated: bool
    cost_micro: int  # what the operator pays the upstream
    charge_micro: int  # what the key pays: never more than its reservation
    plan: str | None  # the price list that set the charge
    ttft_ms: int | None
    duration_ms: int
    finish_reason: str | None
    status: str
    created_at: int  # Unix milliseconds
    cache_write_tokens: int = 0  # of prompt_tokens: written to the provider's prompt cache
    cache_read_tokens: int = 0  # of prompt_tokens: read from it
    api: str = "chat"  # "chat", "responses" or "messages" (last: older outbox files lack it)

    @property
    def margin_micro(self) -> int:
        """What the operator kept: the charge less the cost (negative: sold below cost)."""
        return self.charge_micro - self.cost_micro

    def columns(self) -> dict[str, Any]:
        """The row as ``usage_ledger`` column values (``dataclasses.asdict`` deep-copies
        every value, a tenth of the batch writer's time in a profile)."""
        return {name: getattr(self, name) for name in _LEDGER_COLUMNS}


_LEDGER_COLUMNS = tuple(f.name for f in fields(LedgerRow))


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a request holds of a key's balance until it settles (the ``reservations`` row)."""

    key_id: str
    completion_id: str
    amount_micro: int
    model: str | None = None  # these describe the completion, for the row written if its
    provider: str | None = None  # process dies before settling it
    transport: str | None = None
    api: str | None = None

    def row(self, now: int) -> dict[str, Any]:
        return {
            "completion_id": self.completion_id,
            "key_id": self.key_id,
            "amount_micro": self.amount_micro,
            "created_at": now,
            "model": self.model,
            "provider": self.provider,
            "transport": self.transport,
            "api": self.api,
        }

    def refusal(self) -> InsufficientQuota:
        """The 402 for a reservation the balance did not cover."""
        return InsufficientQuota(
            "You exceeded your current quota: this request may cost up to "
            f"${self.amount_micro / 1_000_000:.6f}, more than the key's credit balance. "
            "Top up the key or lower max_tokens."
        )


def _take(conn: sa.Connection, key_id: str, amount_micro: int) -> bool:
    """Take ``amount_micro`` off the key's balance if it covers it (one conditional UPDATE)."""
    result = conn.execute(
        api_keys.update()
        .where(api_keys.c.id == key_id, api_keys.c.balance_micro >= amount_micro)
        .values(balance_micro=api_keys.c.balance_micro - amount_micro)
    )
    return bool(result.rowcount == 1)


def _add(conn: sa.Connection, key_id: str, amount_micro: int) -> None:
    """Add ``amount_micro`` (negative: take it) to the key's balance, unconditionally."""
    conn.execute(
        api_keys.update()
        .where(api_keys.c.id == key_id)
        .values(balance_micro=api_keys.c.balance_micro + amount_micro)
    )


def _reserve_batch(conn: sa.Connection, items: list[Reservation]) -> list[bool]:
    """The transaction of :meth:`Ledger.reserve_many`."""
    granted = [False] * len(items)
    by_key: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_key.setdefault(item.key_id, []).append(index)
    for key_id, indexes in by_key.items():
        total = sum(items[i].amount_micro for i in indexes)
        if _take(conn, key_id, total):
            for i in indexes:
                granted[i] = True
            continue
        for i in indexes if len(indexes) > 1 else ():
            granted[i] = _take(conn, key_id, items[i].amount_micro)
    now = int(time.time())
    held = [item.row(now) for item, ok in zip(items, granted, strict=True) if ok]
    if held:
        conn.execute(reservations.insert(), held)
    return granted


def _release_batch(conn: sa.Connection, completion_ids: list[str]) -> int:
    """The transaction of :meth:`Ledger.release`: refund what the delete removed, so a
    reservation settled or released meanwhile by another writer is never refunded twice."""
    removed = conn.execute(
        reservations.delete()
        .where(reservations.c.completion_id.in_(completion_ids))
        .returning(reservations.c.key_id, reservations.c.amount_micro)
    ).all()
    refunds: dict[str, int] = {}
    for key_id, amount in removed:
        refunds[str(key_id)] = refunds.get(str(key_id), 0) + int(amount)
    for key_id, refund in refunds.items():
        _add(conn, key_id, refund)
    return len(removed)


def _settle_batch(conn: sa.Connection, items: list[tuple[LedgerRow, bool]]) -> set[str]:
    """The transaction of :meth:`Ledger.settle_many`."""
    ids = [row.completion_id for row, _ in items]
    found = conn.execute(
        sa.select(usage_ledger.c.completion_id, usage_ledger.c.status).where(
            usage_ledger.c.completion_id.in_(ids)
        )
    )
    existing = {str(cid): str(status) for cid, status in found}
    late = [
        row
        for row, _ in items
        if existing.get(row.completion_id) == ABANDONED and row.status != ABANDONED
    ]
    replaced = _replace_abandoned(conn, late)
    new = {}
    for row, reserved in items:
        if row.completion_id not in existing and row.completion_id not in new:
            new[row.completion_id] = (row, reserved)
    if not new:
        return replaced
    inserted = conn.execute(
        insert_ignoring_duplicates(conn, usage_ledger).returning(usage_ledger.c.completion_id),
        [row.columns() for row, _ in new.values()],
    )
    written = {str(cid) for cid in inserted.scalars()}  # not inserted meanwhile
    held_ids = [cid for cid in written if new[cid][1]]
    held: dict[str, int] = {}
    if held_ids:
        result = conn.execute(
            reservations.delete()
            .where(reservations.c.completion_id.in_(held_ids))
            .returning(reservations.c.completion_id, reservations.c.amount_micro)
        )
        held = {str(cid): int(amount) for cid, amount in result}
    refunds: dict[str, int] = {}
    for cid in written:
        row = new[cid][0]
        refund = held.get(cid, 0) - row.charge_micro
        if refund:
            refunds[row.key_id] = refunds.get(row.key_id, 0) + refund
    for key_id, refund in refunds.items():
        _add(conn, key_id, refund)
    return written | replaced


def _replace_abandoned(conn: sa.Connection, rows: list[LedgerRow]) -> set[str]:
    """The real rows of completions abandoned earlier: they replace the free ``abandoned``
    rows, and their charge is taken now (the abandonment gave the reservation back).
    Returns the ids replaced by this call (another may have replaced one meanwhile)."""
    replaced = set()
    for row in rows:
        result = conn.execute(
            usage_ledger.update()
            .where(
                usage_ledger.c.completion_id == row.completion_id,
                usage_ledger.c.status == ABANDONED,
            )
            .values(**row.columns())
        )
        if result.rowcount != 1:
            continue
        replaced.add(row.completion_id)
        if row.charge_micro:
            _add(conn, row.key_id, -row.charge_micro)
    return replaced


def _credit(conn: sa.Connection, event: dict[str, Any]) -> tuple[int, bool]:
    """The transaction of :meth:`Ledger.credit`: the ``credit_events`` row ``event`` and the
    balance change, unless its payment id was applied before; (new balance, applied)."""
    key_id = event["key_id"]
    if conn.scalar(_balance_of(key_id)) is None:
        raise NotFound(f"No API key with id {key_id!r}.", param="key_id")
    inserted = conn.execute(insert_ignoring_duplicates(conn, credit_events).values(**event))
    applied = inserted.rowcount == 1
    if applied:
        _add(conn, key_id, event["amount_micro"])
    return int(conn.scalar(_balance_of(key_id)) or 0), applied


def _balance_of(key_id: str) -> sa.Select[int]:
    return sa.select(api_keys.c.balance_micro).where(api_keys.c.id == key_id)


def _filtered(
    query: Any, key_id: str | None, since_ms: int | None, until_ms: int | None, model: str | None
) -> Any:
    """``query`` restricted to a key, a time range [since, until) in Unix ms, and a model."""
    if key_id is not None:
        query = query.where(usage_ledger.c.key_id == key_id)
    if since_ms is not None:
        query = query.where(usage_ledger.c.created_at >= since_ms)
    if until_ms is not None:
        query = query.where(usage_ledger.c.created_at < until_ms)
    if model is not None:
        query = query.where(usage_ledger.c.model == model)
    return query


class Ledger:
    """Balances, reservations, ledger rows and credit events in the database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.transactions = Transactions(engine)  # the writes: one hop to a thread on SQLite

    async def balance(self, key_id: str) -> int:
        """The key's balance in micro-dollars (open reservations already taken off)."""
        async with self._engine.connect() as conn:
            value = await conn.scalar(_balance_of(key_id))
        if value is None:
            raise NotFound(f"No API key with id {key_id!r}.", param="id")
        return int(value)

    async def reserve(
        self,
        key_id: str,
        completion_id: str,
        amount_micro: int,
        *,
        model: str | None = None,
        provider: str | None = None,
        transport: str | None = None,
        api: str | None = None,
    ) -> None:
        """Hold ``amount_micro`` of the key's balance, or raise ``InsufficientQuota`` (402).

        ``model``, ``provider``, ``transport`` and ``api`` describe the completion, for the row
        written if its process dies before settling it. One item of :meth:`reserve_many`.
        """
        wanted = Reservation(key_id, completion_id, amount_micro, model, provider, transport, api)
        if not (await self.reserve_many([wanted]))[0]:
            raise wanted.refusal()

    async def reserve_many(self, items: list[Reservation]) -> list[bool]:
        """Reserve a batch in one transaction; per item, whether it was held (False: the
        key's balance did not cover it, nothing was held for it).

        Per key, one conditional ``UPDATE`` takes the sum of its items when the balance covers
        them all; otherwise the items are taken one by one, in order, each while the balance
        still covers it (as separate calls in that order would). Either way no balance goes
        below zero, and a database failure holds nothing (``DatabaseUnavailable``).
        """
        with database_errors("reserving credit for the request"):
            return await self.transactions.run(_reserve_batch, items)

    async def release(self, completion_ids: list[str]) -> int:
        """Give back reservations whose request never started (no ledger row: nothing was
        used); returns how many were still held."""
        with database_errors("giving back a reservation"):
            return await self.transactions.run(_release_batch, completion_ids)

    async def settle(self, row: LedgerRow, *, reserved: bool = True) -> bool:
        """Write the ledger row and settle its reservation, once. True if this call did it.

        ``reserved=False``: a free model, nothing was held. One row of :meth:`settle_many`.
        """
        return row.completion_id in await self.settle_many([(row, reserved)])

    async def settle_many(self, items: list[tuple[LedgerRow, bool]]) -> set[str]:
        """Settle a batch of (row, reserved) in one transaction; returns the ids written now.

        Row by row: a completion id already in the ledger changes nothing (except an
        ``abandoned`` row, which the real one replaces); each new row releases its reservation
        and refunds ``held - charge``. What counts is what this transaction itself inserted,
        replaced and deleted (``RETURNING``, row counts), not what it saw before: two
        settlements of the same rows at once (two processes replaying one outbox file) write
        and charge each row once.
        """
        if not items:
            return set()
        return await self.transactions.run(_settle_batch, items)

    async def credit(
        self,
        key_id: str,
        amount_micro: int,
        *,
        kind: str = "topup",
        payment_id: str | None = None,
        note: str | None = None,
        paid: Credit | None = None,
    ) -> tuple[int, bool]:
        """Add credit; returns (new balance, applied). A known ``payment_id`` applies nothing.

        ``paid`` says what was paid for it (another currency, the rate); None: US dollars.
        """
        if paid is not None and paid.amount_micro != amount_micro:
            raise ValueError("the credit and the payment's value in micro-dollars differ")
        source = usd_credit(amount_micro) if paid is None else paid.columns()
        event = {
            "key_id": key_id,
            "kind": kind,
            "amount_micro": amount_micro,
            "payment_id": payment_id,
            "note": note,
            "created_at": int(time.time()),
            **source,
        }
        return await self.transactions.run(_credit, event)

    async def abandon_stale_reservations(self, older_than_s: float) -> int:
        """Settle reservations left by a process that died mid-completion: one ``abandoned``
        row each, at no cost, and the reservation given back. Returns how many."""
        cutoff = int(time.time() - older_than_s)
        async with self._engine.connect() as conn:
            stale = (
                await conn.execute(
                    sa.select(reservations).where(reservations.c.created_at < cutoff)
                )
            ).all()
        rows = [
            LedgerRow(
                completion_id=r.completion_id,
                key_id=r.key_id,
                model=r.model or "unknown",
                provider=r.provider or "unknown",
                transport=r.transport or "unknown",
                prompt_tokens=0,
                completion_tokens=0,
                usage_estimated=True,
                cost_micro=0,
                charge_micro=0,
                plan=None,
                ttft_ms=None,
                duration_ms=0,
                finish_reason=None,
                status=ABANDONED,
                created_at=int(r.created_at) * 1000,
                api=r.api or "chat",
            )
            for r in stale
        ]
        if rows:
            await self.settle_many([(row, True) for row in rows])
        return len(rows)

    async def rows(
        self,
        *,
        key_id: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        model: str | None = None,
        limit: int = 1000,
    ) -> list[LedgerRow]:
        """Ledger rows, newest first, filtered by key, time (Unix ms) and model."""
        query = sa.select(usage_ledger).order_by(usage_ledger.c.created_at.desc()).limit(limit)
        query = _filtered(query, key_id, since_ms, until_ms, model)
        async with self._engine.connect() as conn:
            result = await conn.execute(query)
            return [LedgerRow(**dict(r._mapping)) for r in result]

    async def totals(
        self,
        *,
        key_id: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        model: str | None = None,
        group_by: tuple[str, ...] = ("key_id", "model", "day"),
    ) -> list[dict[str, Any]]:
        """Sums of requests, tokens, cost and charge grouped by any of :data:`GROUPS`.

        ``day`` is the UTC date (``"2025-01-31"``). Every sum is of stored integers, so the
        groups add up to the total exactly.
        """
        day = usage_ledger.c.created_at // 86_400_000  # integer division on both databases
        columns = {
            "key_id": usage_ledger.c.key_id,
            "model": usage_ledger.c.model,
            "provider": usage_ledger.c.provider,
            "plan": usage_ledger.c.plan,
            "day": day,
        }
        keys = [columns[g].label(g) for g in group_by]
        sums = [sa.func.sum(usage_ledger.c[name]).label(name) for name in SUMMED]
        query = sa.select(*keys, sa.func.count().label("requests"), *sums)
        query = _filtered(query, key_id, since_ms, until_ms, model)
        if keys:
            # NULL (a plan before plans) first on both databases
            query = query.group_by(*keys).order_by(*(sa.nulls_first(k) for k in keys))
        async with self._engine.connect() as conn:
            result = await conn.execute(query)
            out = []
            for r in result:
                item = dict(r._mapping)
                for name in SUMMED:
                    item[name] = int(item[name] or 0)
                if "day" in item:
                    item["day"] = time.strftime("%Y-%m-%d", time.gmtime(int(item["day"]) * 86_400))
                out.append(item)
            return out
