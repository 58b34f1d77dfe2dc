"""Chaos: streams cut at random events and resumed, on both stream backends, billed once.

* ``memory``: one gateway (SQLite); every resume goes back to it.
* ``redis``: two ``tokenwire serve`` processes on Redis + PostgreSQL; a stream starts on a
  random process and every resume goes to a random process, so most resumes read, through
  Redis, a stream the other process is generating.

Each stream is cut by closing the client's socket after a random number of events, then
resumed from the last event seen (sometimes cut again). The reconstructed text must equal the
simulator's, the event numbers must be 1..n with no gap or repeat, the ledger must hold
exactly one row per stream, and the key's balance must equal its grant minus those rows.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from websockets.asyncio.client import connect

from tokenwire.accounting.keys import KeyStore, load_server_secret
from tokenwire.accounting.ledger import Ledger, LedgerRow
from tokenwire.providers.sim import plan
from tokenwire.storage.engine import make_engine
from tokenwire.testing import GatewayServer
from tokenwire.testing_cluster import Cluster
from tokenwire.wire.schema import decode_chat_request

STREAMS = 200
PARALLEL = 20
GRANT_MICRO = 1_000 * 1_000_000
SIM = """
[providers.sim]
kind = "sim"
ttft_ms = 0.0
itl_ms = 2.0

[[models]]
id = "priced-sim"
provider = "sim"
upstream_model = "sim"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "15.00"
"""


def redis_config(prefix: str) -> str:
    return (
        SIM
        + f"""
[server]
stream_backend = "redis"
stream_grace_s = 30.0

[limits]
backend = "redis"
redis_url = "redis://127.0.0.1:6379/0"
redis_prefix = "{prefix}"
"""
    )


@dataclass
class Target:
    """Where streams start and resume, with the key and the database to check."""

    base_urls: list[str]
    key: str
    key_id: str
    database_url: str

    def pick(self, rng: random.Random) -> str:
        return rng.choice(self.base_urls)


@pytest.fixture(scope="module")
def memory_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    with GatewayServer(Path(tmp_path_factory.mktemp("chaos")), overrides=SIM) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def target(request: pytest.FixtureRequest, memory_gateway: GatewayServer) -> Target:
    """One gateway on the in-process backend, or two processes on Redis + PostgreSQL."""
    if request.param == "memory":
        key_id, key = asyncio.run(_memory_key(memory_gateway))
        return Target([memory_gateway.base_url], key, key_id, memory_gateway.settings.database_url)
    cluster: Cluster = request.getfixturevalue("cluster")
    record, key = asyncio.run(cluster.create_key("chaos", grant_micro=GRANT_MICRO))
    gateways = asyncio.run(cluster.start(redis_config(cluster.redis_prefix)))
    return Target([g.base_url for g in gateways], key, record.id, cluster.database_url)


async def _memory_key(gateway: GatewayServer) -> tuple[str, str]:
    engine = make_engine(gateway.settings.database_url)
    try:
        store = KeyStore(engine, load_server_secret(gateway.settings.data_dir, gateway.env))
        record, key = await store.create("chaos", grant_micro=GRANT_MICRO)
        return record.id, key
    finally:
        await engine.dispose()


def chat(content: str, tokens: int) -> dict[str, Any]:
    return {
        "model": "priced-sim",
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": content}],
    }


def expected_text(body: dict[str, Any]) -> str:
    return plan(decode_chat_request(json.dumps(body).encode())).text


# -- SSE ---------------------------------------------------------------------------------------


@dataclass
class Piece:
    """What one connection read: numbered chunks, whether [DONE] came, the stream id."""

    events: list[tuple[int, dict[str, Any]]]
    done: bool
    stream_id: str


async def sse_read(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any] | None,
    cut_after: int | None,
) -> Piece:
    """Read SSE events; after ``cut_after`` of them close the connection (None: read to the end)."""
    events: list[tuple[int, dict[str, Any]]] = []
    async with session.request(method, url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        stream_id = resp.headers["x-stream-id"]
        event_id: int | None = None
        async for raw in resp.content:
            line = raw.rstrip(b"\r\n")
            if line.startswith(b"id: "):
                event_id = int(line[4:])
            elif line == b"data: [DONE]":
                return Piece(events, True, stream_id)
            elif line.startswith(b"data: "):
                assert event_id is not None, line
                events.append((event_id, json.loads(line[6:])))
                event_id = None
                if cut_after is not None and len(events) >= cut_after:
                    resp.close()  # closes the socket: the client is gone
                    return Piece(events, False, stream_id)
    return Piece(events, False, stream_id)


async def sse_chaos(
    session: aiohttp.ClientSession, target: Target, rng: random.Random, n: int
) -> tuple[str, str, str]:
    body = chat(f"chaos sse {n} {rng.random()}", rng.randint(5, 40))
    cuts = [rng.randint(1, 6) for _ in range(rng.choice([1, 2]))]
    auth = {"Authorization": f"Bearer {target.key}"}
    piece = await sse_read(
        session,
        "POST",
        target.pick(rng) + "/v1/chat/completions",
        {**auth, "X-Tokenwire-Resumable": "1"},
        body,
        cuts[0],
    )
    got, done, stream_id = piece.events, piece.done, piece.stream_id
    for cut in [*cuts[1:], None]:
        if done:
            break
        cursor = str(got[-1][0] if got else 0)
        piece = await sse_read(
            session,
            "GET",
            f"{target.pick(rng)}/v1/chat/completions/{stream_id}/stream",
            {**auth, "Last-Event-ID": cursor},
            None,
            cut,
        )
        got += piece.events
        done = piece.done
    assert done, stream_id
    assert [i for i, _ in got] == list(range(1, len(got) + 1)), [i for i, _ in got]
    text = "".join(c["choices"][0]["delta"].get("content", "") for _, c in got if c["choices"])
    return stream_id, text, expected_text(body)


# -- WebSocket ---------------------------------------------------------------------------------


async def ws_chaos(target: Target, rng: random.Random, n: int) -> tuple[str, str, str]:
    body = chat(f"chaos ws {n} {rng.random()}", rng.randint(5, 40))
    cuts = [rng.randint(1, 6) for _ in range(rng.choice([1, 2]))]
    headers = {"Authorization": f"Bearer {target.key}"}
    chunks: list[dict[str, Any]] = []
    last, stream_id = 0, ""
    for attempt, cut in enumerate([*cuts, None]):
        url = "ws" + target.pick(rng).removeprefix("http") + "/v1/ws/chat"
        async with connect(url, additional_headers=headers) as ws:
            if attempt == 0:
                message: dict[str, Any] = {
                    "type": "chat.completion.create",
                    "request_id": "c",
                    "body": body,
                    "resumable": True,
                }
            else:
                message = {
                    "type": "chat.completion.resume",
                    "stream_id": stream_id,
                    "starting_after": last,
                }
            await ws.send(json.dumps(message))
            count = 0
            while cut is None or count < cut:
                reply = json.loads(await ws.recv())
                assert reply["type"] != "error", reply
                if reply["type"] == "chat.completion.done":
                    numbers = [c["sequence_number"] for c in chunks]
                    assert numbers == sorted(set(numbers)), numbers
                    text = "".join(
                        c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
                    )
                    return stream_id, text, expected_text(body)
                chunks.append(reply)
                stream_id, last = reply["id"], reply["sequence_number"]
                count += 1
    raise AssertionError(f"stream {stream_id} never finished")


# -- the test ----------------------------------------------------------------------------------


async def settled_rows(target: Target, count: int) -> list[LedgerRow]:
    """The key's ledger rows, once ``count`` are written (rows are written in batches)."""
    engine = make_engine(target.database_url)
    try:
        ledger = Ledger(engine)
        deadline = time.monotonic() + 20
        rows = await ledger.rows(key_id=target.key_id, limit=100_000)
        while len(rows) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling another process's batched writes
            rows = await ledger.rows(key_id=target.key_id, limit=100_000)
        balance = await ledger.balance(target.key_id)
        assert balance == GRANT_MICRO - sum(r.charge_micro for r in rows), (
            "balance != grant - charges"
        )
        return rows
    finally:
        await engine.dispose()


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_chaos_cut_and_resumed_streams_are_exact_and_billed_once(
    target: Target, transport: str
) -> None:
    """200 streams cut at random events (some twice) and resumed on a random process: exact text, events 1..n, one ledger row each, balance = grant - costs."""
    rng = random.Random(f"{transport}-{len(target.base_urls)}")
    gate = asyncio.Semaphore(PARALLEL)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def one(n: int) -> tuple[str, str, str]:
            async with gate:
                if transport == "sse":
                    return await sse_chaos(session, target, random.Random(rng.random()), n)
                return await ws_chaos(target, random.Random(rng.random()), n)

        results = await asyncio.gather(*(one(n) for n in range(STREAMS)))
    wrong = [(sid, got, want) for sid, got, want in results if got != want]
    assert not wrong, wrong[:3]
    ids = sorted(sid for sid, _, _ in results)
    assert len(set(ids)) == STREAMS
    rows = await settled_rows(target, STREAMS)
    mine = [r for r in rows if r.transport == transport]
    assert sorted(r.completion_id for r in mine) == ids  # one row per stream, none twice
    assert all(r.status == "completed" and r.charge_micro > 0 for r in mine)


# -- two processes, one stream -----------------------------------------------------------------

SLOW = """
[providers.slow]
kind = "sim"
ttft_ms = 0.0
itl_ms = 15.0

[[models]]
id = "slow-sim"
provider = "slow"
upstream_model = "sim"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "15.00"
"""


@pytest.fixture
def pair(cluster: Cluster) -> tuple[Target, Cluster]:
    """Two gateway processes on Redis + PostgreSQL, and a key with credit."""
    record, key = asyncio.run(cluster.create_key("pair", grant_micro=GRANT_MICRO))
    gateways = asyncio.run(cluster.start(redis_config(cluster.redis_prefix) + SLOW))
    return Target([g.base_url for g in gateways], key, record.id, cluster.database_url), cluster


async def test_a_stream_started_on_one_process_is_resumed_live_on_the_other(
    pair: tuple[Target, Cluster],
) -> None:
    """SSE: cut on gw0 after 3 events, resumed on gw1 while gw0 still generates: every event once, exact text, one ledger row; a bad key gets 401 on gw1."""
    target, _ = pair
    gw0, gw1 = target.base_urls
    body = chat("resume me elsewhere", 40) | {"model": "slow-sim"}
    auth = {"Authorization": f"Bearer {target.key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        first = await sse_read(
            session,
            "POST",
            gw0 + "/v1/chat/completions",
            {**auth, "X-Tokenwire-Resumable": "1"},
            body,
            3,
        )
        assert [i for i, _ in first.events] == [1, 2, 3]
        rest = await sse_read(
            session,
            "GET",
            f"{gw1}/v1/chat/completions/{first.stream_id}/stream",
            {**auth, "Last-Event-ID": "3"},
            None,
            None,
        )
        assert rest.done and rest.stream_id == first.stream_id
        events = first.events + rest.events
        assert [i for i, _ in events] == list(range(1, len(events) + 1))
        text = "".join(
            c["choices"][0]["delta"].get("content", "") for _, c in events if c["choices"]
        )
        assert text == expected_text(body)
        assert events[-1][1]["usage"]["completion_tokens"] == 40
        async with session.get(
            f"{gw1}/v1/chat/completions/{first.stream_id}/stream",
            headers={"Authorization": "Bearer tw-not-a-key"},
        ) as resp:
            assert resp.status == 401
    rows = await settled_rows(target, 1)
    assert [r.completion_id for r in rows] == [first.stream_id]


async def test_websocket_resume_on_the_other_process_and_cross_key_404(
    pair: tuple[Target, Cluster],
) -> None:
    """WS: created on gw0, socket closed after 2 chunks, resumed on gw1 (envelope mode): the rest arrives once and done carries the usage; a second key gets 404 for the stream."""
    target, cluster = pair
    gw0, gw1 = target.base_urls
    body = chat("ws elsewhere", 30) | {"model": "slow-sim"}
    headers = {"Authorization": f"Bearer {target.key}"}
    chunks: list[dict[str, Any]] = []
    async with connect(
        "ws" + gw0.removeprefix("http") + "/v1/ws/chat", additional_headers=headers
    ) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "chat.completion.create",
                    "request_id": "a",
                    "body": body,
                    "resumable": True,
                }
            )
        )
        while len(chunks) < 2:
            chunks.append(json.loads(await ws.recv()))
    stream_id, last = chunks[-1]["id"], chunks[-1]["sequence_number"]
    async with connect(
        "ws" + gw1.removeprefix("http") + "/v1/ws/chat", additional_headers=headers
    ) as ws:
        await ws.send(
            json.dumps(
                {"type": "chat.completion.resume", "stream_id": stream_id, "starting_after": last}
            )
        )
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == "chat.completion.done":
                break
            assert message["type"] == "chat.completion.chunk", message
            chunks.append(message)
    numbers = [c["sequence_number"] for c in chunks]
    assert numbers == sorted(set(numbers))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected_text(body)
    assert message["usage"]["completion_tokens"] == 30
    _, other_key = await cluster.create_key("other", grant_micro=GRANT_MICRO)
    async with connect(
        "ws" + gw1.removeprefix("http") + "/v1/ws/chat",
        additional_headers={"Authorization": f"Bearer {other_key}"},
    ) as ws:
        await ws.send(
            json.dumps(
                {"type": "chat.completion.resume", "stream_id": stream_id, "starting_after": 0}
            )
        )
        error = json.loads(await ws.recv())
        assert error["type"] == "error" and error["error"]["status"] == 404, error
    rows = await settled_rows(target, 1)
    assert [r.completion_id for r in rows] == [stream_id]


async def test_idempotency_key_sent_to_two_processes_runs_and_bills_once(
    pair: tuple[Target, Cluster],
) -> None:
    """The openai SDK sends the same Idempotency-Key to gw0, then gw1, then both at once: one generation, one ledger row, one charge; another body gets 409."""
    target, _ = pair
    clients = [
        openai.AsyncOpenAI(base_url=url + "/v1", api_key=target.key, max_retries=0)
        for url in target.base_urls
    ]
    extra = {"Idempotency-Key": "order-7"}
    messages: Any = [{"role": "user", "content": "charge me once, anywhere"}]
    first = await clients[0].chat.completions.create(
        model="priced-sim", messages=messages, max_tokens=20, extra_headers=extra
    )
    second = await clients[1].chat.completions.create(
        model="priced-sim", messages=messages, max_tokens=20, extra_headers=extra
    )
    assert second.id == first.id
    assert second.choices[0].message.content == first.choices[0].message.content
    racing = await asyncio.gather(
        *(
            c.chat.completions.create(
                model="priced-sim",
                messages=[{"role": "user", "content": "racing"}],
                max_tokens=20,
                extra_headers={"Idempotency-Key": "order-8"},
            )
            for c in clients
        ),
        return_exceptions=True,
    )
    ok = [r for r in racing if not isinstance(r, BaseException)]
    busy = [r for r in racing if isinstance(r, openai.APIStatusError)]
    assert len(ok) + len(busy) == 2 and ok, racing
    assert all(r.status_code == 409 for r in busy)  # the other was still being admitted
    assert len({r.id for r in ok}) == 1
    with pytest.raises(openai.APIStatusError) as conflict:
        await clients[1].chat.completions.create(
            model="priced-sim",
            messages=[{"role": "user", "content": "another body"}],
            max_tokens=20,
            extra_headers=extra,
        )
    assert conflict.value.status_code == 409
    assert conflict.value.body["code"] == "idempotency_key_reused"  # type: ignore[index]
    rows = await settled_rows(target, 2)
    assert sorted(r.completion_id for r in rows) == sorted({first.id, ok[0].id})
    for client in clients:
        await client.close()
