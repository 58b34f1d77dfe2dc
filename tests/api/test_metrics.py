"""``GET /metrics`` on a live gateway: exact counts after a mixed run, and who may read it.

The mixed run goes over SSE, JSON, WebSocket (compatible and envelope), a resume, an
OpenAI-compatible upstream (sim-upstream) that answers, fails before the first token (retried,
then the circuit opens) and fails after it, a fallback from an upstream nobody listens on, and
refusals by a rate limit and by credits. The scrape is parsed with prometheus_client's parser.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from tokenwire.testing import (
    FAST_SIM,
    GatewayServer,
    Scrape,
    SimUpstreamServer,
    priced_model,
    read_sse_answer,
)
from tokenwire.testing_cluster import free_port

ROUTING = """
[routing]
max_attempts = 3
backoff_base_s = 0.0
backoff_max_s = 0.0
breaker_threshold = 3
breaker_cooldown_s = 600.0
"""


def upstream_config(upstream: str, dead: str) -> str:
    """``proxied-sim`` (provider ``up``), ``flaky`` (same upstream, provider ``flaky``, so its
    circuit is its own) and ``fallback``: first ``dead`` (nothing listens; chosen first all but
    once in 10^9), then ``up``."""
    return f"""
[providers.up]
kind = "openai"
base_url = "{upstream}/v1"

[providers.flaky]
kind = "openai"
base_url = "{upstream}/v1"

[providers.dead]
kind = "openai"
base_url = "{dead}/v1"

[[models]]
id = "proxied-sim"
provider = "up"
upstream_model = "sim"

[[models]]
id = "flaky"
provider = "flaky"
upstream_model = "sim"

[[models]]
id = "fallback"

[[models.deployments]]
provider = "dead"
upstream_model = "sim"
weight = 1000000000

[[models.deployments]]
provider = "up"
upstream_model = "sim"
weight = 1
"""


@pytest.fixture
def gw(tmp_path: Path, sim_upstream: SimUpstreamServer) -> Iterator[GatewayServer]:
    """A gateway with the free ``sim``, the priced ``priced-sim`` and three routed models."""
    dead = f"http://127.0.0.1:{free_port()}"
    overrides = FAST_SIM + priced_model() + upstream_config(sim_upstream.base_url, dead) + ROUTING
    with GatewayServer(tmp_path / "gw", overrides=overrides) as server:
        yield server


def body(model: str, content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def sse(
    http: aiohttp.ClientSession,
    gw: GatewayServer,
    key: str,
    payload: dict[str, Any],
    **headers: str,
) -> tuple[int, str, str]:
    """POST a streamed request: its status, the text read, and the stream id."""
    async with http.post(
        gw.base_url + "/v1/chat/completions",
        json={**payload, "stream": True},
        headers={**bearer(key), **headers},
    ) as response:
        answer = await read_sse_answer(response.content)
        return response.status, answer.text, response.headers.get("x-stream-id", "")


async def scrape(http: aiohttp.ClientSession, gw: GatewayServer) -> Scrape:
    async with http.get(gw.base_url + "/metrics", headers=bearer(gw.admin_key)) as response:
        assert response.status == 200
        return Scrape.parse(await response.text())


async def settled(http: aiohttp.ClientSession, gw: GatewayServer) -> Scrape:
    """The scrape once every generation has settled and every socket session ended (nothing
    moves after that: the scrape that sees it is final)."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if not gw.state.completions.live:  # settled: its series were all observed before
            s = await scrape(http, gw)
            if s.total("tokenwire_open_websockets") == 0:
                return s
        await asyncio.sleep(0.02)  # the polling interval
    pytest.fail("generations or sockets still open after 30 s")


async def create_key(http: aiohttp.ClientSession, gw: GatewayServer, **options: Any) -> str:
    async with http.post(
        gw.base_url + "/v1/admin/keys",
        json={"name": "metrics", **options},
        headers=bearer(gw.admin_key),
    ) as response:
        assert response.status == 201, await response.text()
        key: str = (await response.json())["key"]
        return key


async def test_mixed_run_shows_exact_counts(gw: GatewayServer, http: aiohttp.ClientSession) -> None:
    """After SSE, JSON, WS compatible and envelope requests, a resume, upstream retries, a
    fallback, failures and refusals, every series holds exactly what happened."""
    key = gw.api_key
    for i in range(3):
        assert (await sse(http, gw, key, body("sim", f"sse {i}")))[0] == 200
    json_usage = []
    for i in range(2):
        async with http.post(
            gw.base_url + "/v1/chat/completions",
            json=body("priced-sim", f"json {i}"),
            headers=bearer(key),
        ) as response:
            assert response.status == 200
            json_usage.append((await response.json())["usage"])
    url = "ws" + gw.base_url.removeprefix("http") + "/v1/ws/chat"
    async with connect(url, additional_headers=bearer(key)) as ws:
        for i in range(2):
            await ws.send(json.dumps(body("sim", f"compat {i}")))
            while await ws.recv() != "[DONE]":
                pass
    async with connect(url, additional_headers=bearer(key)) as ws:
        for i in range(2):
            create = {"type": "chat.completion.create", "request_id": f"r{i}"}
            await ws.send(json.dumps({**create, "body": body("sim", f"envelope {i}")}))
        done = 0
        while done < 2:
            done += json.loads(await ws.recv())["type"] == "chat.completion.done"
    status, _, stream_id = await sse(
        http, gw, key, body("sim", "resumable"), **{"X-Tokenwire-Resumable": "true"}
    )
    assert status == 200
    async with http.get(
        f"{gw.base_url}/v1/chat/completions/{stream_id}/stream",
        headers={**bearer(key), "Last-Event-ID": "0"},
    ) as response:
        assert response.status == 200
        assert (await read_sse_answer(response.content)).done
    assert (await sse(http, gw, key, body("proxied-sim")))[0] == 200
    assert (await sse(http, gw, key, body("proxied-sim", "sim-fault:500-after")))[0] == 200
    assert (await sse(http, gw, key, body("flaky", "sim-fault:500")))[0] == 500
    assert (await sse(http, gw, key, body("fallback")))[0] == 200
    limited = await create_key(http, gw, rpm=1)
    assert (await sse(http, gw, limited, body("sim", "first")))[0] == 200
    assert (await sse(http, gw, limited, body("sim", "second")))[0] == 429
    broke = await create_key(http, gw, credits_usd="0")
    async with http.post(
        gw.base_url + "/v1/chat/completions", json=body("priced-sim"), headers=bearer(broke)
    ) as response:
        assert response.status == 402

    s = await settled(http, gw)
    requests = "tokenwire_requests_total"
    sim = {"model": "sim", "provider": "sim", "api": "chat"}
    assert s.total(requests, **sim, transport="sse", outcome="completed") == 5
    assert s.total(requests, **sim, transport="ws", outcome="completed") == 2
    assert s.total(requests, **sim, transport="ws-envelope", outcome="completed") == 2
    assert s.total(requests, **sim, transport="sse", outcome="rate_limited") == 1
    assert s.total(requests, model="priced-sim", transport="json", outcome="completed") == 2
    assert (
        s.total(requests, model="priced-sim", transport="json", outcome="insufficient_quota") == 1
    )
    assert s.total(requests, model="proxied-sim", provider="up", outcome="completed") == 1
    assert s.total(requests, model="proxied-sim", provider="up", outcome="upstream_error") == 1
    assert s.total(requests, model="flaky", provider="flaky", outcome="upstream_error") == 1
    assert s.total(requests, model="fallback", provider="up", outcome="completed") == 1
    assert s.total(requests) == 17
    assert s.total("tokenwire_limit_refusals_total", reason="requests") == 1
    assert s.total("tokenwire_limit_refusals_total", reason="credits") == 1
    assert s.total("tokenwire_limit_refusals_total") == 2

    attempts = "tokenwire_upstream_attempts_total"
    assert s.total(attempts, provider="up", deployment="up/sim", outcome="ok") == 3
    assert s.total(attempts, provider="flaky", deployment="flaky/sim", outcome="server_error") == 3
    assert s.total(attempts, provider="dead", deployment="dead/sim", outcome="connect_error") == 1
    assert s.total(attempts, provider="sim", deployment="sim/sim", outcome="ok") == 11
    assert s.total(attempts) == 18  # the in-process simulator is routed like any upstream
    assert s.total("tokenwire_retries_total", deployment="flaky/sim") == 2
    assert s.total("tokenwire_retries_total", deployment="up/sim") == 1
    assert s.total("tokenwire_fallbacks_total", model="fallback") == 1
    assert s.total("tokenwire_fallbacks_total") == 1
    assert s.total("tokenwire_circuit_state", deployment="flaky/sim") == 2
    assert s.total("tokenwire_circuit_state", deployment="up/sim") == 0
    assert s.total("tokenwire_circuit_state", deployment="dead/sim") == 0

    # Every completion with a first token has one TTFT; the flaky one had none.
    assert s.total("tokenwire_ttft_seconds_count") == 14
    assert s.total("tokenwire_ttft_seconds_count", model="flaky") == 0
    assert s.total("tokenwire_request_duration_seconds_count") == 15
    priced = {"model": "priced-sim", "provider": "sim", "transport": "json"}
    prompt = sum(u["prompt_tokens"] for u in json_usage)
    completion = sum(u["completion_tokens"] for u in json_usage)
    assert s.total("tokenwire_prompt_tokens_total", **priced) == prompt
    assert s.total("tokenwire_completion_tokens_total", **priced) == completion
    assert s.total("tokenwire_cost_microdollars_total", **priced) == 3 * prompt + 15 * completion
    assert s.total("tokenwire_cost_microdollars_total") == 3 * prompt + 15 * completion
    assert s.total("tokenwire_resumes_total", transport="sse") == 1
    assert s.total("tokenwire_resumes_total") == 1
    assert s.total("tokenwire_open_streams") == 0
    assert s.total("tokenwire_open_websockets") == 0
    assert s.total("tokenwire_ledger_queue_depth") == 0
    assert s.total("tokenwire_ledger_write_failures_total") == 0
    assert s.total("process_resident_memory_bytes") > 0


async def test_gauges_count_what_is_open_now(
    gw: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """While a socket is open and an envelope request streams, the gauges say so; after, zero."""
    url = "ws" + gw.base_url.removeprefix("http") + "/v1/ws/chat"
    slow = body("sim", "long", max_tokens=5000)
    async with connect(url, additional_headers=bearer(gw.api_key)) as idle:
        await idle.send(json.dumps({"type": "ping"}))
        assert json.loads(await idle.recv()) == {"type": "pong"}
        async with connect(url, additional_headers=bearer(gw.api_key)) as ws:
            create = {"type": "chat.completion.create", "request_id": "r", "body": slow}
            await ws.send(json.dumps(create))
            assert json.loads(await ws.recv())["type"] == "chat.completion.chunk"
            s = await scrape(http, gw)
            assert s.total("tokenwire_open_websockets", mode="pending") == 1
            assert s.total("tokenwire_open_websockets", mode="envelope") == 1
            assert s.total("tokenwire_open_streams", transport="ws-envelope") == 1
    s = await settled(http, gw)
    assert s.total("tokenwire_open_websockets") == 0
    assert s.total("tokenwire_open_streams") == 0
    assert (
        s.total("tokenwire_requests_total", transport="ws-envelope", outcome="client_disconnected")
        == 1
    )


async def test_metrics_need_an_admin_key(gw: GatewayServer, http: aiohttp.ClientSession) -> None:
    """On the main port: no key 401, a wrong key 401, an API key 403, the admin key 200 in
    Prometheus' text format, or OpenMetrics when asked, gzipped when accepted."""
    url = gw.base_url + "/metrics"
    async with http.get(url) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "missing_api_key"
    async with http.get(url, headers=bearer("tw-" + "x" * 43)) as response:
        assert response.status == 401
    async with http.get(url, headers=bearer(gw.api_key)) as response:
        assert response.status == 403
        assert (await response.json())["error"]["type"] == "permission_error"
    async with http.get(url, headers=bearer(gw.admin_key)) as response:
        assert response.status == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "tokenwire_open_streams" in Scrape.parse(await response.text()).families
    openmetrics = {**bearer(gw.admin_key), "Accept": "application/openmetrics-text; version=1.0.0"}
    async with http.get(url, headers=openmetrics) as response:  # what Prometheus asks for
        assert response.status == 200
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.headers["content-encoding"] == "gzip"  # aiohttp accepts it
        assert (await response.text()).endswith("# EOF\n")
