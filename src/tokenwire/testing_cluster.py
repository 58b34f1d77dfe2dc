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
import contextlib
import os
import re
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
_FIRST_KEYS = re.compile(r"(admin key|API key)\s+(key_\w+)\s+(tw-\S+)")  # serve's first start


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
    """One ``tokenwire serve`` process: its log (stderr) in ``log_path``, and its stdout there
    too unless it was given a file of its own (``stdout_path``)."""

    name: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    stdout_path: Path | None = None

    @property
    def base_url(self) -> str:
        return loopback_urls(self.port)[0]

    @property
    def ws_url(self) -> str:
        return loopback_urls(self.port)[1]

    def first_keys(self) -> dict[str, tuple[str, str]]:
        """The keys a first start printed on stdout: ``{"admin": (id, key), "api": (id, key)}``
        (needs ``separate_stdout``; empty when the database already had keys)."""
        assert self.stdout_path is not None, "spawned without separate_stdout"
        found = _FIRST_KEYS.findall(self.stdout_path.read_text(errors="replace"))
        return {"admin" if role == "admin key" else "api": (i, k) for role, i, k in found}

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
        return spawn_gateway(
            f"gw{index}",
            self.root,
            data_dir=data_dir,
            env=self.env,
            args=["--config", str(config), "--no-access-log", *args],
        )

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


def spawn_gateway(
    name: str,
    root: Path,
    *,
    data_dir: Path,
    env: dict[str, str],
    args: list[str] | tuple[str, ...] = (),
    port: int | None = None,
    separate_stdout: bool = False,
) -> GatewayProcess:
    """Start ``tokenwire serve --port P --data-dir D ARGS`` with ``env``; its log goes to
    ``root/<name>.log`` (with its stdout, unless ``separate_stdout``: ``root/<name>.out``).
    Wait for it with :func:`wait_ready`."""
    port = free_port() if port is None else port
    log_path = root / f"{name}.log"
    stdout_path = root / f"{name}.out" if separate_stdout else None
    command = [
        sys.executable,
        "-m",
        "tokenwire.cli",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        *args,
    ]
    with contextlib.ExitStack() as files:
        log = files.enter_context(log_path.open("wb"))
        out = log if stdout_path is None else files.enter_context(stdout_path.open("wb"))
        stderr = subprocess.STDOUT if stdout_path is None else log
        process = subprocess.Popen(command, env=env, stdout=out, stderr=stderr)
    return GatewayProcess(name, port, log_path, process, stdout_path)


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
