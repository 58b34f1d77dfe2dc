"""The ``tokenwire bench`` command line (typer). Heavy imports happen only when it runs."""

from __future__ import annotations

import importlib.util
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

from tokenwire.bench.options import (
    DEFAULT_MODEL,
    BenchOptions,
    parse_concurrency,
    parse_scenarios,
    validate,
)
from tokenwire.errors import InvalidRequest


class OnOff(StrEnum):
    on = "on"
    off = "off"


class WsModeChoice(StrEnum):
    envelope = "envelope"
    compat = "compat"


class ServerChoice(StrEnum):
    uvicorn = "uvicorn"
    granian = "granian"


LOAD = "Load"
SERVERS = "Servers and targets"
OUTPUT = "Output"


def bench(
    scenarios: Annotated[
        str,
        typer.Option(
            help="Comma list of direct, sse, sse-new-conn, json, ws, ws-mux (run in that "
            "order; json, one answer per request, only when named).",
            rich_help_panel=LOAD,
        ),
    ] = "direct,sse,sse-new-conn,ws,ws-mux",
    concurrency: Annotated[
        str,
        typer.Option(
            help="Comma list of concurrent users (streams) to sweep.", rich_help_panel=LOAD
        ),
    ] = "1,10,100,1000",
    requests_per_user: Annotated[
        int, typer.Option(help="Requests each user sends in sequence.", rich_help_panel=LOAD)
    ] = 1,
    duration: Annotated[
        Optional[float],  # noqa: UP045 - typer needs Optional at runtime
        typer.Option(
            help="Seconds: users keep sending until this has passed (instead of a count).",
            rich_help_panel=LOAD,
        ),
    ] = None,
    tokens: Annotated[
        int, typer.Option(help="Output tokens per request (max_tokens).", rich_help_panel=LOAD)
    ] = 50,
    ttft_ms: Annotated[
        float,
        typer.Option(help="sim-upstream's delay before the first token.", rich_help_panel=LOAD),
    ] = 20.0,
    itl_ms: Annotated[
        float, typer.Option(help="sim-upstream's delay between tokens.", rich_help_panel=LOAD)
    ] = 20.0,
    warmup: Annotated[
        int,
        typer.Option(
            help="Unrecorded rounds per concurrency (one request per user) before measuring.",
            rich_help_panel=LOAD,
        ),
    ] = 1,
    warmup_s: Annotated[
        Optional[float],  # noqa: UP045 - typer needs Optional at runtime
        typer.Option(
            "--warmup-s",
            help="Seconds: each warm-up round keeps the load going this long instead of one "
            "request per user (a soak's leak and RSS baseline is then the steady state).",
            rich_help_panel=LOAD,
        ),
    ] = None,
    rounds: Annotated[
        int,
        typer.Option(
            help="Measured rounds, scenarios alternated in each (direct first); medians reported.",
            rich_help_panel=LOAD,
        ),
    ] = 1,
    ramp_s: Annotated[
        float,
        typer.Option(
            help="Spread user starts over this many seconds (0: all at once).",
            rich_help_panel=LOAD,
        ),
    ] = 0.0,
    pause_s: Annotated[
        float, typer.Option(help="Idle time between rows.", rich_help_panel=LOAD)
    ] = 0.2,
    timeout_s: Annotated[
        float,
        typer.Option(help="A request fails after this long without data.", rich_help_panel=LOAD),
    ] = 60.0,
    mux_streams_per_socket: Annotated[
        int,
        typer.Option(
            help="ws-mux: concurrent requests per WebSocket (the gateway started here allows it; "
            "a default tokenwire allows 32).",
            rich_help_panel=LOAD,
        ),
    ] = 32,
    ws_mode: Annotated[
        WsModeChoice,
        typer.Option(help="ws scenario: envelope or compatible mode.", rich_help_panel=LOAD),
    ] = WsModeChoice.envelope,
    ws_compression: Annotated[
        OnOff,
        typer.Option(help="permessage-deflate on the WebSockets.", rich_help_panel=LOAD),
    ] = OnOff.off,
    idle_websockets: Annotated[
        int,
        typer.Option(
            help="First hold this many idle authenticated WebSockets; report gateway RSS per "
            "connection.",
            rich_help_panel=LOAD,
        ),
    ] = 0,
    target: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Measure this running OpenAI-compatible gateway (base URL), start none.",
            rich_help_panel=SERVERS,
        ),
    ] = None,
    key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="API key for --target.", rich_help_panel=SERVERS),
    ] = None,
    admin_key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Admin key for --target: count what the gateway holds (GET /v1/admin/runtime) "
            "before and after the load.",
            rich_help_panel=SERVERS,
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(help="Model to request from --target.", rich_help_panel=SERVERS),
    ] = DEFAULT_MODEL,
    upstream: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="With --target: the sim-upstream it is configured against (the direct row).",
            rich_help_panel=SERVERS,
        ),
    ] = None,
    start_upstream: Annotated[
        bool,
        typer.Option(
            help="With --target and no --upstream: start a sim-upstream for the direct row.",
            rich_help_panel=SERVERS,
        ),
    ] = False,
    target_pid: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="PID of --target, to sample its CPU and RSS.", rich_help_panel=SERVERS),
    ] = None,
    gateway_server: Annotated[
        ServerChoice,
        typer.Option(
            help="Serve the started gateway with uvicorn or granian (pip install granian).",
            rich_help_panel=SERVERS,
        ),
    ] = ServerChoice.uvicorn,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes of the gateway bench starts (serve --workers N); more than "
            "one keeps its limits and streams in Redis (--redis, default the local one).",
            rich_help_panel=SERVERS,
        ),
    ] = 1,
    redis: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Redis URL for the started gateway's limits and streams (a key prefix of the "
            "run's own, removed at the end). Default: in process with one worker, "
            "redis://127.0.0.1:6379/0 with more.",
            rich_help_panel=SERVERS,
        ),
    ] = None,
    profile: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="py-spy record the gateway during measured rounds (.svg, .json, else raw).",
            rich_help_panel=SERVERS,
        ),
    ] = None,
    keep_temp: Annotated[
        bool,
        typer.Option(help="Keep the temp dir (server logs, database).", rich_help_panel=SERVERS),
    ] = False,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="Output directory (default ./bench-results/<timestamp>).", rich_help_panel=OUTPUT
        ),
    ] = None,
    plots: Annotated[
        bool, typer.Option(help="Write the PNG plots (needs matplotlib).", rich_help_panel=OUTPUT)
    ] = True,
    save_itl: Annotated[
        bool,
        typer.Option(
            help="Store every request's ITL gaps in results.json.", rich_help_panel=OUTPUT
        ),
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            help="Exit 1 unless sse keeps --min-ratio of direct tok/s and TTFT p50 overhead "
            "<= --max-ttft-overhead-ms at every concurrency (when both ran), the gateway "
            "holds no more after the load than before it, and its RSS grew at most "
            "--max-rss-growth-pct.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    min_ratio: Annotated[float, typer.Option(rich_help_panel=OUTPUT)] = 0.90,
    max_ttft_overhead_ms: Annotated[float, typer.Option(rich_help_panel=OUTPUT)] = 10.0,
    max_rss_growth_pct: Annotated[
        float,
        typer.Option(
            help="--check: the gateway's peak RSS in the measured rows may exceed its RSS at the "
            "end of the warm-up by at most this much.",
            rich_help_panel=OUTPUT,
        ),
    ] = 10.0,
    settle_s: Annotated[
        float,
        typer.Option(
            help="Leak accounting: once the gateway is quiet, wait this long before counting what "
            "it holds (its pooled upstream connections close after 4-8 s idle).",
            rich_help_panel=OUTPUT,
        ),
    ] = 10.0,
) -> None:
    """Measure streaming through the gateway: TTFT, ITL, TPOT, E2E, tokens/s, CPU, memory.

    Starts sim-upstream and a gateway (or targets one), runs each scenario over the
    concurrency sweep, and writes results.json, results.md and PNG plots. Exit 0 ok, 1 errors,
    wrong outputs or a failed --check, 2 servers did not start, 130 interrupted.
    """
    try:
        opts = BenchOptions(
            scenarios=parse_scenarios(scenarios),
            concurrency=parse_concurrency(concurrency),
            requests_per_user=requests_per_user,
            duration_s=duration,
            tokens=tokens,
            ttft_ms=ttft_ms,
            itl_ms=itl_ms,
            warmup=warmup,
            warmup_s=warmup_s,
            rounds=rounds,
            ramp_s=ramp_s,
            pause_s=pause_s,
            timeout_s=timeout_s,
            mux_streams_per_socket=mux_streams_per_socket,
            ws_mode="compat" if ws_mode is WsModeChoice.compat else "envelope",
            ws_compression=ws_compression is OnOff.on,
            idle_websockets=idle_websockets,
            target=target,
            key=key,
            admin_key=admin_key,
            model=model,
            upstream=upstream,
            start_upstream=start_upstream,
            target_pid=target_pid,
            out=out,
            plots=plots,
            save_itl=save_itl,
            profile=profile,
            gateway_server="granian" if gateway_server is ServerChoice.granian else "uvicorn",
            workers=workers,
            redis_url=redis,
            keep_temp=keep_temp,
            check=check,
            min_ratio=min_ratio,
            max_ttft_overhead_ms=max_ttft_overhead_ms,
            max_rss_growth_pct=max_rss_growth_pct,
            settle_s=settle_s,
        )
        validate(opts)
    except InvalidRequest as exc:
        raise typer.BadParameter(exc.message, param_hint=exc.param) from None
    if importlib.util.find_spec("psutil") is None:
        typer.echo("tokenwire bench needs psutil: pip install 'tokenwire[bench]'", err=True)
        raise typer.Exit(2)
    from tokenwire.bench.runner import run

    raise typer.Exit(run(opts, ["tokenwire", *sys.argv[1:]]))
