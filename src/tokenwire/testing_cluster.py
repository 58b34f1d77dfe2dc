"""Test helpers: several real ``tokenwire serve`` processes sharing PostgreSQL and Redis.

A :class:`Cluster` owns a fresh PostgreSQL database, a Redis key prefix of its own and a
server secret; :meth:`Cluster.start` writes a config and starts gateway processes on free
ports (each with its own data dir), waiting until each answers ``/healthz``. Tests use it to
check what must hold across processes: one rate limit, one balance, resumable streams.
Fault tests that break the database or Redis under the processes give the cluster a
database on a private server and a private Redis URL instead (``testing_services``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tokenwire.accounting.keys import KeyRecord, KeyStore, load_server_secret
from tokenwire.storage.engine import make_engine, migrate

STARTUP_DEADLINE_S = 60.0


class ClusterError(RuntimeError):
    """A gateway process would not start (its log is in the message)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loopback_urls(port: int) -> tuple[str, str]:
    """The base URL and the WebSocket chat URL of a gateway (or a proxy) on 127.0.0.1."""
    return f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/ws/chat"


@dataclass
class GatewayProcess:
    """One ``tokenwire serve`` process."""

    name: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return loopback_urls(self.port)[0]

    @property
    def ws_url(self) -> str:
        return loopback_urls(self.port)[1]

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@dataclass
class Cluster:
    """A fresh PostgreSQL database and Redis prefix, and the gateway processes on them."""

    root: Path
    database_url: str
    redis_prefix: str
    secret: str
    processes: list[GatewayProcess] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}
        environ["TOKENWIRE_DATABASE_URL"] = self.database_url
        environ["TOKENWIRE_SECRET"] = self.secret
        # a test's end (SIGTERM) drains for 2 s at most; `serve --drain-timeout` overrides it
        environ["TOKENWIRE_DRAIN_TIMEOUT"] = "2"
        return environ

    def keystore(self, engine: Any) -> KeyStore:
        return KeyStore(engine, load_server_secret(self.root, {"TOKENWIRE_SECRET": self.secret}))

    async def create_key(self, name: str, **options: Any) -> tuple[KeyRecord, str]:
        engine = make_engine(self.database_url)
        try:
            await migrate(engine)
            return await self.keystore(engine).create(name, **options)
        finally:
            await engine.dispose()

    def spawn(self, index: int, config: Path, args: tuple[str, ...] = ()) -> GatewayProcess:
        """Start one ``tokenwire serve`` process (``args``: more options) with its own data dir
        and port."""
        data_dir = self.root / f"data-{index}"
        data_dir.mkdir()
        port = free_port()
        log_path = self.root / f"gateway-{index}.log"
        command = [
            sys.executable,
            "-m",
            "tokenwire.cli",
            "serve",
            "--port",
            str(port),
            "--config",
            str(config),
            "--data-dir",
            str(data_dir),
            "--no-access-log",
            *args,
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return GatewayProcess(f"gw{index}", port, log_path, process)

    async def start(
        self, config_text: str, count: int = 2, args: tuple[str, ...] = ()
    ) -> list[GatewayProcess]:
        """Start ``count`` processes on ``config_text`` (``args``: more ``serve`` options) and
        wait until each is ready."""
        config = self.root / "tokenwire.toml"
        config.write_text(config_text)
        for i in range(count):
            self.processes.append(self.spawn(i, config, args))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for gateway in self.processes:
                await wait_ready(session, gateway)
        return self.processes

    def stop(self) -> None:
        for gateway in self.processes:
            gateway.stop()


async def wait_ready(session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    """Poll ``/healthz`` until it answers 200; raise with the process log if it never does."""
    end = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < end:
        if gateway.process.poll() is not None:
            raise ClusterError(
                f"{gateway.name} exited with {gateway.process.returncode}:\n{gateway.log_tail()}"
            )
        try:
            async with session.get(gateway.base_url + "/healthz") as resp:
                if resp.status == 200 and (await resp.json())["status"] == "ok":
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)  # the polling interval
    raise ClusterError(
        f"{gateway.name} not ready within {STARTUP_DEADLINE_S} s:\n{gateway.log_tail()}"
    )
