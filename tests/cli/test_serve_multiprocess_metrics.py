"""Two ``tokenwire serve`` processes with one ``PROMETHEUS_MULTIPROC_DIR`` (as a supervisor of
several workers sets it): a scrape of either one shows both processes' completions."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tokenwire.testing import Scrape, read_sse_answer
from tokenwire.testing_cluster import GatewayProcess, free_port, spawn_gateway, wait_ready

CONFIG = """
[providers.sim]
kind = "sim"
ttft_ms = 0.0
itl_ms = 1.0
"""


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    """Two gateways (own data dirs and keys) sharing one metrics directory."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    config = tmp_path / "tokenwire.toml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    processes = [
        spawn_gateway(
            name,
            tmp_path,
            data_dir=tmp_path / name,
            env=env,
            args=["--config", str(config), "--metrics-port", str(free_port())],
            separate_stdout=True,
        )
        for name in ("a", "b")
    ]
    try:
        yield processes
    finally:
        for process in processes:
            process.stop()


async def test_either_process_reports_both(gateways: list[GatewayProcess]) -> None:
    """Two SSE completions on one process and three on the other: each one's /metrics (main
    port with its admin key) counts five, and its open-stream gauges sum to zero."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for gateway in gateways:
            await wait_ready(http, gateway)
        for gateway, count in zip(gateways, (2, 3), strict=True):
            key = gateway.first_keys()["api"][1]
            for i in range(count):
                async with http.post(
                    gateway.base_url + "/v1/chat/completions",
                    json={
                        "model": "sim",
                        "stream": True,
                        "messages": [{"role": "user", "content": f"hi {i}"}],
                    },
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    assert response.status == 200
                    assert (await read_sse_answer(response.content)).done
        for gateway in gateways:  # every completion of both settled first
            await settle(http, gateway)
        for gateway in gateways:
            headers = {"Authorization": f"Bearer {gateway.first_keys()['admin'][1]}"}
            async with http.get(gateway.base_url + "/metrics", headers=headers) as response:
                assert response.status == 200
                s = Scrape.parse(await response.text())
            assert s.total("tokenwire_requests_total", model="sim", outcome="completed") == 5
            assert s.total("tokenwire_ttft_seconds_count", model="sim") == 5
            assert s.total("tokenwire_upstream_attempts_total", deployment="sim/sim") == 5
            assert s.total("tokenwire_open_streams") == 0
            assert "tokenwire_ledger_queue_depth" in s.names()


async def settle(http: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    """Wait until the process's generations have all settled."""
    headers = {"Authorization": f"Bearer {gateway.first_keys()['admin'][1]}"}
    for _ in range(500):
        async with http.get(gateway.base_url + "/v1/admin/runtime", headers=headers) as response:
            if (await response.json())["live_generations"] == 0:
                return
        await asyncio.sleep(0.02)  # the polling interval
