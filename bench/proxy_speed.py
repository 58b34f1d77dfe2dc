#!/usr/bin/env python
"""Gateway overhead benchmark: streamed completions via ``tokenwire serve`` vs. direct upstream.

Acceptance criterion checked here: N concurrent streams of T tokens (defaults 200 x 50 at 20 ms
per token) through the gateway in front of ``tokenwire sim-upstream`` deliver at least 90 % of
the tokens/s that the same load gets directly from ``sim-upstream``, with a TTFT p50 no more than
10 ms above direct.

It starts ``tokenwire sim-upstream`` and ``tokenwire serve`` as subprocesses (temporary data dir,
free ports, access log off), creates a key with ``tokenwire keys create``, and drives both with
one aiohttp client, alternating rows direct → gateway → direct → gateway. Metric definitions
follow ``shared/design/benchmark-method.md`` (vLLM ``bench serve``): TTFT, ITL, TPOT, E2E,
throughput; gateway overhead = gateway - direct, per percentile, per round; medians over rounds.

Run ``python bench/proxy_speed.py --help``; see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import msgspec
import psutil  # type: ignore[import-untyped, unused-ignore]
from rich.console import Console
from rich.table import Table

from tokenwire.providers.sim import plan
from tokenwire.wire.schema import decode_chat_request

DIRECT = "direct"
GATEWAY = "gateway"
UPSTREAM = "upstream"
GATEWAY_MODEL = "proxied-sim"
UPSTREAM_MODEL = "sim"
MIB = 1024 * 1024


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """The command-line options."""

    concurrency: int
    tokens: int
    itl_ms: float
    ttft_ms: float
    rounds: int
    requests_per_user: int
    warmup_rounds: int
    pause_s: float
    timeout_s: float
    no_keepalive: bool
    min_ratio: float
    max_ttft_overhead_ms: float
    json_path: Path | None
    profile_path: Path | None
    keep_temp: bool
    gateway_server: str
    ramp_s: float


def parse_options(argv: list[str] | None = None) -> Options:
    """Parse the command line into :class:`Options`."""
    p = argparse.ArgumentParser(
        description="Streaming throughput and TTFT: through tokenwire vs. direct to sim-upstream."
    )
    p.add_argument("--concurrency", type=int, default=200, help="simultaneous users (streams)")
    p.add_argument("--tokens", type=int, default=50, help="max_tokens per request")
    p.add_argument("--itl-ms", type=float, default=20.0, help="sim-upstream delay between tokens")
    p.add_argument("--ttft-ms", type=float, default=20.0, help="sim-upstream first-token delay")
    p.add_argument("--rounds", type=int, default=3, help="measured direct+gateway row pairs")
    p.add_argument("--requests-per-user", type=int, default=1, help="sequential requests per user")
    p.add_argument("--warmup-rounds", type=int, default=1, help="unrecorded pairs first")
    p.add_argument("--pause-s", type=float, default=0.5, help="idle time between rows")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per-request read timeout")
    p.add_argument(
        "--no-keepalive", action="store_true", help="a new client connection per request"
    )
    p.add_argument("--min-ratio", type=float, default=0.90, help="pass: gateway/direct tok/s")
    p.add_argument(
        "--max-ttft-overhead-ms", type=float, default=10.0, help="pass: TTFT p50 overhead"
    )
    p.add_argument("--json", dest="json_path", type=Path, help="write all results here")
    p.add_argument(
        "--profile",
        dest="profile_path",
        type=Path,
        help="py-spy record the gateway during the measured rounds (.svg, .json or .txt)",
    )
    p.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs, db)")
    p.add_argument(
        "--ramp-s",
        type=float,
        default=0.0,
        help="spread user start times evenly over this many seconds (0: all at once, a burst)",
    )
    p.add_argument(
        "--gateway-server",
        choices=["uvicorn", "granian"],
        default="uvicorn",
        help="run the gateway under tokenwire serve (uvicorn) or granian (pip install granian)",
    )
    ns = p.parse_args(argv)
    if ns.concurrency < 1 or ns.tokens < 2 or ns.rounds < 1 or ns.requests_per_user < 1:
        p.error("need concurrency >= 1, tokens >= 2, rounds >= 1, requests-per-user >= 1")
    return Options(**vars(ns))


# --- server subprocesses ---------------------------------------------------------------------


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
    return [sys.executable, "-c", "from tokenwire.cli.main import app; app()"]


def clean_env() -> dict[str, str]:
    """This environment without any ``TOKENWIRE_*`` variable, so only our flags count."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}


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
        assert self._popen is not None
        return self._popen.pid

    def start(self) -> None:
        """Start the process in its own session (so a Ctrl-C reaches only us; we stop it)."""
        with self.log_path.open("wb") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**clean_env(), **self.env},
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


def http_status(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET ``url``: (status, body), or (0, b"") when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
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
            raise RuntimeError(f"{server.name} exited ({code}):\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name}: {what} not ready after {limit_s:g} s")
        time.sleep(0.05)


def start_upstream(
    opts: Options, workdir: Path, servers: list[ServerProcess]
) -> tuple[ServerProcess, str]:
    """Start ``tokenwire sim-upstream`` (added to ``servers``); return it and its URL once up."""
    port = free_port()
    argv = [
        *tokenwire_argv(),
        "sim-upstream",
        "--port",
        str(port),
        "--ttft-ms",
        str(opts.ttft_ms),
        "--itl-ms",
        str(opts.itl_ms),
    ]
    server = ServerProcess("sim-upstream", argv, workdir / "sim-upstream.log")
    server.start()
    servers.append(server)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_status(base + "/v1/models")[0] == 200, server, "/v1/models", 30)
    return server, base


def gateway_config(upstream_base: str) -> str:
    """TOML laid over the defaults: model ``proxied-sim`` served by sim-upstream over HTTP."""
    return f"""
[providers.upstream]
kind = "openai"
base_url = "{upstream_base}/v1"

[[models]]
id = "{GATEWAY_MODEL}"
provider = "upstream"
upstream_model = "{UPSTREAM_MODEL}"
"""


def create_key(config: Path, data_dir: Path) -> str:
    """``tokenwire keys create``; the key is the last line it prints."""
    argv = [*tokenwire_argv(), "keys", "create", "--name", "bench"]
    argv += ["--config", str(config), "--data-dir", str(data_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tokenwire keys create failed:\n{done.stdout}{done.stderr}")
    return done.stdout.strip().splitlines()[-1].strip()


def gateway_ready(base: str, key: str) -> bool:
    """``/healthz`` answers 200 and ``/v1/models`` lists ``proxied-sim`` as available."""
    if http_status(base + "/healthz")[0] != 200:
        return False
    status, body = http_status(base + "/v1/models", {"Authorization": f"Bearer {key}"})
    if status != 200:
        return False
    models = msgspec.json.decode(body).get("data", [])
    return any(m.get("id") == GATEWAY_MODEL and m.get("available") for m in models)


def start_gateway(
    upstream_base: str, workdir: Path, servers: list[ServerProcess], server_kind: str = "uvicorn"
) -> tuple[ServerProcess, str, str]:
    """Write the config, create a key, start the gateway (added to ``servers``)."""
    config = workdir / "gateway.toml"
    config.write_text(gateway_config(upstream_base))
    data_dir = workdir / "data"
    key = create_key(config, data_dir)
    port = free_port()
    env: dict[str, str] = {}
    if server_kind == "granian":
        env = {"TOKENWIRE_CONFIG": str(config), "TOKENWIRE_DATA_DIR": str(data_dir)}
        argv = [sys.executable, "-m", "granian", "--interface", "asgi", "--factory"]
        argv += ["--loop", "uvloop", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--backlog", "4096", "tokenwire.app:app_from_env"]
    else:
        argv = [*tokenwire_argv(), "serve", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--config", str(config), "--data-dir", str(data_dir), "--no-access-log"]
    server = ServerProcess("gateway", argv, workdir / "gateway.log", env)
    server.start()
    servers.append(server)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: gateway_ready(base, key), server, "/healthz + /v1/models", 60)
    return server, base, key


def install_signal_exit() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks stop the servers."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# --- the load --------------------------------------------------------------------------------


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


@dataclass(frozen=True, slots=True)
class Target:
    """Where a row sends its requests."""

    name: str
    url: str
    model: str
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """A prepared request: its body and the text the simulator will answer."""

    body: bytes
    expected: str


@dataclass(slots=True)
class RequestResult:
    """What one streamed request saw, with ``perf_counter`` stamps."""

    expected: str
    sent: float = 0.0
    ended: float = 0.0
    stamps: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    reads: int = 0
    finish: str | None = None
    usage_tokens: int | None = None
    done: bool = False
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def output_tokens(self) -> int:
        """Tokens delivered: the usage figure, else one per content chunk."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.stamps)


def build_specs(opts: Options, model: str) -> list[list[RequestSpec]]:
    """Per user, per request: the body and the simulator's exact expected text."""
    users: list[list[RequestSpec]] = []
    for user in range(opts.concurrency):
        specs = []
        for index in range(opts.requests_per_user):
            body = msgspec.json.encode(
                {
                    "model": model,
                    "messages": [
                        {"role": "user", "content": f"proxy bench user {user} request {index}"}
                    ],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "max_tokens": opts.tokens,
                }
            )
            specs.append(RequestSpec(body, plan(decode_chat_request(body)).text))
        users.append(specs)
    return users


def handle_line(line: bytes, now: float, result: RequestResult) -> None:
    """Apply one SSE line (``data: {...}`` or ``data: [DONE]``) to ``result``."""
    if not line.startswith(b"data:"):
        return  # blank separators, id: lines, : pings
    payload = line[5:].strip()
    if payload == b"[DONE]":
        result.done = True
        return
    chunk = _decode_chunk(payload)
    if chunk.error is not None:
        result.error = f"in-band error: {chunk.error.get('message', chunk.error)}"
    for choice in chunk.choices:
        delta = choice.delta
        if delta is not None and delta.content:
            result.stamps.append(now)
            result.pieces.append(delta.content)
        if choice.finish_reason:
            result.finish = choice.finish_reason
    if chunk.usage is not None:
        result.usage_tokens = chunk.usage.completion_tokens


async def consume_stream(response: aiohttp.ClientResponse, result: RequestResult) -> None:
    """Read the SSE body as it arrives, split it into lines, stamp each read."""
    buffer = b""
    perf_counter = time.perf_counter
    async for data in response.content.iter_any():
        now = perf_counter()
        result.reads += 1
        *lines, buffer = (buffer + data).split(b"\n")
        for line in lines:
            handle_line(line, now, result)
    if buffer.strip():
        handle_line(buffer, time.perf_counter(), result)


async def stream_one(
    session: aiohttp.ClientSession, target: Target, spec: RequestSpec
) -> RequestResult:
    """Send one streamed completion and record its timeline; never raises."""
    result = RequestResult(expected=spec.expected)
    result.sent = time.perf_counter()
    try:
        async with session.post(target.url, data=spec.body, headers=target.headers) as response:
            if response.status != 200:
                body = await response.read()
                result.error = f"HTTP {response.status}: {body[:200].decode(errors='replace')}"
            else:
                await consume_stream(response, result)
    except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.ended = time.perf_counter()
    return result


async def run_user(
    session: aiohttp.ClientSession, target: Target, specs: list[RequestSpec], delay_s: float = 0.0
) -> list[RequestResult]:
    """One user: starts after ``delay_s``, then its requests one after another."""
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    return [await stream_one(session, target, spec) for spec in specs]


# --- resources -------------------------------------------------------------------------------


@dataclass(slots=True)
class ResourceUsage:
    """CPU seconds and peak RSS per watched process over one row."""

    cpu_s: dict[str, float] = field(default_factory=dict)
    max_rss_mib: dict[str, float] = field(default_factory=dict)
    host_cpu_percent: float = 0.0


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of ``process`` so far (0 if it is gone)."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def rss_mib(process: psutil.Process) -> float:
    """Resident memory of ``process`` in MiB (0 if it is gone)."""
    try:
        return float(process.memory_info().rss) / MIB
    except psutil.Error:
        return 0.0


@contextlib.asynccontextmanager
async def measure_resources(
    processes: dict[str, psutil.Process], interval_s: float = 0.1
) -> AsyncIterator[ResourceUsage]:
    """CPU seconds used and RSS peak (sampled every ``interval_s``) while the block runs."""
    usage = ResourceUsage()
    before = {name: cpu_seconds(p) for name, p in processes.items()}
    usage.max_rss_mib = {name: rss_mib(p) for name, p in processes.items()}
    psutil.cpu_percent(interval=None)

    async def sample() -> None:
        while True:
            await asyncio.sleep(interval_s)
            for name, p in processes.items():
                usage.max_rss_mib[name] = max(usage.max_rss_mib[name], rss_mib(p))

    sampler = asyncio.get_running_loop().create_task(sample())
    try:
        yield usage
    finally:
        sampler.cancel()
        usage.host_cpu_percent = float(psutil.cpu_percent(interval=None))
        usage.cpu_s = {name: cpu_seconds(p) - before[name] for name, p in processes.items()}


# --- metrics ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dist:
    """Percentiles and mean of a sample, in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    count: int


def percentile(ordered: list[float], q: float) -> float:
    """The ``q``-th percentile of sorted data, linear interpolation (numpy's default)."""
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def dist_ms(seconds: list[float]) -> Dist:
    """:class:`Dist` of durations given in seconds."""
    ordered = sorted(s * 1000 for s in seconds)
    mean = statistics.fmean(ordered) if ordered else math.nan
    return Dist(
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p99=percentile(ordered, 99),
        mean=mean,
        count=len(ordered),
    )


def problem(result: RequestResult, tokens: int) -> tuple[str, str] | None:
    """``("error"|"wrong", reason)`` for a failed or incorrect request, else None."""
    if result.error is not None:
        return "error", result.error
    if not result.done:
        return "error", "stream ended without data: [DONE]"
    if result.text != result.expected:
        return "wrong", f"text differs after {len(result.stamps)} chunks"
    if result.finish != "length":
        return "wrong", f"finish_reason {result.finish!r}, expected 'length'"
    if result.usage_tokens != tokens:
        return "wrong", f"usage.completion_tokens {result.usage_tokens}, expected {tokens}"
    return None


@dataclass(slots=True)
class RowReport:
    """Everything measured for one row (one target, one round)."""

    round: int
    target: str
    requests: int
    errors: int
    wrong: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    ttft: Dist
    itl: Dist
    tpot: Dist
    e2e: Dist
    chunks_per_read: float
    resources: ResourceUsage
    cpu_s_per_1k_tokens: dict[str, float]
    problems: list[str]


def timings(results: list[RequestResult]) -> tuple[list[float], ...]:
    """TTFT, ITL (pooled), TPOT and E2E samples in seconds, from requests that streamed."""
    ttft: list[float] = []
    itl: list[float] = []
    tpot: list[float] = []
    e2e: list[float] = []
    for r in results:
        if r.error is not None or not r.stamps:
            continue
        first, last = r.stamps[0] - r.sent, r.stamps[-1] - r.sent
        ttft.append(first)
        e2e.append(last)
        itl.extend(b - a for a, b in zip(r.stamps, r.stamps[1:], strict=False))
        if len(r.stamps) > 1:
            tpot.append((last - first) / (r.output_tokens - 1 or 1))
    return ttft, itl, tpot, e2e


def build_row(
    round_no: int,
    target: str,
    results: list[RequestResult],
    wall_s: float,
    usage: ResourceUsage,
    tokens: int,
) -> RowReport:
    """Aggregate one row's request results."""
    found = [p for p in (problem(r, tokens) for r in results) if p is not None]
    output = sum(r.output_tokens for r in results if r.error is None)
    ttft, itl, tpot, e2e = timings(results)
    chunks = sum(len(r.stamps) for r in results)
    reads = sum(r.reads for r in results)
    per_1k = {k: v / output * 1000 if output else math.nan for k, v in usage.cpu_s.items()}
    return RowReport(
        round=round_no,
        target=target,
        requests=len(results),
        errors=sum(1 for kind, _ in found if kind == "error"),
        wrong=sum(1 for kind, _ in found if kind == "wrong"),
        output_tokens=output,
        wall_s=wall_s,
        tokens_per_s=output / wall_s,
        requests_per_s=len(results) / wall_s,
        ttft=dist_ms(ttft),
        itl=dist_ms(itl),
        tpot=dist_ms(tpot),
        e2e=dist_ms(e2e),
        chunks_per_read=chunks / reads if reads else math.nan,
        resources=usage,
        cpu_s_per_1k_tokens=per_1k,
        problems=sorted({reason for _, reason in found})[:5],
    )


# --- running rows ----------------------------------------------------------------------------


@dataclass(slots=True)
class Bench:
    """The servers' addresses and processes, and the prepared requests."""

    opts: Options
    targets: dict[str, Target]
    specs: dict[str, list[list[RequestSpec]]]
    processes: dict[str, psutil.Process]


async def run_row(
    bench: Bench, session: aiohttp.ClientSession, target_name: str, round_no: int
) -> RowReport:
    """All users at once against one target; wall time from the first send to the last end."""
    target = bench.targets[target_name]
    specs = bench.specs[target_name]
    async with measure_resources(bench.processes) as usage:
        start = time.perf_counter()
        step = bench.opts.ramp_s / len(specs)
        per_user = await asyncio.gather(
            *(run_user(session, target, s, i * step) for i, s in enumerate(specs))
        )
        wall_s = time.perf_counter() - start
    results = [r for user in per_user for r in user]
    return build_row(round_no, target_name, results, wall_s, usage, bench.opts.tokens)


def make_session(opts: Options) -> aiohttp.ClientSession:
    """One client session for the whole run, with room for every stream at once."""
    connector = aiohttp.TCPConnector(
        limit=max(1000, 2 * opts.concurrency), limit_per_host=0, force_close=opts.no_keepalive
    )
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=opts.timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def start_profiler(pid: int, path: Path) -> asyncio.subprocess.Process | None:
    """``py-spy record`` on the gateway (GIL holder only, non-blocking), or None without py-spy."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not found; pip install py-spy", file=sys.stderr)
        return None
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(path.suffix, "raw")
    return await asyncio.create_subprocess_exec(
        exe, "record", "--pid", str(pid), "--output", str(path), "--format", fmt,
        "--gil", "--nonblocking", "--rate", "200",
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def stop_profiler(profiler: asyncio.subprocess.Process | None) -> None:
    """Stop py-spy with SIGINT so it writes its output."""
    if profiler is None:
        return
    profiler.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(profiler.wait(), 30)
    except TimeoutError:
        profiler.kill()


async def run_rounds(bench: Bench, console: Console) -> list[RowReport]:
    """Warm-up pairs (discarded), then ``rounds`` measured pairs, direct first in each."""
    opts = bench.opts
    rows: list[RowReport] = []
    async with make_session(opts) as session:
        for number in range(1, opts.warmup_rounds + 1):
            for name in (DIRECT, GATEWAY):
                row = await run_row(bench, session, name, -number)
                console.print(f"warm-up {name:<7}  {fmt_row_line(row)}", highlight=False)
                await asyncio.sleep(opts.pause_s)
        profiler = None
        if opts.profile_path is not None:
            profiler = await start_profiler(bench.processes[GATEWAY].pid, opts.profile_path)
        try:
            for number in range(1, opts.rounds + 1):
                for name in (DIRECT, GATEWAY):
                    row = await run_row(bench, session, name, number)
                    console.print(f"round {number} {name:<7}  {fmt_row_line(row)}", highlight=False)
                    rows.append(row)
                    await asyncio.sleep(opts.pause_s)
        finally:
            await stop_profiler(profiler)
    return rows


def run_async(coro: Any) -> Any:
    """Run ``coro`` on uvloop when available (as the servers do), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def fetch_sim_stats(base: str) -> dict[str, Any] | None:
    """sim-upstream's ``/sim/stats`` (active, completed, cancelled streams), if it has one."""
    async with aiohttp.ClientSession() as session, session.get(base + "/sim/stats") as r:
        return dict(await r.json()) if r.status == 200 else None


# --- summary and output ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    """Per-round gateway/direct comparison, medians over rounds, and the verdict."""

    ratios: list[float]
    ttft_p50_overhead_ms: list[float]
    ttft_p99_overhead_ms: list[float]
    itl_p50_overhead_ms: list[float]
    e2e_p50_overhead_ms: list[float]
    ratio_median: float
    ttft_p50_overhead_median_ms: float
    ttft_p99_overhead_median_ms: float
    itl_p50_overhead_median_ms: float
    e2e_p50_overhead_median_ms: float
    errors: int
    wrong: int
    gateway_cpu_s_per_1k_tokens_median: float
    gateway_max_rss_mib: float
    passed: bool
    reasons: list[str]


def summarize(rows: list[RowReport], opts: Options) -> Summary:
    """Pair direct and gateway rows by round; judge against the acceptance targets."""
    direct = [r for r in rows if r.target == DIRECT]
    gateway = [r for r in rows if r.target == GATEWAY]
    pairs = list(zip(direct, gateway, strict=True))
    ratios = [g.tokens_per_s / d.tokens_per_s if d.tokens_per_s else math.nan for d, g in pairs]
    ttft50 = [g.ttft.p50 - d.ttft.p50 for d, g in pairs]
    ttft99 = [g.ttft.p99 - d.ttft.p99 for d, g in pairs]
    itl50 = [g.itl.p50 - d.itl.p50 for d, g in pairs]
    e2e50 = [g.e2e.p50 - d.e2e.p50 for d, g in pairs]
    errors = sum(r.errors for r in rows)
    wrong = sum(r.wrong for r in rows)
    ratio_med = statistics.median(ratios)
    ttft50_med = statistics.median(ttft50)
    reasons = []
    if ratio_med < opts.min_ratio:
        reasons.append(f"tokens/s ratio {ratio_med:.3f} < {opts.min_ratio:.2f}")
    if not ttft50_med <= opts.max_ttft_overhead_ms:
        reasons.append(f"TTFT p50 overhead {ttft50_med:.1f} ms > {opts.max_ttft_overhead_ms:g} ms")
    if errors or wrong:
        reasons.append(f"{errors} errors and {wrong} wrong outputs")
    return Summary(
        ratios=ratios,
        ttft_p50_overhead_ms=ttft50,
        ttft_p99_overhead_ms=ttft99,
        itl_p50_overhead_ms=itl50,
        e2e_p50_overhead_ms=e2e50,
        ratio_median=ratio_med,
        ttft_p50_overhead_median_ms=ttft50_med,
        ttft_p99_overhead_median_ms=statistics.median(ttft99),
        itl_p50_overhead_median_ms=statistics.median(itl50),
        e2e_p50_overhead_median_ms=statistics.median(e2e50),
        errors=errors,
        wrong=wrong,
        gateway_cpu_s_per_1k_tokens_median=statistics.median(
            g.cpu_s_per_1k_tokens[GATEWAY] for g in gateway
        ),
        gateway_max_rss_mib=max(g.resources.max_rss_mib[GATEWAY] for g in gateway),
        passed=not reasons,
        reasons=reasons,
    )


def fmt_row_line(row: RowReport) -> str:
    """A one-line progress report for a row."""
    return (
        f"{row.tokens_per_s:8.0f} tok/s  TTFT p50 {row.ttft.p50:6.1f} ms  "
        f"ITL p50 {row.itl.p50:5.1f} ms  errors {row.errors}  wrong {row.wrong}  "
        f"host CPU {row.resources.host_cpu_percent:3.0f}%"
    )


def fmt_dist(d: Dist) -> str:
    """``p50 / p90 / p99 / mean`` in ms."""
    return f"{d.p50:.1f} / {d.p90:.1f} / {d.p99:.1f} / {d.mean:.1f}"


def throughput_table(rows: list[RowReport]) -> Table:
    """Rows: throughput, correctness and resources."""
    table = Table(title="Throughput, correctness, resources (per row)")
    for col in ("round", "target", "tok/s", "req/s", "wall s", "req", "err", "wrong",
                "chunks/read", "gw CPU s/1k tok", "gw RSS MiB", "up CPU s/1k tok",
                "client CPU s/1k tok", "host CPU %"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        per_1k = r.cpu_s_per_1k_tokens
        is_gw = r.target == GATEWAY
        table.add_row(
            str(r.round),
            r.target,
            f"{r.tokens_per_s:,.0f}",
            f"{r.requests_per_s:,.1f}",
            f"{r.wall_s:.3f}",
            str(r.requests),
            str(r.errors),
            str(r.wrong),
            f"{r.chunks_per_read:.2f}",
            f"{per_1k[GATEWAY]:.3f}" if is_gw else "-",
            f"{r.resources.max_rss_mib[GATEWAY]:.0f}",
            f"{per_1k[UPSTREAM]:.3f}",
            f"{per_1k['client']:.3f}",
            f"{r.resources.host_cpu_percent:.0f}",
        )
    return table


def latency_table(rows: list[RowReport]) -> Table:
    """Rows: TTFT, ITL, TPOT, E2E distributions."""
    table = Table(title="Latency, ms: p50 / p90 / p99 / mean")
    for col in ("round", "target", "TTFT", "ITL", "TPOT", "E2E"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r.round),
            r.target,
            fmt_dist(r.ttft),
            fmt_dist(r.itl),
            fmt_dist(r.tpot),
            fmt_dist(r.e2e),
        )
    return table


def summary_table(summary: Summary) -> Table:
    """Per round and median: gateway/direct ratio and overheads."""
    table = Table(title="Gateway vs direct (overhead = gateway - direct)")
    for col in ("round", "tok/s ratio", "TTFT p50 +ms", "TTFT p99 +ms", "ITL p50 +ms",
                "E2E p50 +ms"):  # fmt: skip
        table.add_column(col, justify="right")
    columns = (
        summary.ratios,
        summary.ttft_p50_overhead_ms,
        summary.ttft_p99_overhead_ms,
        summary.itl_p50_overhead_ms,
        summary.e2e_p50_overhead_ms,
    )
    for i, values in enumerate(zip(*columns, strict=True), start=1):
        table.add_row(str(i), f"{values[0]:.3f}", *(f"{v:+.1f}" for v in values[1:]))
    table.add_row(
        "median",
        f"{summary.ratio_median:.3f}",
        f"{summary.ttft_p50_overhead_median_ms:+.1f}",
        f"{summary.ttft_p99_overhead_median_ms:+.1f}",
        f"{summary.itl_p50_overhead_median_ms:+.1f}",
        f"{summary.e2e_p50_overhead_median_ms:+.1f}",
        style="bold",
    )
    return table


def print_report(console: Console, rows: list[RowReport], summary: Summary, opts: Options) -> None:
    """The tables, problems seen, and the verdict."""
    console.print(throughput_table(rows))
    console.print(latency_table(rows))
    console.print(summary_table(summary))
    for r in rows:
        for reason in r.problems:
            console.print(f"round {r.round} {r.target}: {reason}", highlight=False)
    console.print(
        f"gateway CPU {summary.gateway_cpu_s_per_1k_tokens_median:.3f} s per 1,000 tokens "
        f"(median of gateway rows); gateway max RSS {summary.gateway_max_rss_mib:.0f} MiB",
        highlight=False,
    )
    target = (
        f"target: ratio >= {opts.min_ratio:.2f}, TTFT p50 overhead <= "
        f"{opts.max_ttft_overhead_ms:g} ms, no errors/wrong outputs"
    )
    if summary.passed:
        console.print(f"[bold green]PASS[/bold green]  ({target})")
    else:
        console.print(f"[bold red]FAIL[/bold red]  {'; '.join(summary.reasons)}  ({target})")


def environment() -> dict[str, Any]:
    """Host facts for the JSON report (the machine is shared: load average matters)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "aiohttp": aiohttp.__version__,
        "msgspec": msgspec.__version__,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the report as indented JSON (NaN becomes null)."""
    encoded = msgspec.json.encode(payload, enc_hook=str)  # Paths as strings
    path.write_bytes(msgspec.json.format(encoded, indent=2) + b"\n")


# --- main ------------------------------------------------------------------------------------


def make_bench(
    opts: Options, upstream: tuple[ServerProcess, str], gateway: tuple[ServerProcess, str, str]
) -> Bench:
    """Targets, prepared requests and watched processes."""
    up_server, up_base = upstream
    gw_server, gw_base, key = gateway
    json_headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    targets = {
        DIRECT: Target(
            DIRECT,
            up_base + "/v1/chat/completions",
            UPSTREAM_MODEL,
            {**json_headers, "Authorization": "Bearer sim"},
        ),
        GATEWAY: Target(
            GATEWAY,
            gw_base + "/v1/chat/completions",
            GATEWAY_MODEL,
            {**json_headers, "Authorization": f"Bearer {key}"},
        ),
    }
    return Bench(
        opts=opts,
        targets=targets,
        specs={name: build_specs(opts, t.model) for name, t in targets.items()},
        processes={
            GATEWAY: psutil.Process(gw_server.pid),
            UPSTREAM: psutil.Process(up_server.pid),
            "client": psutil.Process(),
        },
    )


async def measure(bench: Bench, console: Console, up_base: str) -> dict[str, Any]:
    """Run all rounds; return the JSON-able report."""
    loadavg_before = os.getloadavg()
    rows = await run_rounds(bench, console)
    summary = summarize(rows, bench.opts)
    print_report(console, rows, summary, bench.opts)
    sim_stats = await fetch_sim_stats(up_base)
    if sim_stats is not None:
        console.print(f"sim-upstream stats after the run: {sim_stats}", highlight=False)
    console.print(
        f"load average before {loadavg_before[0]:.2f}, after {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} CPUs (shared machine: expect run-to-run noise)",
        highlight=False,
    )
    return {
        "options": bench.opts,
        "environment": {**environment(), "loadavg_before": loadavg_before},
        "pids": {name: p.pid for name, p in bench.processes.items()},
        "rows": rows,
        "summary": summary,
        "sim_stats": sim_stats,
    }


def describe(opts: Options, console: Console) -> None:
    """Print what is about to run."""
    console.print(
        f"{opts.concurrency} users x {opts.requests_per_user} request(s) x {opts.tokens} tokens; "
        f"sim-upstream TTFT {opts.ttft_ms:g} ms, ITL {opts.itl_ms:g} ms; {opts.warmup_rounds} "
        f"warm-up + {opts.rounds} measured rounds (direct, then gateway); "
        f"{'new connection per request' if opts.no_keepalive else 'keep-alive'} SSE",
        highlight=False,
    )


def main(argv: list[str] | None = None) -> int:
    """Start the servers, run the benchmark, stop the servers. Exit 0 PASS, 1 FAIL, 2 error."""
    opts = parse_options(argv)
    console = Console(width=None if sys.stdout.isatty() else 170)
    install_signal_exit()
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-bench-"))
    servers: list[ServerProcess] = []
    try:
        upstream = start_upstream(opts, workdir, servers)
        gateway = start_gateway(upstream[1], workdir, servers, opts.gateway_server)
        console.print(
            f"sim-upstream pid {upstream[0].pid} at {upstream[1]}; "
            f"gateway pid {gateway[0].pid} at {gateway[1]}; temp dir {workdir}",
            highlight=False,
        )
        describe(opts, console)
        bench = make_bench(opts, upstream, gateway)
        report = run_async(measure(bench, console, upstream[1]))
        if opts.json_path is not None:
            write_json(opts.json_path, report)
            console.print(f"wrote {opts.json_path}", highlight=False)
        return 0 if report["summary"].passed else 1
    except RuntimeError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; stopping the servers")
        return 130
    finally:
        for server in reversed(servers):
            server.stop()
        if not opts.keep_temp:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
