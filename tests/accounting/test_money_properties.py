"""Money under any interleaving, any reported usage and database faults (a Hypothesis state
machine over the CompletionService, the ledger writer and its outbox, on SQLite).

Rules start priced completions of random prompt size and ``max_tokens`` on one key, whose
plan charges three times what the model costs (cache prices included); finish them with any
number of deltas and *any* usage the upstream reports (far above what was reserved, too,
with any part of the prompt written to or read from a prompt cache), fail them, cancel them,
top the key up, and take the database's ledger writes down and up again. After every step,
once settlement is idle:

* the balance is never below zero;
* ``balance == grant + top-ups - sum(ledger charge) - sum(open reservations)``, exactly;
* every row's cost is what its usage costs at the model's prices (0 if it failed before its
  first token), and its charge at most what the usage comes to at the plan's;
* no completion has two rows; and at the end, with the database back, every completion that
  was admitted has exactly one row and no reservation is left.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from hypothesis import settings, stateful
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenwire.accounting.keys import KeyRecord, KeyStore
from tokenwire.accounting.ledger import Ledger, LedgerRow
from tokenwire.accounting.outbox import LedgerOutbox
from tokenwire.accounting.plans import PlanBook
from tokenwire.accounting.pricing import amount_micro
from tokenwire.accounting.writer import LedgerWriter
from tokenwire.completions import CompletionService
from tokenwire.config import load_settings
from tokenwire.errors import InsufficientQuota, UpstreamError
from tokenwire.limits.memory import MemoryRateLimiter
from tokenwire.providers.base import ProviderCall
from tokenwire.providers.registry import ProviderRegistry
from tokenwire.storage.engine import make_engine, migrate
from tokenwire.storage.tables import credit_events, reservations, usage_ledger
from tokenwire.streams.events import Event, Finish, PromptUsage, TextDelta, Usage
from tokenwire.streams.generation import Generation
from tokenwire.testing_fuzz import fuzz_settings
from tokenwire.wire.schema import chat_request_from

CATALOG = """
[providers.scripted]
kind = "sim"

[[models]]
id = "priced"
provider = "scripted"
input_usd_per_mtok = "1.00"
output_usd_per_mtok = "5.00"
cache_write_usd_per_mtok = "1.25"
cache_read_usd_per_mtok = "0.10"
max_output_tokens = 200
context_tokens = 5000

[accounting]
default_plan = "triple"

[plans.triple.models.priced]
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "15.00"
cache_write_usd_per_mtok = "3.75"
cache_read_usd_per_mtok = "0.30"
"""
GRANT = 20_000


class Script:
    """What one completion's upstream will do, decided by the state machine."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.deltas = 0
        self.early_prompt: PromptUsage | None = None
        self.usage: Usage | None = None
        self.fail = False


class ScriptedProvider:
    """An upstream that waits for its script, then streams deltas and reports any usage."""

    name = "scripted"

    def __init__(self) -> None:
        self.scripts: list[Script] = []

    def stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        script = Script()
        self.scripts.append(script)
        return self._stream(script)

    async def _stream(self, script: Script) -> AsyncIterator[Event]:
        await script.go.wait()
        if script.early_prompt is not None:
            yield script.early_prompt
        for i in range(script.deltas):
            yield TextDelta(f"t{i} ")
        if script.fail:
            raise UpstreamError("the upstream failed mid-answer")
        if script.usage is not None:
            yield script.usage
        yield Finish("stop")

    async def aclose(self) -> None:
        return None


class FlakyLedger(Ledger):
    """The ledger, whose batch writes fail while ``down``."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.down = False

    async def settle_many(self, items: list[tuple[LedgerRow, bool]]) -> set[str]:
        if self.down:
            raise OSError("the database refuses writes")
        return await super().settle_many(items)


class Money(stateful.RuleBasedStateMachine):
    """One key, priced completions, any usage, top-ups and database faults."""

    started = stateful.Bundle("started")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="tw-money-"))
        self.topups = 0
        self.admitted: list[Generation] = []
        self.provider = ScriptedProvider()
        self.run(self._setup())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _setup(self) -> None:
        self.engine = make_engine(f"sqlite+aiosqlite:///{self.dir / 'db.sqlite'}")
        await migrate(self.engine)
        self.key: KeyRecord
        self.key, _ = await KeyStore(self.engine, b"s").create("money", grant_micro=GRANT)
        self.ledger = FlakyLedger(self.engine)
        self.writer = LedgerWriter(
            self.ledger, LedgerOutbox(self.dir / "outbox"), retry_delays_s=(0.0,)
        )
        settings = load_settings(data_dir=self.dir, env={}, overrides=CATALOG)
        registry = ProviderRegistry(settings, {})
        registry.add("scripted", self.provider)
        self.plans = PlanBook.from_settings(settings)
        self.entry = settings.models["priced"]
        self.service = CompletionService(
            registry,
            limiter=MemoryRateLimiter(),
            ledger=self.ledger,
            disconnect_grace_s=0.0,
            default_max_tokens=100,
            writer=self.writer,
            plans=self.plans,
        )

    # -- rules ---------------------------------------------------------------------------

    @stateful.rule(
        target=started,
        prompt=st.integers(1, 3000),
        max_tokens=st.none() | st.integers(1, 200),
    )
    def start(self, prompt: int, max_tokens: int | None) -> int:
        body: dict[str, Any] = {
            "model": "priced",
            "messages": [{"role": "user", "content": "w " * prompt}],
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        request = chat_request_from(json.loads(json.dumps(body)))

        async def start() -> Generation | None:
            try:
                source = await self.service.start(self.key, request, body, "sse")
            except InsufficientQuota:
                return None
            assert isinstance(source, Generation)
            return source

        generation = self.run(start())
        if generation is None:
            return -1
        self.admitted.append(generation)
        return len(self.admitted) - 1

    @stateful.rule(
        index=started,
        deltas=st.integers(0, 400),
        prompt=st.integers(0, 10**7),
        completion=st.integers(0, 10**7),
        early=st.booleans(),
        cached=st.tuples(st.integers(0, 10**7), st.integers(0, 10**7)),
    )
    def finish(
        self,
        index: int,
        deltas: int,
        prompt: int,
        completion: int,
        early: bool,
        cached: tuple[int, int] = (0, 0),
    ) -> None:
        """The upstream streams ``deltas`` and reports any usage at all (huge ones too, and
        cache counts that need not fit in the prompt)."""
        script = self._script(index)
        if script is None:
            return
        written, read = cached
        script.deltas = deltas
        script.early_prompt = PromptUsage(prompt, written, read) if early else None
        script.usage = Usage(prompt, completion, False, written, read)
        script.go.set()
        self._settle(index)

    @stateful.rule(index=started, deltas=st.integers(0, 50))
    def fail(self, index: int, deltas: int) -> None:
        script = self._script(index)
        if script is None:
            return
        script.deltas, script.fail = deltas, True
        script.go.set()
        self._settle(index)

    @stateful.rule(index=started)
    def cancel(self, index: int) -> None:
        if index >= 0:
            self.admitted[index].cancel("client_cancelled")
            self._settle(index)

    @stateful.rule(amount=st.integers(1, 5_000))
    def top_up(self, amount: int) -> None:
        self.run(self.ledger.credit(self.key.id, amount))
        self.topups += amount

    @stateful.rule()
    def database_down(self) -> None:
        self.ledger.down = True

    @stateful.rule()
    def database_up(self) -> None:
        self.ledger.down = False
        self.run(self.writer.replay())

    # -- checks --------------------------------------------------------------------------

    def _script(self, index: int) -> Script | None:
        if index < 0 or self.admitted[index].finished:
            return None
        return self.provider.scripts[index]

    def _settle(self, index: int | None = None) -> None:
        """Wait for completion ``index`` (if any) to end and settle; then settlement is idle
        (every ended generation settled: its row committed, spilled or held)."""

        async def quiet() -> None:
            async with asyncio.timeout(10):
                if index is not None and index >= 0:
                    await self.admitted[index].wait_settled()
                await asyncio.gather(*(g.wait_settled() for g in self.admitted if g.finished))

        self.run(quiet())

    async def _books(self) -> tuple[int, int, int, list[str]]:
        """The balance, the sum of charges, what is held, and the ledger's completion ids."""
        async with self.engine.connect() as conn:
            balance = await self.ledger.balance(self.key.id)
            charged = await conn.scalar(
                sa.select(sa.func.coalesce(sa.func.sum(usage_ledger.c.charge_micro), 0))
            )
            held = await conn.scalar(
                sa.select(sa.func.coalesce(sa.func.sum(reservations.c.amount_micro), 0))
            )
            ids = list((await conn.scalars(sa.select(usage_ledger.c.completion_id))).all())
        return balance, int(charged or 0), int(held or 0), ids

    @stateful.invariant()
    def the_books_balance(self) -> None:
        self._settle()
        balance, charged, held, ids = self.run(self._books())
        assert balance >= 0
        assert balance == GRANT + self.topups - charged - held
        assert len(ids) == len(set(ids))
        price = self.plans.plan(None).price(self.entry)
        for row in self.run(self.ledger.rows(limit=10_000)):
            assert row.cost_micro in (0, amount_micro(self.entry.cost, _usage_of(row)))
            assert 0 <= row.charge_micro <= amount_micro(price, _usage_of(row))
            assert row.plan == "triple"

    def teardown(self) -> None:
        try:
            self.ledger.down = False
            for index, generation in enumerate(self.admitted):
                if not generation.finished:
                    self.provider.scripts[index].go.set()

            async def finish_all() -> None:
                async with asyncio.timeout(20):
                    await asyncio.gather(*(g.wait_settled() for g in self.admitted))
                assert await self.writer.replay()

            self.run(finish_all())
            balance, charged, held, ids = self.run(self._books())
            assert held == 0
            assert sorted(ids) == sorted(g.id for g in self.admitted)
            assert balance == GRANT + self.topups - charged >= 0
            self.run(self._credits_match())
        finally:
            self.run(self.writer.aclose())
            self.run(self.engine.dispose())
            self.loop.close()

    async def _credits_match(self) -> None:
        async with self.engine.connect() as conn:
            credited = await conn.scalar(sa.select(sa.func.sum(credit_events.c.amount_micro)))
        assert int(credited or 0) == GRANT + self.topups


def _usage_of(row: LedgerRow) -> Usage:
    return Usage(
        row.prompt_tokens,
        row.completion_tokens,
        row.usage_estimated,
        row.cache_write_tokens,
        row.cache_read_tokens,
    )


Money.TestCase.settings = settings(fuzz_settings(25), stateful_step_count=30)
TestMoney = Money.TestCase
TestMoney.__doc__ = "Money under any interleaving: never below zero, balances exact, one row each."


def test_a_charge_never_exceeds_its_reservation_even_for_absurd_usage() -> None:
    """An upstream reporting 10 million tokens for a small request is charged at most what
    was reserved: the key ends at zero at worst, never below."""
    machine = Money()
    try:
        index = machine.start(prompt=10, max_tokens=10)
        assert index == 0
        reserved = machine.run(machine._books())[2]
        machine.finish(index, deltas=5, prompt=10**7, completion=10**7, early=False)
        balance, charged, held, _ = machine.run(machine._books())
        assert held == 0 and charged == reserved and balance == GRANT - reserved
    finally:
        machine.teardown()


def test_an_early_prompt_count_stops_the_answer_within_the_reservation() -> None:
    """A prompt reported (before the answer) far above the bound leaves room for fewer
    completion tokens: the stream stops there with ``length``."""
    machine = Money()
    try:
        index = machine.start(prompt=10, max_tokens=100)
        generation = machine.admitted[index]
        machine.finish(index, deltas=100, prompt=400, completion=100, early=True)
        assert generation.finish_reason == "length"
        assert generation.usage is not None and generation.usage.completion_tokens < 100
    finally:
        machine.teardown()
