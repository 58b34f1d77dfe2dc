"""Billing under random interleavings: one ledger row per completion, and the balance adds up.

Hypothesis draws scenarios of concurrent ``priced-sim`` completions over SSE, WebSocket
(envelope mode) and plain JSON, each with a random ``max_tokens`` and an ending: read to the
end, a WebSocket ``chat.completion.cancel``, or a disconnect (the HTTP stream or the socket
closed early) after a random number of tokens. Operations start when an earlier one has
received a given number of tokens (or ended), and top-ups (some replaying a payment id) are
interleaved the same way. The key's grant is drawn too, so some requests are refused (402).

After everything settles (no live generation, no open reservation), for SQLite and PostgreSQL:

* the ledger has exactly one row per started completion, matched by completion id (from
  ``X-Stream-Id``, the chunks' ids, the WebSocket ``done``/chunks or the JSON body): no row
  lost, none duplicated, none for a refused request;
* each row costs exactly ``3 * prompt + 15 * completion`` micro-dollars and bills at least the
  tokens the client saw, at most ``max_tokens``;
* balance == grant + applied top-ups - sum(ledger cost), exactly, and it never went below zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from tests.accounting.conftest import Accounts, accounts, wait_for
from websockets.asyncio.client import ClientConnection, connect

from tokenwire.accounting.budget import estimate_prompt_tokens, prompt_token_bound
from tokenwire.accounting.ledger import LedgerRow
from tokenwire.config import DEFAULT_CONTEXT_TOKENS as CONTEXT
from tokenwire.providers.sim import plan
from tokenwire.testing import GatewayServer
from tokenwire.wire.schema import decode_chat_request

OVERRIDES = """
[providers.sim]
kind = "sim"
ttft_ms = 0.0
itl_ms = 1.0

[providers.paced]
kind = "sim"
ttft_ms = 2.0
itl_ms = 3.0

[[models]]
id = "priced-sim"
provider = "paced"
upstream_model = "sim"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "15.00"
"""
INPUT_MICRO_PER_TOKEN = 3
OUTPUT_MICRO_PER_TOKEN = 15
POSTGRES_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
OP_DEADLINE_S = 5.0  # an op that has not ended by then is reported as stuck
SETTLE_DEADLINE_S = 5.0

Transport = Literal["sse", "ws", "json"]
Action = Literal["finish", "cancel", "disconnect"]


@dataclass(frozen=True)
class Op:
    """One completion: how it is sent, how long it may be, how it ends, when it starts."""

    transport: Transport
    max_tokens: int
    action: Action
    cut_after: int  # tokens received before the cancel or disconnect
    start_after: tuple[int, int] | None  # (earlier op, tokens it has received) or None: at once


@dataclass(frozen=True)
class TopUp:
    after: tuple[int, int]
    amount: int
    payment: str  # shared by some top-ups: a replayed payment applies once


@dataclass(frozen=True)
class Scenario:
    ops: tuple[Op, ...]
    topups: tuple[TopUp, ...]
    grant_fraction: float  # of the sum of every op's worst case


def body_for(index: int, op: Op) -> dict[str, Any]:
    return {
        "model": "priced-sim",
        "messages": [{"role": "user", "content": f"property scenario message number {index}"}],
        "max_tokens": op.max_tokens,
    }


def prompt_sizes(body: dict[str, Any]) -> tuple[int, int]:
    """(the gateway's estimate, the simulator's count) of the prompt."""
    request = decode_chat_request(json.dumps(body).encode())
    return estimate_prompt_tokens(request), plan(request).prompt_tokens


def worst_case(body: dict[str, Any]) -> int:
    """What admission reserves: the prompt's bound and max_tokens at full price."""
    bound = prompt_token_bound(decode_chat_request(json.dumps(body).encode()), CONTEXT)
    return bound * INPUT_MICRO_PER_TOKEN + body["max_tokens"] * OUTPUT_MICRO_PER_TOKEN


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    count = draw(st.integers(min_value=1, max_value=6))
    ops: list[Op] = []
    for i in range(count):
        transport: Transport = draw(st.sampled_from(["sse", "ws", "json"]))
        actions: list[Action] = {
            "sse": ["finish", "disconnect"],
            "ws": ["finish", "cancel", "disconnect"],
            "json": ["finish"],
        }[transport]  # type: ignore[assignment]
        action = draw(st.sampled_from(actions))
        max_tokens = draw(st.integers(min_value=1, max_value=30))
        cut_after = draw(st.integers(min_value=0, max_value=max_tokens))
        start_after = None
        if i > 0 and draw(st.booleans()):
            start_after = (draw(st.integers(0, i - 1)), draw(st.integers(0, 12)))
        ops.append(Op(transport, max_tokens, action, cut_after, start_after))
    topups = draw(
        st.lists(
            st.builds(
                TopUp,
                after=st.tuples(st.integers(0, count - 1), st.integers(0, 12)),
                amount=st.integers(1, 2_000),
                payment=st.sampled_from(["pay-a", "pay-b", "pay-c"]),
            ),
            max_size=3,
        )
    )
    grant_fraction = draw(st.sampled_from([0.0, 0.5, 0.8, 1.0, 1.0, 2.0, 2.0]))
    return Scenario(tuple(ops), tuple(topups), grant_fraction)


# -- one gateway per database --------------------------------------------------------------------


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    """An in-process gateway on a fresh SQLite file or PostgreSQL database."""
    data_dir: Path = tmp_path_factory.mktemp("billing")
    if request.param == "sqlite":
        with GatewayServer(data_dir, overrides=OVERRIDES) as server:
            yield server
        return
    name = "tw_prop_" + secrets.token_hex(6)
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
        with GatewayServer(data_dir, overrides=OVERRIDES, database_url=url) as server:
            yield server
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- running a scenario --------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the client saw of one op."""

    refused: int | None = None  # the HTTP status (or WS error status) of a refusal
    stuck: bool = False  # no end (done, error, [DONE], JSON body) within OP_DEADLINE_S
    completion_id: str | None = None
    tokens_seen: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)


class Progress:
    """Tokens received per op, and which ops ended; ops wait on each other through it."""

    def __init__(self, count: int) -> None:
        self.tokens = [0] * count
        self.ended = [False] * count
        self._changed = asyncio.Condition()

    async def saw(self, index: int, tokens: int) -> None:
        async with self._changed:
            self.tokens[index] = tokens
            self._changed.notify_all()

    async def end(self, index: int) -> None:
        async with self._changed:
            self.ended[index] = True
            self._changed.notify_all()

    async def reached(self, index: int, tokens: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.tokens[index] >= tokens or self.ended[index])


def words(text: str) -> int:
    """Simulator tokens in a piece of text (each token is one word)."""
    return len(text.split())


def chunk_text(chunk: dict[str, Any]) -> str:
    if not chunk.get("choices"):
        return ""
    return chunk["choices"][0]["delta"].get("content") or ""


async def run_sse(
    session: aiohttp.ClientSession,
    gw: GatewayServer,
    key: str,
    index: int,
    op: Op,
    progress: Progress,
) -> Outcome:
    outcome = Outcome()
    body = {**body_for(index, op), "stream": True}
    async with session.post(
        gw.base_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        if resp.status != 200:
            outcome.refused = resp.status
            outcome.errors.append((await resp.json(content_type=None))["error"])
            return outcome
        outcome.completion_id = resp.headers["x-stream-id"]
        text = ""
        if op.action == "disconnect" and op.cut_after == 0:
            resp.close()
            return outcome
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                break
            chunk = json.loads(line[len(b"data: ") :])
            if "error" in chunk:
                outcome.errors.append(chunk["error"])
                continue
            assert chunk["id"] == outcome.completion_id, chunk
            text += chunk_text(chunk)
            outcome.tokens_seen = words(text)
            await progress.saw(index, outcome.tokens_seen)
            if op.action == "disconnect" and outcome.tokens_seen >= op.cut_after:
                resp.close()
                break
    return outcome


async def run_json(
    session: aiohttp.ClientSession,
    gw: GatewayServer,
    key: str,
    index: int,
    op: Op,
    progress: Progress,
) -> Outcome:
    outcome = Outcome()
    async with session.post(
        gw.base_url + "/v1/chat/completions",
        json=body_for(index, op),
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        payload = await resp.json(content_type=None)
        if resp.status != 200:
            outcome.refused = resp.status
            outcome.errors.append(payload["error"])
            return outcome
    outcome.completion_id = payload["id"]
    outcome.tokens_seen = words(payload["choices"][0]["message"]["content"] or "")
    await progress.saw(index, outcome.tokens_seen)
    return outcome


async def run_ws(gw: GatewayServer, key: str, index: int, op: Op, progress: Progress) -> Outcome:
    outcome = Outcome()
    url = "ws" + gw.base_url.removeprefix("http") + "/v1/ws/chat"
    request_id = f"op{index}"
    ws: ClientConnection
    async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "chat.completion.create",
                    "request_id": request_id,
                    "body": body_for(index, op),
                }
            )
        )
        cancel_sent = False
        if op.action == "cancel" and op.cut_after == 0:
            await ws.send(json.dumps({"type": "chat.completion.cancel", "request_id": request_id}))
            cancel_sent = True
        text = ""
        while True:
            message = json.loads(await ws.recv())
            kind = message.get("type")
            if kind == "error":
                if message["error"].get("code") == "unknown_request_id" and cancel_sent:
                    continue  # the cancel came after the end; the done was already read
                outcome.errors.append(message["error"])
                if outcome.completion_id is None:
                    outcome.refused = message["error"]["status"]
                return outcome
            if kind == "chat.completion.done":
                assert outcome.completion_id in (None, message["stream_id"]), message
                outcome.completion_id = message["stream_id"]
                return outcome
            assert kind == "chat.completion.chunk", message
            assert outcome.completion_id in (None, message["id"]), message
            outcome.completion_id = message["id"]
            text += chunk_text(message)
            outcome.tokens_seen = words(text)
            await progress.saw(index, outcome.tokens_seen)
            if outcome.tokens_seen >= op.cut_after:
                if op.action == "disconnect":
                    return outcome  # leaving the block closes the socket
                if op.action == "cancel" and not cancel_sent:
                    await ws.send(
                        json.dumps({"type": "chat.completion.cancel", "request_id": request_id})
                    )
                    cancel_sent = True


async def run_scenario(gw: GatewayServer, scenario: Scenario) -> None:
    async with accounts(gw) as acc:
        await check_scenario(gw, acc, scenario)


async def check_scenario(gw: GatewayServer, acc: Accounts, scenario: Scenario) -> None:
    ops = scenario.ops
    bodies = [body_for(i, op) for i, op in enumerate(ops)]
    for body in bodies:
        estimate, actual = prompt_sizes(body)
        assert actual <= estimate  # no completion may cost more than its reservation
    grant = int(sum(worst_case(b) for b in bodies) * scenario.grant_fraction)
    record, key = await acc.keys.create("property", grant_micro=grant)
    payment_prefix = f"{record.id}-"
    progress = Progress(len(ops))
    lowest = grant
    watching = True
    applied_topups = 0

    async def watch_balance() -> None:
        nonlocal lowest
        while watching:
            lowest = min(lowest, await acc.ledger.balance(record.id))
            await asyncio.sleep(0.002)

    async def run_op(session: aiohttp.ClientSession, index: int, op: Op) -> Outcome:
        try:
            if op.start_after is not None:
                await progress.reached(*op.start_after)
            try:
                async with asyncio.timeout(OP_DEADLINE_S):
                    if op.transport == "sse":
                        return await run_sse(session, gw, key, index, op, progress)
                    if op.transport == "json":
                        return await run_json(session, gw, key, index, op, progress)
                    return await run_ws(gw, key, index, op, progress)
            except TimeoutError:
                return Outcome(stuck=True)
        finally:
            await progress.end(index)

    async def run_topup(topup: TopUp) -> None:
        nonlocal applied_topups
        await progress.reached(*topup.after)
        _, applied = await acc.ledger.credit(
            record.id, topup.amount, payment_id=payment_prefix + topup.payment
        )
        if applied:
            applied_topups += topup.amount

    live_before = set(gw.state.completions.live)
    watcher = asyncio.create_task(watch_balance())
    try:
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(run_op(session, i, op) for i, op in enumerate(ops)),
                *(run_topup(t) for t in scenario.topups),
            )
    finally:
        watching = False
        await watcher
    outcomes: list[Outcome] = results[: len(ops)]  # type: ignore[assignment]
    stuck = [(i, ops[i]) for i, o in enumerate(outcomes) if o.stuck]
    if stuck:
        hanging = [
            (g.id, g.state.value, g.cancel_cause, repr(g._task))
            for cid, g in list(gw.state.completions.live.items())
            if cid not in live_before
        ]
        pytest.fail(
            f"ops that never ended within {OP_DEADLINE_S} s: {stuck}; "
            f"this scenario's generations still live: {hanging}"
        )

    for op, outcome in zip(ops, outcomes, strict=True):
        if outcome.refused is not None:
            assert outcome.refused == 402, (op, outcome)
            assert [e["code"] for e in outcome.errors] == ["insufficient_quota"], outcome
        else:
            assert outcome.errors == [], (op, outcome)
            assert outcome.completion_id is not None and outcome.completion_id.startswith(
                "chatcmpl-"
            )
    event(f"refused: {sum(o.refused is not None for o in outcomes)} of {len(ops)}")
    started = {o.completion_id: (i, o) for i, o in enumerate(outcomes) if o.refused is None}
    assert len(started) == sum(o.refused is None for o in outcomes), "two ops share a completion id"

    async def settled() -> bool:
        live = gw.state.completions.live
        if any(cid in live for cid in started) or await acc.open_reservations(record.id):
            return False
        return len(await acc.ledger.rows(key_id=record.id)) >= len(started)

    await wait_for(settled, SETTLE_DEADLINE_S)

    assert await acc.open_reservations(record.id) == 0, "a reservation was never settled"
    rows: list[LedgerRow] = await acc.ledger.rows(key_id=record.id)
    by_id = {r.completion_id: r for r in rows}
    assert len(by_id) == len(rows)
    assert set(by_id) == set(started), (
        f"ledger rows without a completion: {set(by_id) - set(started)}; "
        f"completions without a row: {set(started) - set(by_id)}"
    )
    for completion_id, (index, outcome) in started.items():
        row = by_id[completion_id]
        op = ops[index]
        estimate, sim_prompt = prompt_sizes(bodies[index])
        assert row.model == "priced-sim" and row.transport == op.transport
        assert (
            row.charge_micro
            == row.prompt_tokens * INPUT_MICRO_PER_TOKEN
            + row.completion_tokens * OUTPUT_MICRO_PER_TOKEN
        ), row
        assert outcome.tokens_seen <= row.completion_tokens <= op.max_tokens, (op, outcome, row)
        if op.action == "finish":
            assert row.status == "completed", (op, row)
        elif op.action == "cancel":
            assert row.status in {"cancelled", "completed"}, (op, row)
        else:
            assert row.status in {"client_disconnected", "completed"}, (op, row)
        event(f"{op.transport} {op.action} -> {row.status}")
        if row.status == "completed":
            assert (row.prompt_tokens, row.completion_tokens, row.usage_estimated) == (
                sim_prompt,
                op.max_tokens,
                False,
            ), row
            assert row.finish_reason == "length"
        else:
            assert row.finish_reason == "cancelled"
            assert row.prompt_tokens == estimate

    balance = await acc.ledger.balance(record.id)
    billed = sum(r.charge_micro for r in rows)
    assert await acc.credits(record.id) == grant + applied_topups
    assert balance == grant + applied_topups - billed, (balance, grant, applied_topups, billed)
    assert balance >= 0
    assert lowest >= 0, f"the balance went down to {lowest}"


@given(scenario=scenarios())
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # no shrinking: a failing example waits out OP_DEADLINE_S, so shrinking would take minutes
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
def test_every_completion_billed_once_and_balance_adds_up(
    gateway: GatewayServer, scenario: Scenario
) -> None:
    """Random interleavings of completions, cancels, disconnects and top-ups: one ledger row per completion, exact balance, never negative."""
    asyncio.run(run_scenario(gateway, scenario))


async def test_cancel_right_behind_create_settles(gateway: GatewayServer) -> None:
    """WS cancels sent right behind their creates still end each request with done and settle it: one ledger row each, no reservation left."""
    async with accounts(gateway) as acc:
        record, key = await acc.keys.create("cancel-at-once", grant_micro=10_000_000)
        url = "ws" + gateway.base_url.removeprefix("http") + "/v1/ws/chat"
        body = body_for(0, Op("ws", 8, "cancel", 0, None))
        request_ids = [f"c{i}" for i in range(10)]
        ends: dict[str, str] = {}
        async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            for request_id in request_ids:
                create = {"type": "chat.completion.create", "request_id": request_id, "body": body}
                await ws.send(json.dumps(create))
                await ws.send(
                    json.dumps({"type": "chat.completion.cancel", "request_id": request_id})
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OP_DEADLINE_S):
                    while len(ends) < len(request_ids):
                        message = json.loads(await ws.recv())
                        if message["type"] == "chat.completion.done":
                            ends[message["request_id"]] = message["finish_reason"]
                        else:
                            assert message["type"] == "chat.completion.chunk", message
        never = [r for r in request_ids if r not in ends]
        assert not never, f"requests that never ended: {never}; ended: {ends}"

        async def no_reservation() -> bool:
            return await acc.open_reservations(record.id) == 0

        await wait_for(no_reservation, SETTLE_DEADLINE_S)
        assert await acc.open_reservations(record.id) == 0
        rows = await acc.ledger.rows(key_id=record.id)
        assert len(rows) == len(request_ids)
        assert await acc.ledger.balance(record.id) == 10_000_000 - sum(r.charge_micro for r in rows)
