"""Graceful drain, in process: what every kind of client sees between "drain" and the exit.

The gateway runs in a thread under ``tokenwire serve``'s own server class (DrainingServer);
``begin_drain`` does what SIGTERM does to ``serve`` (tests/cli/test_serve_drain.py sends the
real signal to a real process). Short streams must finish, long ones must end with the
in-band ``server_shutting_down`` error, WebSockets must get ``session.closing`` (envelope
mode) and close with 1001 (1012 for a restart), requests on connections still open must get
503 with ``Retry-After``, ``/readyz`` must say ``draining`` while ``/healthz`` stays 200, and
every completion must have its ledger row.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tokenwire.accounting.ledger import Ledger, LedgerRow
from tokenwire.storage.engine import make_engine
from tokenwire.testing import GatewayServer, paced_sim, priced_model
from tokenwire.testing_clients import (
    KeepAlive,
    Recording,
    record_sse,
    record_ws,
    wait_closed,
)

DRAIN_S = 2.0
SHORT, LONG = 5, 2000  # tokens: done in ~0.1 s, or ~40 s (ended by the drain)
OVERRIDES = (
    paced_sim("paced", ttft_ms=0.0, itl_ms=20.0)
    + priced_model("priced-paced", "paced")
    + f"\n[server]\ndrain_timeout_s = {DRAIN_S}\n"
)


def body(tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "priced-paced",
        "max_tokens": tokens,
        "stream": True,
        "messages": [{"role": "user", "content": f"drain me {tokens}"}],
        **extra,
    }


@pytest.fixture
def draining_gateway(tmp_path: Path) -> Iterator[GatewayServer]:
    with GatewayServer(tmp_path, overrides=OVERRIDES) as server:
        yield server


async def ledger_rows(gateway: GatewayServer) -> tuple[list[LedgerRow], int]:
    engine = make_engine(gateway.settings.database_url)
    try:
        ledger = Ledger(engine)
        rows = await ledger.rows(key_id=gateway.api_key_id, limit=1000)
        return rows, await ledger.balance(gateway.api_key_id)
    finally:
        await engine.dispose()


async def start_sse(
    session: aiohttp.ClientSession, gateway: GatewayServer, payload: dict[str, Any]
) -> tuple[Recording, asyncio.Task[Recording]]:
    recording = Recording()
    response = await session.post(
        gateway.base_url + "/v1/chat/completions",
        json=payload,
        headers={"Authorization": f"Bearer {gateway.api_key}"},
    )
    assert response.status == 200, await response.text()
    return recording, asyncio.create_task(record_sse(response, recording))


async def open_ws(gateway: GatewayServer, *, envelope: bool) -> ClientConnection:
    return await connect(
        "ws" + gateway.base_url.removeprefix("http") + "/v1/ws/chat",
        additional_headers={"Authorization": f"Bearer {gateway.api_key}"},
        subprotocols=["tokenwire.v1"] if envelope else None,  # type: ignore[list-item]
    )


def create(request_id: str, payload: dict[str, Any]) -> str:
    return json.dumps({"type": "chat.completion.create", "request_id": request_id, "body": payload})


async def test_readyz_is_ready_with_its_checks(draining_gateway: GatewayServer) -> None:
    """Before a drain: /readyz is 200 ready, with the draining and database checks passing."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(draining_gateway.base_url + "/readyz") as response,
    ):
        assert response.status == 200
        ready = await response.json()
    assert ready == {
        "status": "ready",
        "failing": [],
        "checks": {"draining": {"ok": True}, "database": {"ok": True}},
    }


async def test_drain_finishes_short_streams_and_ends_long_ones_in_band(
    draining_gateway: GatewayServer,
) -> None:
    """Drain: short SSE/WS streams complete, long ones end with server_shutting_down (SSE, envelope, compatible); session.closing then 1001; 503 + Retry-After and readyz draining on open connections, healthz 200; one ledger row each; the server exits."""
    gateway = draining_gateway
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        sse_short, sse_short_task = await start_sse(session, gateway, body(SHORT))
        sse_long, sse_long_task = await start_sse(session, gateway, body(LONG))
        envelope = await open_ws(gateway, envelope=True)
        await envelope.send(create("long", body(LONG)))
        env_long = Recording()
        env_long_task = asyncio.create_task(record_ws(envelope, env_long, "long"))
        compat = await open_ws(gateway, envelope=False)
        await compat.send(json.dumps(body(LONG)))
        compat_long = Recording()
        compat_long_task = asyncio.create_task(record_ws(compat, compat_long))
        idle = await open_ws(gateway, envelope=True)
        await idle.send(json.dumps({"type": "ping"}))
        assert json.loads(await idle.recv()) == {"type": "pong"}
        probes = [await KeepAlive.open(gateway.port) for _ in range(3)]
        for recording in (sse_long, env_long, compat_long):
            await asyncio.wait_for(recording.started.wait(), 30)

        gateway.begin_drain()
        idle_end = await asyncio.wait_for(wait_closed(idle, Recording()), 30)
        assert idle_end.closing == {
            "type": "session.closing",
            "reason": "shutdown",
            "close_code": 1001,
            "drain_ms": idle_end.closing["drain_ms"] if idle_end.closing else -1,
        }
        assert 0 < idle_end.closing["drain_ms"] <= DRAIN_S * 1000
        assert idle_end.close_code == 1001

        # requests on connections still open: 503, Retry-After, the connection closes
        status, headers, content = await probes[0].request("GET", "/readyz")
        assert status == 503 and json.loads(content)["status"] == "draining"
        assert json.loads(content)["failing"] == ["draining"]
        status, headers, content = await probes[1].request(
            "POST",
            "/v1/chat/completions",
            {"Authorization": f"Bearer {gateway.api_key}", "Content-Type": "application/json"},
            json.dumps(body(SHORT)).encode(),
        )
        assert status == 503 and headers["retry-after"] == "1", content
        assert headers["connection"] == "close" and await probes[1].closed_by_server()
        assert json.loads(content)["error"]["code"] == "server_shutting_down"
        status, _, content = await probes[2].request("GET", "/healthz")
        assert status == 200, content  # still live: an orchestrator must not kill it
        # a new request on the open envelope socket: refused, the running one goes on
        await envelope.send(create("late", body(SHORT)))

        results = await asyncio.wait_for(
            asyncio.gather(sse_short_task, sse_long_task, env_long_task, compat_long_task), 60
        )
        await asyncio.wait_for(wait_closed(compat, compat_long), 30)
        await asyncio.wait_for(wait_closed(envelope, env_long), 30)
    assert await asyncio.to_thread(gateway.join, 15), "the server did not exit"

    assert sse_short.ended_by == "done" and sse_short.finish_reason == "length"
    for recording in results[1:]:
        assert recording.ended_by == "server_shutting_down", recording
        error = recording.errors[-1]
        assert error["status"] == 503 and error["resumable"] is False
        assert error["stream_id"] == recording.stream_id and recording.text
    assert sse_long.done  # SSE: the error, then [DONE]
    assert compat_long.done  # compatible mode too
    assert env_long.closing is not None and env_long.closing["close_code"] == 1001
    assert env_long.close_code == 1001 and compat_long.close_code == 1001
    assert compat_long.closing is None  # compatible mode gets no message it cannot parse
    assert gateway.streams_ended_by_drain == 3

    rows, balance = await ledger_rows(gateway)
    by_id = {row.completion_id: row for row in rows}
    assert len(rows) == 4  # the refused requests never started
    assert by_id[str(sse_short.stream_id)].status == "completed"
    for recording in results[1:]:
        row = by_id[str(recording.stream_id)]
        assert row.status == "shutdown" and row.cost_micro > 0 and row.completion_tokens > 0
    assert balance == 1000 * 1_000_000 - sum(row.cost_micro for row in rows)


async def test_envelope_request_sent_while_draining_is_refused(
    draining_gateway: GatewayServer,
) -> None:
    """A create sent after session.closing on a busy socket gets a 503 server_shutting_down error for its request_id, with retry_after_ms."""
    gateway = draining_gateway
    ws = await open_ws(gateway, envelope=True)
    await ws.send(create("running", body(LONG)))
    first = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert first["request_id"] == "running"
    gateway.begin_drain()
    replies: list[dict[str, Any]] = []
    while not replies or replies[-1].get("type") != "session.closing":
        replies.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    await ws.send(create("late", body(SHORT)))
    while True:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if reply.get("request_id") == "late":
            break
    assert reply["type"] == "error", reply
    assert reply["error"]["code"] == "server_shutting_down" and reply["error"]["status"] == 503
    assert reply["error"]["retry_after_ms"] == 1000
    await asyncio.wait_for(wait_closed(ws, Recording()), 30)
    assert await asyncio.to_thread(gateway.join, 15)


async def test_restart_drain_closes_websockets_with_1012(draining_gateway: GatewayServer) -> None:
    """A drain for a restart (SIGHUP to serve): session.closing says restart and the socket closes with 1012."""
    gateway = draining_gateway
    ws = await open_ws(gateway, envelope=True)
    await ws.send(json.dumps({"type": "ping"}))
    assert json.loads(await ws.recv()) == {"type": "pong"}
    gateway.begin_drain("restart")
    end = await asyncio.wait_for(wait_closed(ws, Recording()), 30)
    assert end.closing is not None and end.closing["reason"] == "restart"
    assert end.closing["close_code"] == 1012 and end.close_code == 1012
    assert await asyncio.to_thread(gateway.join, 15)
