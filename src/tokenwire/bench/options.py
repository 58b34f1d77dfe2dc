"""The options of ``tokenwire bench``, the scenarios, and their validation.

Imported when the CLI starts, so it imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal

from tokenwire.errors import InvalidRequest


class Scenario(StrEnum):
    """One row kind of the benchmark."""

    DIRECT = "direct"
    BARE = "bare"
    SSE = "sse"
    SSE_NEW_CONN = "sse-new-conn"
    JSON = "json"
    WS = "ws"
    WS_MUX = "ws-mux"

    @property
    def transport(self) -> Literal["sse", "json", "ws"]:
        """How the client talks: SSE over HTTP POST, one JSON answer, or WebSocket."""
        if self in (Scenario.WS, Scenario.WS_MUX):
            return "ws"
        return "json" if self is Scenario.JSON else "sse"


SCENARIO_DESCRIPTIONS: dict[Scenario, str] = {
    Scenario.DIRECT: "SSE straight to sim-upstream, keep-alive (the baseline)",
    Scenario.BARE: "SSE through a bare pass-through on the gateway's stack (uvicorn, httptools, "
    "uvloop, its upstream client) doing nothing else: the floor under the gateway rows",
    Scenario.SSE: "SSE through the gateway, keep-alive connection pool",
    Scenario.SSE_NEW_CONN: "SSE through the gateway, a new TCP connection per request",
    Scenario.JSON: "one JSON answer per request (stream: false) through the gateway, keep-alive",
    Scenario.WS: "WebSocket through the gateway, one socket per user, requests in sequence",
    Scenario.WS_MUX: "WebSocket through the gateway, users' requests multiplexed on shared sockets",
}

DEFAULT_MODEL = "proxied-sim"
UPSTREAM_MODEL = "sim"
GatewayServerKind = Literal["uvicorn", "granian"]
WsMode = Literal["envelope", "compat"]
DEFAULT_SCENARIOS = (
    Scenario.DIRECT,
    Scenario.SSE,
    Scenario.SSE_NEW_CONN,
    Scenario.WS,
    Scenario.WS_MUX,
)
"""Every scenario but ``json`` and ``bare``, asked for by name: ``json`` is for per-request
cost, ``bare`` for how much of the gateway's overhead its HTTP stack alone costs."""
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """Everything one ``tokenwire bench`` run was asked to do."""

    scenarios: tuple[Scenario, ...] = DEFAULT_SCENARIOS
    concurrency: tuple[int, ...] = (1, 10, 100, 1000)
    requests_per_user: int = 1
    duration_s: float | None = None
    tokens: int = 50
    ttft_ms: float = 20.0
    itl_ms: float = 20.0
    warmup: int = 1
    warmup_s: float | None = None
    rounds: int = 1
    ramp_s: float = 0.0
    pause_s: float = 0.2
    timeout_s: float = 60.0
    mux_streams_per_socket: int = 32
    ws_mode: WsMode = "envelope"
    ws_compression: bool = False
    idle_websockets: int = 0
    target: str | None = None
    key: str | None = None
    admin_key: str | None = None
    model: str = DEFAULT_MODEL
    upstream: str | None = None
    start_upstream: bool = False
    target_pid: int | None = None
    out: Path | None = None
    plots: bool = True
    save_itl: bool = False
    profile: Path | None = None
    gateway_server: GatewayServerKind = "uvicorn"
    workers: int = 1
    redis_url: str | None = None
    keep_temp: bool = False
    check: bool = False
    min_ratio: float = 0.90
    max_ttft_overhead_ms: float = 10.0
    max_rss_growth_pct: float = 10.0
    settle_s: float = 10.0

    def out_dir(self, now: datetime) -> Path:
        """``--out``, or ``./bench-results/<timestamp>``."""
        if self.out is not None:
            return self.out
        return Path("bench-results") / now.strftime("%Y%m%d-%H%M%S")


def parse_concurrency(text: str) -> tuple[int, ...]:
    """``"1,10,100"`` → ``(1, 10, 100)``: positive, distinct, ascending (sorted here)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidRequest(
            f"--concurrency wants comma-separated integers, got {text!r}", param="--concurrency"
        ) from None
    if not values or min(values) < 1:
        raise InvalidRequest("--concurrency values must be >= 1", param="--concurrency")
    return tuple(sorted(set(values)))


def parse_scenarios(text: str) -> tuple[Scenario, ...]:
    """``"ws,direct"`` → ``(direct, ws)``: known names, in the canonical order (direct first)."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    known = {s.value for s in Scenario}
    unknown = sorted(names - known)
    if unknown or not names:
        raise InvalidRequest(
            f"unknown scenario(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(s.value for s in Scenario)}",
            param="--scenarios",
        )
    return tuple(s for s in Scenario if s.value in names)


def validate(opts: BenchOptions) -> None:
    """Reject option combinations that cannot run, naming the option."""
    checks: list[tuple[bool, str, str]] = [
        (opts.tokens >= 2, "--tokens", "--tokens must be >= 2 (TPOT needs two tokens)"),
        (opts.requests_per_user >= 1, "--requests-per-user", "--requests-per-user must be >= 1"),
        (opts.rounds >= 1, "--rounds", "--rounds must be >= 1"),
        (opts.warmup >= 0, "--warmup", "--warmup must be >= 0"),
        (opts.warmup_s is None or opts.warmup_s > 0, "--warmup-s", "--warmup-s must be > 0"),
        (opts.ttft_ms >= 0 and opts.itl_ms >= 0, "--ttft-ms", "delays must be >= 0"),
        (opts.ramp_s >= 0, "--ramp-s", "--ramp-s must be >= 0"),
        (opts.pause_s >= 0, "--pause-s", "--pause-s must be >= 0"),
        (opts.timeout_s > 0, "--timeout-s", "--timeout-s must be > 0"),
        (
            opts.duration_s is None or opts.duration_s > 0,
            "--duration",
            "--duration must be > 0",
        ),
        (
            opts.mux_streams_per_socket >= 1,
            "--mux-streams-per-socket",
            "--mux-streams-per-socket must be >= 1",
        ),
        (opts.idle_websockets >= 0, "--idle-websockets", "--idle-websockets must be >= 0"),
        (opts.workers >= 1, "--workers", "--workers must be >= 1"),
        (
            opts.target is None or (opts.workers == 1 and opts.redis_url is None),
            "--workers",
            "--workers and --redis apply to the gateway bench starts, not to --target",
        ),
        (
            opts.target is None or opts.key is not None,
            "--key",
            "--target needs --key (an API key of that gateway)",
        ),
        (
            opts.target is not None or opts.admin_key is None,
            "--admin-key",
            "--admin-key only applies with --target (bench makes its own admin key)",
        ),
        (opts.settle_s >= 0, "--settle-s", "--settle-s must be >= 0"),
        (
            opts.max_rss_growth_pct > 0,
            "--max-rss-growth-pct",
            "--max-rss-growth-pct must be > 0",
        ),
        (
            opts.target is not None or opts.target_pid is None,
            "--target-pid",
            "--target-pid only applies with --target",
        ),
        (
            opts.target is not None or opts.upstream is None,
            "--upstream",
            "--upstream only applies with --target (otherwise bench starts its own)",
        ),
        (
            opts.upstream is None or not opts.start_upstream,
            "--start-upstream",
            "give --upstream or --start-upstream, not both",
        ),
        (
            opts.profile is None or opts.target is None or opts.target_pid is not None,
            "--profile",
            "--profile with --target needs --target-pid",
        ),
    ]
    for ok, param, message in checks:
        if not ok:
            raise InvalidRequest(message, param=param)
    for url, param in ((opts.target, "--target"), (opts.upstream, "--upstream")):
        if url is not None and not url.startswith(("http://", "https://")):
            raise InvalidRequest(f"{param} must be an http(s):// URL, got {url!r}", param=param)


def base_url(url: str) -> str:
    """A server's base URL without a trailing ``/`` or ``/v1``."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url
