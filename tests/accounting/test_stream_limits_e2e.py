"""Concurrent-stream limits end to end, with the in-process and the Redis limiter: a stream over
``max_concurrent_streams`` gets 429 ``concurrent_streams_exceeded`` and a new one is admitted
when one ends or its client disconnects; on a one-stream key each request sent the moment the
previous one ended (SSE, JSON, WebSocket envelope and compatible mode) is admitted.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from tests.accounting.conftest import (
    accounts,
    bearer,
    chat,
    check_openai_error,
    poll,
    settled,
    sse,
    wait_for,
    ws_request,
    ws_url,
)
from websockets.asyncio.client import connect

from tokenwire.accounting.keys import KeyLimits
from tokenwire.testing import GatewayServer


async def open_stream(
    session: aiohttp.ClientSession, gw: GatewayServer, key: str, body: dict[str, Any]
) -> aiohttp.ClientResponse:
    """Start a streamed completion and return once its headers arrived (the body unread)."""
    return await session.post(
        gw.base_url + "/v1/chat/completions", json={**body, "stream": True}, headers=bearer(key)
    )


async def test_max_concurrent_streams(
    short_window: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """max_concurrent_streams=2: a third concurrent stream gets 429 concurrent_streams_exceeded; when one ends (or disconnects) a new one is admitted."""
    gw = short_window
    async with accounts(gw) as acc:
        record, key = await acc.keys.create(
            "two-streams", limits=KeyLimits(max_concurrent_streams=2)
        )
    short = chat("short", model="slow-sim", max_tokens=60)  # ~0.6 s at 10 ms a token
    long = chat("long", model="slow-sim", max_tokens=3000)  # ~30 s: disconnected early
    a = await open_stream(http, gw, key, short)
    b = await open_stream(http, gw, key, long)
    opened: list[aiohttp.ClientResponse] = [a, b]
    try:
        assert a.status == 200 and b.status == 200
        b_id = b.headers["x-stream-id"]
        third = await sse(http, gw, key, chat("third", model="slow-sim", max_tokens=5))
        assert third.status == 429, third
        check_openai_error(
            third.error, type_="rate_limit_error", code="concurrent_streams_exceeded"
        )
        assert int(third.headers["retry-after"]) >= 1

        text = (await a.read()).decode()  # read the short stream to its natural end
        assert text.rstrip().endswith("data: [DONE]")

        async def fourth_attempt() -> aiohttp.ClientResponse:
            resp = await open_stream(http, gw, key, long)
            if resp.status != 200:
                await resp.read()
                resp.close()
            else:
                opened.append(resp)
            return resp

        d, _ = await poll(fourth_attempt, lambda r: r.status == 200, 5)
        assert d.status == 200, "no stream admitted after one of two ended"
        assert b_id in gw.state.completions.live, "the long stream should still be running"
        refused = await sse(http, gw, key, chat("again", model="slow-sim", max_tokens=5))
        assert refused.status == 429
        check_openai_error(
            refused.error, type_="rate_limit_error", code="concurrent_streams_exceeded"
        )

        b.close()  # a disconnect ends the long stream and frees its slot
        e, _ = await poll(fourth_attempt, lambda r: r.status == 200, 5)
        assert e.status == 200, "no stream admitted after a client disconnected"
    finally:
        for resp in opened:
            resp.close()
    async with accounts(gw) as acc:
        assert await wait_for(lambda: settled(gw, acc, record.id, 4), 5)
        rows = {r.completion_id: r for r in await acc.ledger.rows(key_id=record.id)}
    assert len(rows) == 4
    assert rows[b_id].status == "client_disconnected"
    assert rows[a.headers["x-stream-id"]].status == "completed"


async def test_one_stream_key_serves_requests_one_after_another(
    minute_window: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """max_concurrent_streams=1, priced: each request sent the moment the previous one's
    [DONE] (or JSON body, or WebSocket done) arrived is admitted, 20 times per transport: the
    slot is free before the client sees the end, whatever the ledger is doing."""
    gw = minute_window
    async with accounts(gw) as acc:
        record, key = await acc.keys.create(
            "one-stream", limits=KeyLimits(max_concurrent_streams=1), grant_micro=10_000_000
        )
    body = chat("one after another", model="priced-sim", max_tokens=3)
    for i in range(20):
        reply = await sse(http, gw, key, body)
        assert reply.status == 200, (i, reply.error)
        async with http.post(
            f"{gw.base_url}/v1/chat/completions", json=body, headers=bearer(key)
        ) as response:
            assert response.status == 200, (i, await response.text())
    async with connect(ws_url(gw), additional_headers=bearer(key)) as ws:
        for i in range(20):
            done = await ws_request(ws, f"r{i}", body)
            assert done["type"] == "chat.completion.done", (i, done)
        for i in range(20):
            await ws.send(json.dumps(body))
            while (message := await ws.recv()) != "[DONE]":
                assert "error" not in json.loads(message), (i, message)
    async with accounts(gw) as acc:
        assert await wait_for(lambda: settled(gw, acc, record.id, 80), 10)
