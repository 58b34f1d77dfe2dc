"""Every path ends: a provider that raises anything, a request too large for its model.

A provider whose failure is not a gateway error (a bug below us) must still end its
generation: a logged ``500 internal_error`` before the first token, an in-band error and
``[DONE]`` after it, on JSON, SSE and both WebSocket modes, with the stream slot freed, the
reservation settled (one ledger row) and shutdown unblocked. A numeric field beyond what the
model can do is a 400 naming it, and one bad request on a socket fails that request only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import sqlalchemy as sa
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tokenwire.accounting.keys import KeyLimits
from tokenwire.providers.base import ProviderCall
from tokenwire.providers.sim import run_request
from tokenwire.storage.tables import reservations
from tokenwire.streams.events import Event
from tokenwire.testing import FAST_SIM, GatewayServer

CATALOG = (
    FAST_SIM
    + """
[providers.buggy]
kind = "sim"

[[models]]
id = "buggy"
provider = "buggy"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "15.00"

[[models]]
id = "priced-sim"
provider = "sim"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "15.00"
max_output_tokens = 1000
"""
)


class BuggyProvider:
    """A provider with a bug: it raises ``KeyError`` before or after its first token."""

    name = "buggy"

    def __init__(self) -> None:
        self.after_first_token = False

    def stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        return self._stream(call)

    async def _stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        if not self.after_first_token:
            raise KeyError("a bug before the first token")
        events = run_request(call.request, ttft_s=0, itl_s=0)
        yield await anext(events)
        raise KeyError("a bug after the first token")

    async def aclose(self) -> None:
        return None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    with GatewayServer(tmp_path_factory.mktemp("ends"), overrides=CATALOG) as gateway:
        yield gateway


@pytest.fixture
def buggy(server: GatewayServer) -> BuggyProvider:
    provider = BuggyProvider()
    server.state.registry.add("buggy", provider)
    return provider


@pytest.fixture
def one_stream_key(server: GatewayServer) -> str:
    """A fresh key allowed one stream at a time, with $10 of credit."""

    async def create() -> str:
        _, key = await server.state.keys.create(
            "one-stream", limits=KeyLimits(max_concurrent_streams=1), grant_micro=10_000_000
        )
        return key

    return asyncio.run_coroutine_threadsafe(create(), server.loop_of_server()).result()


def body(model: str = "buggy", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], **extra}


async def on_server(server: GatewayServer, coro: Any) -> Any:
    return await asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(coro, server.loop_of_server())
    )


async def open_reservations(server: GatewayServer) -> int:
    async def count() -> int:
        async with server.state.engine.connect() as conn:
            return int(await conn.scalar(sa.select(sa.func.count()).select_from(reservations)) or 0)

    return int(await on_server(server, count()))


async def sse_lines(response: aiohttp.ClientResponse) -> list[str]:
    return [line.decode().strip() async for line in response.content if line.strip()]


async def assert_all_settled(server: GatewayServer) -> None:
    """No live generation and no open reservation remain (polled: settlement is async)."""
    async with asyncio.timeout(10):
        while server.state.completions.live or await open_reservations(server):  # noqa: ASYNC110 - a database count; no event to wait on
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("after_first_token", [False, True])
async def test_a_provider_bug_ends_every_transport_and_frees_everything(
    server: GatewayServer,
    buggy: BuggyProvider,
    one_stream_key: str,
    after_first_token: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A provider raising KeyError ends JSON, SSE, WS envelope and WS compatible requests,
    one after another on a one-stream key: 500 internal_error (or an in-band error), no hang,
    slot and reservation freed, the bug logged."""
    buggy.after_first_token = after_first_token
    headers = {"Authorization": f"Bearer {one_stream_key}"}
    caplog.set_level(logging.ERROR, logger="tokenwire")
    async with asyncio.timeout(20), aiohttp.ClientSession() as http:
        for _ in range(2):  # twice: the first request's slot must be free for the second
            async with http.post(
                f"{server.base_url}/v1/chat/completions", json=body(), headers=headers
            ) as response:
                assert response.status == 500
                error = (await response.json())["error"]
                assert error["code"] == "internal_error" and "KeyError" not in error["message"]
            async with http.post(
                f"{server.base_url}/v1/chat/completions", json=body(stream=True), headers=headers
            ) as response:
                if after_first_token:
                    assert response.status == 200
                    lines = await sse_lines(response)
                    assert lines[-1] == "data: [DONE]"
                    assert json.loads(lines[-2][len("data: ") :])["error"]["code"] == (
                        "internal_error"
                    )
                else:
                    assert response.status == 500
                    assert (await response.json())["error"]["code"] == "internal_error"
        ws_url = server.base_url.replace("http", "ws") + "/v1/ws/chat"
        async with connect(ws_url, additional_headers=headers) as ws:
            for i in range(2):
                create = {"type": "chat.completion.create", "request_id": f"r{i}", "body": body()}
                await ws.send(json.dumps(create))
                while True:
                    message = json.loads(await ws.recv())
                    if message["type"] == "error":
                        assert message["request_id"] == f"r{i}"
                        assert message["error"]["code"] == "internal_error"
                        assert message["error"]["status"] == 500
                        break
            await ws.send(json.dumps(body()))  # compatible mode on the same socket
            seen = [await ws.recv() for _ in range(3 if after_first_token else 2)]
            assert seen[-1] == "[DONE]"
            assert json.loads(seen[-2])["error"]["code"] == "internal_error"
            await ws.send(json.dumps({"type": "ping"}))  # the socket still serves
            assert json.loads(await ws.recv()) == {"type": "pong"}
    await assert_all_settled(server)
    assert any("unexpected error in completion chatcmpl-" in r.getMessage() for r in caplog.records)
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


def test_shutdown_does_not_wait_for_a_generation_that_raised(tmp_path: Path) -> None:
    """A gateway whose provider raised stops promptly: nothing is left live."""
    with GatewayServer(tmp_path, overrides=CATALOG) as gateway:
        gateway.state.registry.add("buggy", BuggyProvider())
        headers = {"Authorization": f"Bearer {gateway.api_key}"}
        response = requests.post(
            f"{gateway.base_url}/v1/chat/completions", json=body(), headers=headers, timeout=10
        )
        assert response.status_code == 500
    assert not gateway.running  # stop() returned with the server thread ended: no hang
    assert not gateway.state.completions.live  # and the generation settled before it did


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"max_tokens": 2**63}, "max_tokens"),
        ({"max_tokens": 1e30}, "max_tokens"),
        ({"max_tokens": 1001}, "max_tokens"),  # above priced-sim's max_output_tokens
        ({"max_completion_tokens": 20_000_000}, "max_completion_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"top_logprobs": 10**9}, "top_logprobs"),
        ({"logit_bias": {"1": 1e9}}, "logit_bias[...]"),
    ],
)
async def test_numbers_beyond_the_model_are_a_400_naming_the_field(
    server: GatewayServer, extra: dict[str, Any], param: str
) -> None:
    """Huge or out-of-range numbers are refused before anything is admitted, over HTTP."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with aiohttp.ClientSession() as http:
        for stream in (False, True):
            async with http.post(
                f"{server.base_url}/v1/chat/completions",
                json=body("priced-sim", stream=stream, **extra),
                headers=headers,
            ) as response:
                assert response.status == 400, await response.text()
                assert (await response.json())["error"]["param"] == param


async def test_a_bad_request_on_a_socket_fails_that_request_only(server: GatewayServer) -> None:
    """max_tokens 2**63 in one envelope request is an error for it; the request running beside
    it on the same socket finishes, and a compatible-mode socket keeps answering."""
    ws_url = server.base_url.replace("http", "ws") + "/v1/ws/chat"
    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with asyncio.timeout(20), connect(ws_url, additional_headers=headers) as ws:
        good = {"type": "chat.completion.create", "request_id": "good", "body": body("sim")}
        bad = {
            "type": "chat.completion.create",
            "request_id": "bad",
            "body": body("priced-sim", max_tokens=2**63),
        }
        await ws.send(json.dumps(good))
        await ws.send(json.dumps(bad))
        ended: dict[str, str] = {}
        while len(ended) < 2:
            message = json.loads(await ws.recv())
            if message["type"] in ("error", "chat.completion.done"):
                ended[message["request_id"]] = message["type"]
                if message["type"] == "error":
                    assert message["error"]["param"] == "max_tokens"
        assert ended == {"good": "chat.completion.done", "bad": "error"}
    async with asyncio.timeout(20), connect(ws_url, additional_headers=headers) as ws:
        await ws.send(json.dumps(body("priced-sim", max_tokens=2**63)))
        assert json.loads(await ws.recv())["error"]["param"] == "max_tokens"
        assert await ws.recv() == "[DONE]"
        await ws.send(json.dumps(body("sim", max_tokens=3)))
        chunks = []
        while (message := await ws.recv()) != "[DONE]":
            chunks.append(json.loads(message))
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_the_longest_answer_streams_without_blocking_the_gateway(
    server: GatewayServer,
) -> None:
    """A sim answer at the model's limit (65,536 tokens) streams as it is made: its first
    chunk arrives, and another request is answered meanwhile; cancelling it ends it."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with (
        asyncio.timeout(20),
        aiohttp.ClientSession() as http,
        http.post(
            f"{server.base_url}/v1/chat/completions",
            json=body("sim", stream=True, max_tokens=65_536),
            headers=headers,
        ) as long_answer,
    ):
        assert long_answer.status == 200
        first = await long_answer.content.readline()
        assert first.startswith(b"id:") or first.startswith(b"data:")
        async with http.get(f"{server.base_url}/healthz") as health:
            assert health.status == 200
        # leaving the block closes the connection: the generation is cancelled and settles
    await assert_all_settled(server)


async def test_a_key_revoked_through_the_admin_api_stops_its_open_socket(
    server: GatewayServer, one_stream_key: str
) -> None:
    """A WebSocket authenticated before its key was revoked (admin API) gets an
    authentication error for its next request and is closed with 3000."""
    headers = {"Authorization": f"Bearer {one_stream_key}"}
    ws_url = server.base_url.replace("http", "ws") + "/v1/ws/chat"
    async with asyncio.timeout(20), connect(ws_url, additional_headers=headers) as ws:
        create = {"type": "chat.completion.create", "request_id": "before", "body": body("sim")}
        await ws.send(json.dumps(create))
        while json.loads(await ws.recv())["type"] != "chat.completion.done":
            pass
        key_id = (await on_server(server, server.state.keys.authenticate(one_stream_key))).id
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{server.base_url}/v1/admin/keys/{key_id}/revoke",
                headers={"Authorization": f"Bearer {server.admin_key}"},
            ) as response,
        ):
            assert response.status == 200
        await ws.send(json.dumps({**create, "request_id": "after"}))
        message = json.loads(await ws.recv())
        assert message["type"] == "error" and message["request_id"] == "after"
        assert message["error"]["status"] == 401
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3000
