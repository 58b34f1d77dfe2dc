"""Billing defects found by a careful read, end to end over real HTTP and WebSocket clients.

* A prompt the gateway's estimate undercounts (the issue's 404 real tokens against 203
  estimated) sent 50 times at once on a $0.01 key must never take the balance below zero.
* The same ``Idempotency-Key`` and body sent once over SSE, once over WebSocket and once as
  JSON is one request: one generation, one charge, no 409.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from tokenwire.accounting.budget import estimate_prompt_tokens
from tokenwire.providers.sim import plan
from tokenwire.testing import FAST_SIM, GatewayServer, priced_model
from tokenwire.wire.schema import decode_chat_request

CATALOG = FAST_SIM + priced_model()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayServer]:
    with GatewayServer(tmp_path, overrides=CATALOG) as server:
        yield server


async def on_server(gw: GatewayServer, coro: Any) -> Any:
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, gw.loop_of_server()))


async def settled_rows(gw: GatewayServer, key_id: str, count: int) -> list[Any]:
    async with asyncio.timeout(15):
        while True:
            rows = await on_server(gw, gw.state.ledger.rows(key_id=key_id))
            if len(rows) >= count and not gw.state.completions.live:
                return list(rows)
            await asyncio.sleep(0.02)


async def test_an_undercounted_prompt_never_takes_a_balance_below_zero(
    gateway: GatewayServer,
) -> None:
    """400 one-letter words: the simulator counts 404 prompt tokens, the estimate 204. Fifty
    such requests at once on a $0.01 key: some are refused (402), the balance never goes below
    zero, and it equals the grant less what the rows charge."""
    body = {
        "model": "priced-sim",
        "stream": True,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "a " * 400}],
    }
    request = decode_chat_request(json.dumps(body).encode())
    assert plan(request).prompt_tokens == 404 and estimate_prompt_tokens(request) == 204

    async def create() -> tuple[str, str]:
        record, key = await gateway.state.keys.create("tiny", grant_micro=10_000)
        return record.id, key

    key_id, key = await on_server(gateway, create())
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http:

        async def one() -> int:
            async with http.post(
                f"{gateway.base_url}/v1/chat/completions", json=body, headers=headers
            ) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(50)))
    assert set(statuses) <= {200, 402} and 200 in statuses and 402 in statuses
    rows = await settled_rows(gateway, key_id, statuses.count(200))
    assert len(rows) == statuses.count(200)
    assert all(row.prompt_tokens == 404 for row in rows)
    balance = await on_server(gateway, gateway.state.ledger.balance(key_id))
    assert balance >= 0
    assert balance == 10_000 - sum(row.charge_micro for row in rows)


async def test_one_idempotency_key_is_one_request_on_every_transport(
    gateway: GatewayServer,
) -> None:
    """The same key and body over SSE, then WebSocket (envelope), then JSON: the same stream
    id and text each time, one ledger row, one charge; a different body is a 409."""
    body = {
        "model": "priced-sim",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "charge me once, whatever the transport"}],
    }
    headers = {"Authorization": f"Bearer {gateway.api_key}", "Idempotency-Key": "order-77"}
    expected = plan(decode_chat_request(json.dumps(body).encode())).text
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway.base_url}/v1/chat/completions",
            json={**body, "stream": True},
            headers=headers,
        ) as response:
            assert response.status == 200
            sse_id = response.headers["x-stream-id"]
            await response.read()
        ws_url = gateway.base_url.replace("http", "ws") + "/v1/ws/chat"
        auth = {"Authorization": f"Bearer {gateway.api_key}"}
        async with connect(ws_url, additional_headers=auth) as ws:
            create = {
                "type": "chat.completion.create",
                "request_id": "r",
                "idempotency_key": "order-77",
                "body": body,
            }
            await ws.send(json.dumps(create))
            text = ""
            while (message := json.loads(await ws.recv()))["type"] == "chat.completion.chunk":
                if message["choices"]:
                    text += message["choices"][0]["delta"].get("content") or ""
            assert message["type"] == "chat.completion.done", message
            assert message["stream_id"] == sse_id and text == expected
        async with http.post(
            f"{gateway.base_url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            assert response.status == 200
            completion = await response.json()
            assert completion["id"] == sse_id
            assert completion["choices"][0]["message"]["content"] == expected
        async with http.post(
            f"{gateway.base_url}/v1/chat/completions",
            json={**body, "max_tokens": 9},
            headers=headers,
        ) as response:
            assert response.status == 409
            assert (await response.json())["error"]["code"] == "idempotency_key_reused"
    rows = await settled_rows(gateway, gateway.api_key_id, 1)
    assert [row.completion_id for row in rows] == [sse_id]
