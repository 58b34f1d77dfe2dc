"""PostgreSQL failing under load: every completion still gets exactly one ledger row.

A gateway on a private PostgreSQL serves 40 concurrent priced streams while the database
fails in the ways real ones do: the ledger table refusing writes for seconds, every
connection terminated, the server stopped and started. Clients keep streaming throughout
(answers already admitted finish in full; new ones during a full outage get a clear 503),
and once the database is back, with no restart of the gateway:

* every completion a client saw has exactly one ledger row, with its exact charge; no other row;
* no reservation is left open, nothing waits in the outbox or in memory;
* the key's balance is exactly its grant minus the sum of the rows' charges.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from tokenwire.providers.sim import plan
from tokenwire.storage.tables import reservations
from tokenwire.testing import FAST_SIM, GatewayServer, paced_sim, priced_model, read_sse_answer
from tokenwire.testing_services import PrivateDatabase
from tokenwire.wire.schema import decode_chat_request

CATALOG = FAST_SIM + paced_sim() + priced_model(provider="paced")
CONCURRENCY = 40
TOKENS = 20
GRANT_MICRO = 100_000_000


@dataclass
class Outcomes:
    """What the clients saw."""

    served: dict[str, str] = field(default_factory=dict)  # stream id -> its full text
    refused: list[tuple[int, str]] = field(default_factory=list)  # (status, code)
    broken: list[str] = field(default_factory=list)  # anything else: must stay empty


def body(i: int) -> dict[str, Any]:
    return {
        "model": "priced-sim",
        "stream": True,
        "max_tokens": TOKENS,
        "messages": [{"role": "user", "content": f"fault load request {i}"}],
    }


def expected_text(i: int) -> str:
    return plan(decode_chat_request(json.dumps(body(i)).encode())).text


async def one_stream(
    http: aiohttp.ClientSession, gateway: GatewayServer, i: int, out: Outcomes
) -> None:
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    try:
        async with http.post(
            f"{gateway.base_url}/v1/chat/completions", json=body(i), headers=headers
        ) as response:
            if response.status != 200:
                error = (await response.json())["error"]
                out.refused.append((response.status, error["code"]))
                return
            answer = await read_sse_answer(response.content)
            stream_id = response.headers["x-stream-id"]
            if answer.errors or not answer.done or answer.text != expected_text(i):
                out.broken.append(f"{stream_id}: {answer}")
            out.served[stream_id] = answer.text
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.broken.append(repr(exc))


async def load_during(gateway: GatewayServer, fault: Callable[[], None]) -> Outcomes:
    """CONCURRENCY clients stream one request after another while ``fault`` runs (in a
    thread), then a little longer; returns what they saw."""
    out = Outcomes()
    finished = threading.Event()
    counter = iter(range(1_000_000))

    async def client(http: aiohttp.ClientSession) -> None:
        while not finished.is_set():
            await one_stream(http, gateway, next(counter), out)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        clients = [asyncio.ensure_future(client(http)) for _ in range(CONCURRENCY)]
        try:
            await asyncio.to_thread(fault)
            after = len(out.served)
            async with asyncio.timeout(30):  # the gateway serves again without a restart
                while len(out.served) < after + CONCURRENCY:  # noqa: ASYNC110 - a count of answers
                    await asyncio.sleep(0.01)
        finally:
            finished.set()
            await asyncio.gather(*clients)
    return out


async def on_server(gateway: GatewayServer, coro: Any) -> Any:
    future = asyncio.run_coroutine_threadsafe(coro, gateway.loop_of_server())
    return await asyncio.wrap_future(future)


async def books_settle(gateway: GatewayServer) -> None:
    """Wait until every generation settled, the outbox and memory are empty, no reservation."""
    state = gateway.state
    writer = state.completions.writer

    async def open_reservations() -> int:
        async with state.engine.connect() as conn:
            count = await conn.scalar(sa.select(sa.func.count()).select_from(reservations))
            return int(count or 0)

    async with asyncio.timeout(60):
        while True:
            idle = not state.completions.live and writer.held == 0 and writer.queued == 0
            outbox = state.settings.data_dir / "ledger-outbox"
            spilled = list(outbox.glob("*.jsonl")) if outbox.is_dir() else []
            if idle and not spilled and await on_server(gateway, open_reservations()) == 0:
                return
            await asyncio.sleep(0.05)


async def check_books(gateway: GatewayServer, out: Outcomes) -> None:
    """One row per served completion at its exact charge; the balance adds up to the micro-dollar."""
    assert out.broken == []
    assert out.served, "no completion was served"
    await books_settle(gateway)
    rows = await on_server(
        gateway, gateway.state.ledger.rows(key_id=gateway.api_key_id, limit=100_000)
    )
    by_id = {row.completion_id: row for row in rows}
    assert len(by_id) == len(rows)  # no completion twice
    assert set(by_id) == set(out.served)  # one row per answer, none for a refusal
    for row in rows:
        assert row.status == "completed" and row.completion_tokens == TOKENS
        assert row.charge_micro == 3 * row.prompt_tokens + 15 * TOKENS
    balance = await on_server(gateway, gateway.state.ledger.balance(gateway.api_key_id))
    assert balance == GRANT_MICRO - sum(row.charge_micro for row in rows)


@pytest.fixture
def gateway(tmp_path: Path, private_postgres_database: PrivateDatabase) -> Iterator[GatewayServer]:
    with GatewayServer(
        tmp_path,
        overrides=CATALOG,
        database_url=private_postgres_database.url,
        grant_usd=GRANT_MICRO // 1_000_000,
    ) as server:
        yield server


async def test_an_unwritable_ledger_table_loses_no_row(
    gateway: GatewayServer, private_postgres_database: PrivateDatabase
) -> None:
    """usage_ledger refuses every write for 3 s under 40 streams: the rows wait in the outbox
    and are all written, once, when it takes writes again."""

    def fault() -> None:
        with private_postgres_database.unwritable("usage_ledger"):
            threading.Event().wait(3.0)

    out = await load_during(gateway, fault)
    writer = gateway.state.completions.writer
    assert writer.write_failures > 0  # the fault really hit the ledger
    await check_books(gateway, out)


async def test_terminated_connections_lose_no_row(
    gateway: GatewayServer, private_postgres_database: PrivateDatabase
) -> None:
    """Every database connection killed three times under load: nothing lost or doubled."""

    def fault() -> None:
        for _ in range(3):
            threading.Event().wait(0.5)
            private_postgres_database.terminate_connections()

    out = await load_during(gateway, fault)
    await check_books(gateway, out)


async def test_a_stopped_database_refuses_new_work_clearly_and_loses_no_row(
    gateway: GatewayServer, private_postgres_database: PrivateDatabase
) -> None:
    """PostgreSQL stopped for 3 s: answers already admitted finish, new requests get a clear
    503 database_unavailable within the timeouts, and after the restart every served
    completion has its one row."""
    server = private_postgres_database.server

    def fault() -> None:
        threading.Event().wait(0.5)
        server.stop("fast")
        try:
            threading.Event().wait(3.0)
        finally:
            server.start()

    out = await load_during(gateway, fault)
    assert out.refused, "no request met the outage"
    assert {status for status, _ in out.refused} == {503}
    assert {code for _, code in out.refused} == {"database_unavailable"}
    await check_books(gateway, out)
