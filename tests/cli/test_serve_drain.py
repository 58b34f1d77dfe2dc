"""SIGTERM (and SIGHUP) to a real ``tokenwire serve`` process with 100 streams open.

Two processes share PostgreSQL and Redis (a fresh database and key prefix, ``cluster``); gw0
gets 50 SSE and 50 WebSocket streams (envelope and compatible mode), some short enough to
finish within the drain timeout and some far longer, then SIGTERM. Every stream must either
complete or end with the documented in-band ``server_shutting_down`` error; every WebSocket
must close with 1001 (envelope ones after ``session.closing``); requests on connections still
open must get 503 with ``Retry-After`` while new connections are refused and ``/readyz``
says ``draining``; the process must exit within the drain timeout plus a few seconds; and
the ledger must hold one row per stream. A resumable stream the drain ended is then read
again on gw1, which still serves. And a stream gw1 generates, being resumed on gw0 when gw0
drains, ends there with ``server_shutting_down`` (``resumable``) and is resumed again on gw1,
where it goes on to its end.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tokenwire.accounting.ledger import Ledger, LedgerRow
from tokenwire.providers.sim import plan
from tokenwire.storage.engine import make_engine
from tokenwire.testing import paced_sim, priced_model
from tokenwire.testing_clients import KeepAlive, Recording, record_sse, record_ws, wait_closed
from tokenwire.testing_cluster import Cluster, GatewayProcess
from tokenwire.wire.schema import decode_chat_request

DRAIN_S = 3.0
EXIT_MARGIN_S = 6.0  # the ends reach their readers (up to 3 s), uvicorn closes, the ledger flushes
SHORT, LONG = 100, 3000  # tokens at 20 ms: ~2 s (finishes in the drain) or ~60 s (ended by it)
ELSEWHERE = 500  # ~10 s on gw1: still running when gw0's drain ends
GRANT = 1_000 * 1_000_000


def config(prefix: str) -> str:
    return (
        paced_sim("paced", ttft_ms=0.0, itl_ms=20.0)
        + priced_model("priced-paced", "paced")
        + f"""
[server]
stream_backend = "redis"

[limits]
backend = "redis"
redis_url = "redis://127.0.0.1:6379/0"
redis_prefix = "{prefix}"
"""
    )


def body(n: int, tokens: int) -> dict[str, Any]:
    return {
        "model": "priced-paced",
        "max_tokens": tokens,
        "stream": True,
        "messages": [{"role": "user", "content": f"stream {n} of the drain"}],
    }


async def sse_stream(
    session: aiohttp.ClientSession, gateway: GatewayProcess, key: str, n: int, recording: Recording
) -> Recording:
    headers = {"Authorization": f"Bearer {key}"}
    if n % 4 == 1:
        headers["X-Tokenwire-Resumable"] = "true"
    tokens = SHORT if n % 2 == 0 else LONG
    async with session.post(
        gateway.base_url + "/v1/chat/completions", json=body(n, tokens), headers=headers
    ) as response:
        assert response.status == 200, await response.text()
        return await record_sse(response, recording)


async def ws_stream(gateway: GatewayProcess, key: str, n: int, recording: Recording) -> Recording:
    envelope = n % 2 == 0
    tokens = SHORT if n % 4 < 2 else LONG
    ws: ClientConnection = await connect(
        gateway.ws_url,
        additional_headers={"Authorization": f"Bearer {key}"},
        subprotocols=["tokenwire.v1"] if envelope else None,  # type: ignore[list-item]
    )
    async with ws:
        if envelope:
            await ws.send(
                json.dumps(
                    {"type": "chat.completion.create", "request_id": "r", "body": body(n, tokens)}
                )
            )
            await record_ws(ws, recording, "r")
        else:
            await ws.send(json.dumps(body(n, tokens)))
            await record_ws(ws, recording)
        if recording.close_code is None:
            await wait_closed(ws, recording)
    return recording


async def ledger_rows(database_url: str, key_id: str) -> list[LedgerRow]:
    engine = make_engine(database_url)
    try:
        return await Ledger(engine).rows(key_id=key_id, limit=10_000)
    finally:
        await engine.dispose()


@pytest.fixture
def gateways(cluster: Cluster) -> tuple[Cluster, list[GatewayProcess], str, str]:
    record, key = asyncio.run(cluster.create_key("drain", grant_micro=GRANT))
    started = asyncio.run(
        cluster.start(config(cluster.redis_prefix), args=("--drain-timeout", str(DRAIN_S)))
    )
    return cluster, started, key, record.id


async def test_sigterm_with_100_open_streams_drains_and_loses_no_ledger_row(
    gateways: tuple[Cluster, list[GatewayProcess], str, str],
) -> None:
    """SIGTERM during 50 SSE + 50 WS streams: each completes or ends with server_shutting_down, WebSockets close 1001, 503 + Retry-After on open connections, readyz draining, exit within the drain timeout, one ledger row per stream; a resumable one reads again on the other process."""
    cluster, (gw0, gw1), key, key_id = gateways
    _, other_key = await cluster.create_key("elsewhere", grant_micro=GRANT)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        # a stream gw1 generates, cut after 2 events, then resumed (read through Redis) on gw0
        elsewhere_body = body(1000, ELSEWHERE) | {"stream_options": {"include_usage": True}}
        elsewhere = Recording()
        async with session.post(
            gw1.base_url + "/v1/chat/completions",
            json=elsewhere_body,
            headers={"Authorization": f"Bearer {other_key}", "X-Tokenwire-Resumable": "true"},
        ) as response:
            elsewhere.stream_id = response.headers["x-stream-id"]
            async for line in response.content:
                if line.startswith(b"data: {") and elsewhere.add_chunk(json.loads(line[6:])):
                    elsewhere.last_event += 1
                    if elsewhere.last_event == 2:
                        break
        remote = Recording()
        remote_response = await session.get(
            f"{gw0.base_url}/v1/chat/completions/{elsewhere.stream_id}/stream",
            headers={"Authorization": f"Bearer {other_key}", "Last-Event-ID": "2"},
        )
        assert remote_response.status == 200
        remote_task = asyncio.create_task(record_sse(remote_response, remote))

        recordings = [Recording() for _ in range(100)]
        sse_tasks = [
            asyncio.create_task(sse_stream(session, gw0, key, n, recordings[n])) for n in range(50)
        ]
        ws_tasks = [
            asyncio.create_task(ws_stream(gw0, key, n, recordings[50 + n])) for n in range(50)
        ]
        probes = [await KeepAlive.open(gw0.port) for _ in range(2)]
        ready, _, _ = await probes[0].request("GET", "/readyz")
        assert ready == 200
        # every stream has its first token before the signal
        await asyncio.wait_for(
            asyncio.gather(*(r.started.wait() for r in [*recordings, remote])), 60
        )

        sent_at = time.monotonic()
        gw0.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(recordings[50].told.wait(), 30)  # an envelope socket was told
        status, _, content = await probes[0].request("GET", "/readyz")
        assert status == 503 and json.loads(content)["status"] == "draining", content
        status, headers, content = await probes[1].request(
            "POST",
            "/v1/chat/completions",
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            json.dumps(body(999, SHORT)).encode(),
        )
        assert status == 503 and headers["retry-after"] == "1", content
        assert json.loads(content)["error"]["code"] == "server_shutting_down"
        with pytest.raises(OSError):  # no new connections
            await asyncio.open_connection("127.0.0.1", gw0.port)

        sse = await asyncio.wait_for(asyncio.gather(*sse_tasks), 60)
        await asyncio.wait_for(remote_task, 60)
        ws = await asyncio.wait_for(asyncio.gather(*ws_tasks), 60)
        returncode = await asyncio.to_thread(gw0.process.wait, DRAIN_S + EXIT_MARGIN_S + 10)
        exited_after = time.monotonic() - sent_at
        for probe in probes:
            probe.close()

        ends = [r.ended_by for r in (*sse, *ws)]
        assert set(ends) <= {"done", "server_shutting_down"}, ends
        assert 0 < ends.count("done") < 100, ends  # some finished in the drain, some were ended
        for recording in (*sse, *ws):
            if recording.ended_by == "server_shutting_down":
                error = recording.errors[-1]
                assert error["status"] == 503 and error["stream_id"] == recording.stream_id
            assert recording.done or recording.errors  # SSE and compatible: [DONE] after it
        assert all(r.close_code == 1001 for r in ws), [r.close_code for r in ws]
        assert all(r.closing is not None for r in ws[0::2])  # envelope sockets were told
        assert all(r.closing is None for r in ws[1::2])  # compatible ones get no message
        assert returncode == -signal.SIGTERM, gw0.log_tail()
        assert exited_after < DRAIN_S + EXIT_MARGIN_S, exited_after

        rows = await ledger_rows(cluster.database_url, key_id)
        by_id = {row.completion_id: row for row in rows}
        assert len(rows) == 100 and set(by_id) == {r.stream_id for r in (*sse, *ws)}
        for recording in (*sse, *ws):
            status_ = by_id[str(recording.stream_id)].status
            assert status_ == ("completed" if recording.ended_by == "done" else "shutdown")

        # a resumable stream the drain ended: its events read again on gw1
        resumable = [r for n, r in enumerate(sse) if n % 4 == 1 and r.errors]
        assert resumable and all(r.errors[-1]["resumable"] is True for r in resumable)
        again = Recording()
        async with session.get(
            f"{gw1.base_url}/v1/chat/completions/{resumable[0].stream_id}/stream",
            headers={"Authorization": f"Bearer {key}", "Last-Event-ID": "0"},
        ) as response:
            assert response.status == 200, await response.text()
            await record_sse(response, again)
        assert again.text == resumable[0].text and again.ended_by == "server_shutting_down"

        # the read on gw0 of gw1's stream ended; the stream went on: resumed on gw1 to its end
        assert remote.ended_by == "server_shutting_down", remote
        assert remote.errors[-1]["resumable"] is True
        assert remote.errors[-1]["stream_id"] == elsewhere.stream_id
        rest = Recording()
        async with session.get(
            f"{gw1.base_url}/v1/chat/completions/{elsewhere.stream_id}/stream",
            headers={
                "Authorization": f"Bearer {other_key}",
                "Last-Event-ID": str(remote.last_event),
            },
        ) as response:
            assert response.status == 200, await response.text()
            await record_sse(response, rest)
        assert rest.ended_by == "done" and rest.finish_reason == "length"
        text = elsewhere.text + remote.text + rest.text
        assert text == plan(decode_chat_request(json.dumps(elsewhere_body).encode())).text


async def test_sighup_drains_for_a_restart(cluster: Cluster) -> None:
    """SIGHUP: an envelope WebSocket gets session.closing (restart) and close 1012; the process exits with status 0."""
    _, key = await cluster.create_key("restart", grant_micro=GRANT)
    (gateway,) = await cluster.start(config(cluster.redis_prefix), count=1)
    async with connect(
        gateway.ws_url,
        additional_headers={"Authorization": f"Bearer {key}"},
        subprotocols=["tokenwire.v1"],  # type: ignore[list-item]
    ) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}
        gateway.process.send_signal(signal.SIGHUP)
        end = await asyncio.wait_for(wait_closed(ws, Recording()), 30)
    assert end.closing is not None and end.closing["reason"] == "restart"
    assert end.close_code == 1012
    assert await asyncio.to_thread(gateway.process.wait, 30) == 0, gateway.log_tail()
