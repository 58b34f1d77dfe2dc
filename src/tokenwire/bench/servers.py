"""Server subprocesses: ``tokenwire sim-upstream`` and the gateway, started, checked, stopped.

Each server runs in its own session (a Ctrl-C reaches only the bench, which then stops them),
with ``TOKENWIRE_*`` variables removed from its environment, its output in a log file in the
temp dir, and is stopped by its own PID: SIGTERM, then SIGKILL after 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from tokenwire.bench.errors import ServerStartFailed
from tokenwire.bench.options import (
    DEFAULT_MODEL,
    DEFAULT_REDIS_URL,
    UPSTREAM_MODEL,
    BenchOptions,
    Scenario,
    base_url,
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tokenwire_argv() -> list[str]:
    """How to run the ``tokenwire`` CLI of this interpreter (no pyenv shim, so PIDs are real)."""
    script = Path(sys.executable).parent / "tokenwire"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "tokenwire.cli"]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without any ``TOKENWIRE_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}
    return {**env, **(extra or {})}


class ServerProcess:
    """One server subprocess with its output in a log file; stopped by its own PID."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env or {}
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise ServerStartFailed(f"{self.name} was never started")
        return self._popen.pid

    def start(self) -> None:
        """Start the process in its own session."""
        with self.log_path.open("wb") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=clean_env(self.env),
                start_new_session=True,
            )

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return None if self._popen is None else self._popen.poll()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the process's output."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        popen = self._popen
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=5)


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout_s: float = 2.0
) -> tuple[int, bytes]:
    """GET ``url``: (status, body), or (0, b"") when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def wait_until(check: Callable[[], bool], server: ServerProcess, what: str, limit_s: float) -> None:
    """Poll ``check`` every 50 ms until it is true; fail if the server dies or time runs out."""
    deadline = time.monotonic() + limit_s
    while not check():
        code = server.exited()
        if code is not None:
            raise ServerStartFailed(f"{server.name} exited ({code}):\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise ServerStartFailed(
                f"{server.name}: {what} not ready after {limit_s:g} s:\n{server.log_tail()}"
            )
        time.sleep(0.05)


def redis_url(opts: BenchOptions) -> str | None:
    """Where the started gateway keeps limits and streams: ``--redis``, or the default Redis
    when ``--workers`` > 1 (its processes must share them); None: in process memory."""
    if opts.redis_url is not None:
        return opts.redis_url
    return DEFAULT_REDIS_URL if opts.workers > 1 else None


def gateway_config(upstream: str, opts: BenchOptions, redis_prefix: str = "") -> str:
    """TOML laid over the defaults: model ``proxied-sim`` served by sim-upstream over HTTP.

    The per-socket request cap is raised to ``--mux-streams-per-socket`` when that is larger,
    and permessage-deflate follows ``--ws-compression``. With Redis (:func:`redis_url`),
    limits and resumable streams live there under ``redis_prefix``.
    """
    max_concurrent = max(32, opts.mux_streams_per_socket)
    deflate = "true" if opts.ws_compression else "false"
    url = redis_url(opts)
    shared = (
        ""
        if url is None
        else f"""stream_backend = "redis"

[limits]
backend = "redis"
redis_url = "{url}"
redis_prefix = "{redis_prefix}"
"""
    )
    return f"""
[server]
ws_max_concurrent_requests = {max_concurrent}
ws_per_message_deflate = {deflate}
{shared}
[providers.upstream]
kind = "openai"
base_url = "{upstream}/v1"

[[models]]
id = "{DEFAULT_MODEL}"
provider = "upstream"
upstream_model = "{UPSTREAM_MODEL}"
"""


def stream_limit(opts: BenchOptions) -> int:
    """The ``--max-streams`` of the key bench makes: twice the highest concurrency.

    The in-process limiter counts a key's stream slots only when the key has a limit, so the
    key gets one, and it must never refuse a request of the run. Each user has one stream open
    at a time and the gateway frees a slot before the client sees the stream end, so the
    concurrency itself would do; twice it leaves room for streams a client gave up on
    (``--timeout-s``) that the gateway has not cancelled yet.
    """
    return 2 * max(opts.concurrency)


def create_key(
    config: Path,
    data_dir: Path,
    *,
    name: str = "bench",
    admin: bool = False,
    max_streams: int | None = None,
) -> str:
    """``tokenwire keys create``; the key is the last line it prints."""
    argv = [*tokenwire_argv(), "keys", "create", "--name", name]
    if admin:
        argv.append("--admin")
    if max_streams is not None:
        argv += ["--max-streams", str(max_streams)]
    argv += ["--config", str(config), "--data-dir", str(data_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), check=False)
    if done.returncode != 0:
        raise ServerStartFailed(f"tokenwire keys create failed:\n{done.stdout}{done.stderr}")
    return done.stdout.strip().splitlines()[-1].strip()


def gateway_ready(base: str, key: str, model: str) -> bool:
    """``/v1/models`` answers 200 and lists ``model`` as available."""
    status, body = http_get(base + "/v1/models", {"Authorization": f"Bearer {key}"})
    if status != 200:
        return False
    try:
        models = msgspec.json.decode(body).get("data", [])
    except (msgspec.DecodeError, AttributeError):
        return False
    return any(m.get("id") == model and m.get("available", True) for m in models)


@dataclass(slots=True)
class Endpoints:
    """What the rows talk to, and which processes the bench may sample."""

    mode: str  # "started" | "target"
    gateway_url: str
    key: str
    model: str
    upstream_url: str | None
    gateway_pid: int | None
    upstream_pid: int | None
    passthrough_url: str | None = None  # the bare scenario's server, when bench started one
    passthrough_pid: int | None = None
    gateway_children: bool = False  # sample the gateway's child processes too (granian)
    admin_key: str | None = None  # reads GET /v1/admin/runtime (leak accounting)
    key_max_streams: int | None = None  # the stream limit of the key bench made
    shared_state: str | None = None  # started gateway: "memory" or "redis"
    notes: list[str] = field(default_factory=list)


class ServerStack:
    """The servers one run started (possibly none), stopped together."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[ServerProcess] = []
        self.redis_prefix = f"tokenwire-bench-{secrets.token_hex(6)}:"
        self._redis_url: str | None = None  # keys under redis_prefix are removed at the end

    def _start_ready(self, name: str, argv: list[str], port: int, ready_path: str) -> ServerProcess:
        """Start ``argv`` (listening on ``port``) and wait until ``GET ready_path`` is 200."""
        server = ServerProcess(name, argv, self.workdir / f"{name}.log")
        server.start()
        self.servers.append(server)
        url = f"http://127.0.0.1:{port}{ready_path}"
        wait_until(lambda: http_get(url)[0] == 200, server, ready_path, 30)
        return server

    def start_upstream(self, opts: BenchOptions) -> ServerProcess:
        """``tokenwire sim-upstream`` on a free port, once ``/v1/models`` answers."""
        port = free_port()
        argv = [*tokenwire_argv(), "sim-upstream", "--port", str(port)]
        argv += ["--ttft-ms", str(opts.ttft_ms), "--itl-ms", str(opts.itl_ms)]
        return self._start_ready("sim-upstream", argv, port, "/v1/models")

    def start_gateway(
        self, upstream: str, opts: BenchOptions
    ) -> tuple[ServerProcess, str, str, str]:
        """Write the config, create the keys, start the gateway.

        Returns (process, base URL, API key, admin key). The API key has a stream limit
        (:func:`stream_limit`) so that its stream slots are counted; the admin key reads
        ``GET /v1/admin/runtime``.
        """
        config = self.workdir / "gateway.toml"
        config.write_text(gateway_config(upstream, opts, self.redis_prefix))
        self._redis_url = redis_url(opts)
        data_dir = self.workdir / "data"
        key = create_key(config, data_dir, max_streams=stream_limit(opts))
        admin_key = create_key(config, data_dir, name="bench-admin", admin=True)
        port = free_port()
        env: dict[str, str] = {}
        if opts.gateway_server == "granian":
            if shutil.which("granian") is None and not _module_exists("granian"):
                raise ServerStartFailed("--gateway-server granian: pip install granian")
            env = {"TOKENWIRE_CONFIG": str(config), "TOKENWIRE_DATA_DIR": str(data_dir)}
            argv = [sys.executable, "-m", "granian", "--interface", "asgi", "--factory"]
            argv += ["--loop", "uvloop", "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--backlog", "4096", "--workers", str(opts.workers)]
            argv += ["tokenwire.app:app_from_env"]
        else:
            argv = [*tokenwire_argv(), "serve", "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--config", str(config), "--data-dir", str(data_dir), "--no-access-log"]
            argv += ["--workers", str(opts.workers)]
        server = ServerProcess("gateway", argv, self.workdir / "gateway.log", env)
        server.start()
        self.servers.append(server)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: gateway_ready(url, key, DEFAULT_MODEL), server, "/v1/models", limit_s=60)
        return server, url, key, admin_key

    def start_passthrough(self, upstream_url: str) -> ServerProcess:
        """The ``bare`` row's pass-through (:mod:`tokenwire.bench.passthrough`) in front of
        ``upstream_url``, once it answers."""
        port = free_port()
        argv = [sys.executable, "-m", "tokenwire.bench.passthrough", "--port", str(port)]
        argv += ["--upstream", upstream_url]
        return self._start_ready("passthrough", argv, port, "/")

    def start(self, opts: BenchOptions) -> Endpoints:
        """Start what ``opts`` needs: both servers, or an upstream for a target's direct row;
        and the pass-through of the ``bare`` rows, in front of the same upstream."""
        endpoints = self._start_servers(opts)
        if Scenario.BARE in opts.scenarios and endpoints.upstream_url is not None:
            passthrough = self.start_passthrough(endpoints.upstream_url)
            endpoints.passthrough_url = f"http://127.0.0.1:{_port_of(passthrough)}"
            endpoints.passthrough_pid = passthrough.pid
        return endpoints

    def _start_servers(self, opts: BenchOptions) -> Endpoints:
        if opts.target is None:
            upstream = self.start_upstream(opts)
            upstream_url = f"http://127.0.0.1:{_port_of(upstream)}"
            gateway, url, key, admin_key = self.start_gateway(upstream_url, opts)
            started = Endpoints(
                mode="started",
                gateway_url=url,
                key=key,
                model=DEFAULT_MODEL,
                upstream_url=upstream_url,
                gateway_pid=gateway.pid,
                upstream_pid=upstream.pid,
                gateway_children=opts.gateway_server == "granian" or opts.workers > 1,
                admin_key=admin_key,
                key_max_streams=stream_limit(opts),
                shared_state="memory" if redis_url(opts) is None else "redis",
            )
            if opts.workers > 1:  # GET /v1/admin/runtime counts the one process that answers
                started.admin_key = None
                started.notes.append(
                    f"leak accounting skipped: {opts.workers} gateway workers, and "
                    "GET /v1/admin/runtime counts only the worker that answers; CPU and RSS "
                    "are the supervisor's and all workers' together"
                )
            return started
        endpoints = Endpoints(
            mode="target",
            gateway_url=base_url(opts.target),
            key=opts.key or "",
            model=opts.model,
            upstream_url=None if opts.upstream is None else base_url(opts.upstream),
            gateway_pid=opts.target_pid,
            upstream_pid=None,
            admin_key=opts.admin_key,
        )
        if opts.start_upstream:
            upstream = self.start_upstream(opts)
            endpoints.upstream_url = f"http://127.0.0.1:{_port_of(upstream)}"
            endpoints.upstream_pid = upstream.pid
            endpoints.notes.append(
                "direct row: a sim-upstream started by bench, not necessarily the one the "
                "target is configured against"
            )
        elif opts.upstream is None:
            endpoints.notes.append(
                "direct row skipped: --target without --upstream (or --start-upstream), so "
                "there is no baseline and no overhead figures"
            )
        else:
            endpoints.notes.append(
                "direct row: --upstream as given; --ttft-ms/--itl-ms describe it only if it "
                "was started with them"
            )
        if opts.target_pid is None:
            endpoints.notes.append("server CPU and RSS not sampled: no --target-pid")
        if opts.admin_key is None:
            endpoints.notes.append(
                "leak accounting skipped: no --admin-key to read GET /v1/admin/runtime"
            )
        return endpoints

    def stop(self) -> None:
        """Stop every server started, last first; remove the run's Redis keys."""
        for server in reversed(self.servers):
            server.stop()
        if self._redis_url is not None:
            from tokenwire.testing_services import delete_keys

            with contextlib.suppress(Exception):  # the keys expire anyway; never fail the run
                delete_keys(self._redis_url, self.redis_prefix)


def _port_of(server: ServerProcess) -> int:
    return int(server.argv[server.argv.index("--port") + 1])


def _module_exists(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


class Profiler:
    """``py-spy record`` on the gateway (GIL holder only, non-blocking) while rows run."""

    def __init__(self, pid: int, path: Path, *, subprocesses: bool = False) -> None:
        self.pid = pid
        self.path = path
        self.subprocesses = subprocesses
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> str | None:
        """Start py-spy; a note (why not) when it is not installed."""
        exe = shutil.which("py-spy")
        if exe is None:
            return "py-spy not found (pip install py-spy): no profile written"
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(self.path.suffix, "raw")
        argv = [exe, "record", "--pid", str(self.pid), "--output", str(self.path)]
        argv += ["--format", fmt, "--gil", "--nonblocking", "--rate", "200"]
        if self.subprocesses:
            argv.append("--subprocesses")
        self._process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, start_new_session=True
        )
        return None

    async def stop(self) -> None:
        """Stop py-spy with SIGINT so it writes its output."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
