"""``tokenwire serve --workers N``: one port, N processes, limits shared through Redis.

Each test starts a real supervisor (``python -m tokenwire.cli serve --workers 2``) on SQLite
and a Redis key prefix of its own. Requests reach a chosen worker over a keep-alive
connection: ``GET /v1/admin/runtime`` on that connection names the process that answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from websockets.asyncio.client import connect

from tokenwire.testing import FAST_SIM, paced_sim
from tokenwire.testing_services import delete_keys

REDIS_URL = "redis://127.0.0.1:6379/0"
START_DEADLINE_S = 90.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(prefix: str) -> str:
    return (
        FAST_SIM
        + paced_sim("slow", ttft_ms=0.0, itl_ms=200.0)
        + f"""
[[models]]
id = "slow-sim"
provider = "slow"
upstream_model = "sim"

[limits]
backend = "redis"
redis_url = "{REDIS_URL}"
redis_prefix = "{prefix}"

[server]
stream_backend = "redis"
"""
    )


@dataclass
class Workers:
    """A running ``serve --workers 2``: its supervisor, the keys it printed, its log."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    admin_key: str
    api_key: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> set[int]:
        return {c.pid for c in psutil.Process(self.process.pid).children()}

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.api_key}"}


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}


def _serve(tmp_path: Path, *options: str, port: int | None = None) -> list[str]:
    """``tokenwire serve`` on a data dir in ``tmp_path`` and a free port, with ``options``."""
    port = _free_port() if port is None else port
    command = [sys.executable, "-m", "tokenwire.cli", "serve", "--port", str(port)]
    return [*command, "--data-dir", str(tmp_path / "data"), *options]


def _start(tmp_path: Path, prefix: str, *options: str) -> Workers:
    config = tmp_path / "tokenwire.toml"
    config.write_text(_config(prefix))
    port = _free_port()
    log_path = tmp_path / "serve.log"
    command = _serve(tmp_path, "--config", str(config), *options, port=port)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_clean_env())
    deadline = time.monotonic() + START_DEADLINE_S
    while "listening on" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"serve --workers did not start:\n{log_path.read_text()}")
        time.sleep(0.05)  # polling the log for the supervisor's ready line
    keys = dict(re.findall(r"(admin|API) key\s+\S+\s+(tw-\S+)", log_path.read_text()))
    return Workers(process, port, log_path, keys["admin"], keys["API"])


def _stop(workers: Workers) -> None:
    if workers.process.poll() is None:
        workers.process.send_signal(signal.SIGTERM)
        try:
            workers.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in workers.worker_pids():
                os.kill(pid, signal.SIGKILL)
            workers.process.kill()
            workers.process.wait(timeout=10)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own, its keys removed at the end."""
    prefix = f"tokenwire-test-{secrets.token_hex(6)}:"
    yield prefix
    delete_keys(REDIS_URL, prefix)


@pytest.fixture
def workers(tmp_path: Path, redis_prefix: str) -> Iterator[Workers]:
    """``tokenwire serve --workers 2`` on SQLite and Redis, stopped at the end."""
    running = _start(tmp_path, redis_prefix, "--workers", "2", "--no-access-log")
    try:
        yield running
    finally:
        _stop(running)


async def _pid(session: aiohttp.ClientSession, workers: Workers) -> int:
    async with session.get(
        workers.url + "/v1/admin/runtime", headers=workers.headers(workers.admin_key)
    ) as response:
        assert response.status == 200
        return int((await response.json())["pid"])


@contextlib.asynccontextmanager
async def one_connection_per_worker(workers: Workers) -> AsyncIterator[list[aiohttp.ClientSession]]:
    """A keep-alive connection to each worker (new connections until both answered)."""
    found: dict[int, aiohttp.ClientSession] = {}
    spare: list[aiohttp.ClientSession] = []
    try:
        for _ in range(64):  # SO_REUSEPORT hashes each new connection to a worker
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
            pid = await _pid(session, workers)
            if pid in found:
                spare.append(session)
            else:
                found[pid] = session
            if len(found) == 2:
                break
        assert len(found) == 2, f"64 connections all reached {set(found)}"
        for session in found.values():
            assert await _pid(session, workers) in found  # the same connection, the same worker
        yield list(found.values())
    finally:
        for session in [*found.values(), *spare]:
            await session.close()


async def _create_key(workers: Workers, **limits: Any) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            workers.url + "/v1/admin/keys",
            json={"name": "limited", **limits},
            headers=workers.headers(workers.admin_key),
        ) as response,
    ):
        assert response.status == 201, await response.text()
        return str((await response.json())["key"])


def _body(model: str = "sim", max_tokens: int = 5) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello workers"}],
        "max_tokens": max_tokens,
        "stream": True,
    }


def test_refuses_more_than_one_worker_with_in_process_state(tmp_path: Path) -> None:
    """--workers 2 with memory limits and streams exits 1 naming both settings, creating nothing."""
    done = subprocess.run(
        _serve(tmp_path, "--workers", "2"),
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=60,
    )
    assert done.returncode == 1
    assert "limits.backend" in done.stderr and "stream_backend" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "data").exists()


async def test_workers_share_one_stream_limit(workers: Workers) -> None:
    """A key allowed one stream: while it streams on one worker, the other worker refuses a
    second (429), and admits it once the first has ended."""
    key = await _create_key(workers, max_concurrent_streams=1)
    async with one_connection_per_worker(workers) as (first, second):
        async with first.post(
            workers.url + "/v1/chat/completions",
            json=_body("slow-sim", max_tokens=50),
            headers=workers.headers(key),
        ) as streaming:
            assert streaming.status == 200
            await streaming.content.readline()  # the stream is running on the first worker
            async with second.post(
                workers.url + "/v1/chat/completions", json=_body(), headers=workers.headers(key)
            ) as refused:
                assert refused.status == 429
                assert (await refused.json())["error"]["code"] == "concurrent_streams_exceeded"
        # the first stream was closed early: its slot is released on its worker
        for _ in range(100):
            async with second.post(
                workers.url + "/v1/chat/completions", json=_body(), headers=workers.headers(key)
            ) as admitted:
                if admitted.status == 200:
                    assert (await admitted.read()).endswith(b"data: [DONE]\n\n")
                    return
            await asyncio.sleep(0.05)  # the cancelled stream releases its slot asynchronously
        raise AssertionError("the slot was never released")


async def test_workers_share_one_request_rate(workers: Workers) -> None:
    """A key allowed 3 requests a minute gets exactly 3 of 6 sent alternately to two workers."""
    key = await _create_key(workers, rpm=3)
    statuses: list[int] = []
    async with one_connection_per_worker(workers) as sessions:
        for i in range(6):
            async with sessions[i % 2].post(
                workers.url + "/v1/chat/completions", json=_body(), headers=workers.headers(key)
            ) as response:
                await response.read()
                statuses.append(response.status)
    assert sorted(statuses) == [200, 200, 200, 429, 429, 429]


async def test_tickets_issued_by_one_worker_work_on_any(workers: Workers) -> None:
    """WebSocket tickets live in Redis: 20 tickets, issued alternately by the two workers, each
    authenticate a socket on whichever worker it reaches (with tickets in process memory,
    about half would land on the other worker and be refused)."""
    tickets: list[list[str]] = []
    async with one_connection_per_worker(workers) as sessions:
        for i in range(20):
            async with sessions[i % 2].post(
                workers.url + "/v1/ws/tickets", headers=workers.headers()
            ) as response:
                assert response.status == 201
                tickets.append((await response.json())["subprotocols"])
    url = f"ws://127.0.0.1:{workers.port}/v1/ws/chat"
    for subprotocols in tickets:
        async with connect(url, subprotocols=subprotocols) as ws:  # type: ignore[arg-type]
            await ws.send(json.dumps(_body(max_tokens=2)))
            first = json.loads(await asyncio.wait_for(ws.recv(), 30))
            assert "choices" in first, first  # authenticated: it streams


def test_first_start_keys_are_printed_once(workers: Workers) -> None:
    """The supervisor creates and prints the two first-start keys; no worker prints them again."""
    log = workers.log()
    assert log.count("First start") == 1
    assert log.count(workers.admin_key) == 1 and log.count(workers.api_key) == 1


def test_sigterm_to_the_supervisor_stops_every_worker(workers: Workers) -> None:
    """SIGTERM to the supervisor reaches both workers; all exit, the supervisor with 0, and
    the workers' Prometheus directory is removed."""
    pids = workers.worker_pids()
    assert len(pids) == 2
    metrics_dirs = {_environ(pid).get("PROMETHEUS_MULTIPROC_DIR") for pid in pids}
    assert len(metrics_dirs) == 1 and None not in metrics_dirs
    (metrics_dir,) = metrics_dirs
    assert metrics_dir is not None and Path(metrics_dir).is_dir()
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(timeout=30) == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not Path(metrics_dir).exists()
    assert workers.log().count("Application shutdown complete") == 2


async def test_a_crashed_worker_is_replaced(workers: Workers) -> None:
    """A worker killed with SIGKILL is restarted; the port keeps answering meanwhile."""
    before = workers.worker_pids()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        now = workers.worker_pids()
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, workers.log()
        async with (
            aiohttp.ClientSession() as session,  # the survivor serves meanwhile
            session.get(workers.url + "/healthz") as response,
        ):
            assert response.status == 200
        await asyncio.sleep(0.2)  # the supervisor restarts it after its 1 s backoff
    assert f"(pid {victim}) exited with -9; restarting it" in workers.log()
    async with one_connection_per_worker(workers) as sessions:
        for session in sessions:
            async with session.post(
                workers.url + "/v1/chat/completions", json=_body(), headers=workers.headers()
            ) as response:
                assert response.status == 200


async def test_sighup_to_the_supervisor_restarts_every_worker_one_at_a_time(
    workers: Workers,
) -> None:
    """SIGHUP is a rolling restart: both workers are replaced, the second only after the first's
    replacement is ready, none counted as a crash, and the port answers all along."""
    before = workers.worker_pids()
    assert len(before) == 2
    workers.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while True:
            now = workers.worker_pids()
            if len(now) == 2 and not now & before:
                break
            assert time.monotonic() < deadline, workers.log()
            async with session.get(workers.url + "/healthz") as response:
                assert response.status == 200  # a worker always serves the port
            await asyncio.sleep(0.2)  # polling the process table for the replacements
    log = workers.log()
    assert workers.process.poll() is None  # the supervisor goes on
    assert log.count("rolling restart: worker") == 2
    first, second = (log.index(f"rolling restart: worker {i}") for i in (0, 1))
    assert log.count("drained and exited; starting it again") == 2
    assert log.index("drained and exited; starting it again", first) < second
    assert "restarting it in" not in log  # no crash backoff
    async with one_connection_per_worker(workers) as sessions:
        for session in sessions:
            async with session.post(
                workers.url + "/v1/chat/completions", json=_body(), headers=workers.headers()
            ) as response:
                assert response.status == 200


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path, redis_prefix: str) -> None:
    """Workers that fail at start-up (their Redis is unreachable) make the supervisor exit 1."""
    config = tmp_path / "tokenwire.toml"
    config.write_text(_config(redis_prefix).replace(REDIS_URL, "redis://127.0.0.1:1/0"))
    done = subprocess.run(
        _serve(tmp_path, "--workers", "2", "--config", str(config)),
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "before it was ready" in done.stdout + done.stderr


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(): v.decode(errors="replace") for k, _, v in pairs}
