"""The run as ``results.json`` (schema: ``results.schema.json``), ``results.md`` and rich tables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from tokenwire.bench.leak_report import cell as _cell
from tokenwire.bench.leak_report import leak_json, leak_markdown, print_leaks
from tokenwire.bench.leak_report import rounded as _round
from tokenwire.bench.leaks import RUNTIME_PATH, TOLERANCE
from tokenwire.bench.metrics import DIST_STATS, Dist, Overhead, RowMetrics, dist_dict
from tokenwire.bench.options import SCENARIO_DESCRIPTIONS, BenchOptions, Scenario
from tokenwire.bench.results import RowRun, RunOutcome, ScenarioRecord, server_of

SCHEMA_VERSION = 3
CLIENT_DESCRIPTION = (
    "one load-generator process per scenario on uvloop: aiohttp for SSE, websockets for "
    "WebSocket; every chunk decoded with msgspec; stamps are time.perf_counter() on receipt"
)


def _dist_json(d: Dist) -> dict[str, Any]:
    return {k: (_round(v) if isinstance(v, float) else v) for k, v in dist_dict(d).items()}


def options_dict(opts: BenchOptions) -> dict[str, Any]:
    """The options as JSON values (paths as strings, scenarios as names)."""
    raw = asdict(opts)
    raw["scenarios"] = [s.value for s in opts.scenarios]
    raw["concurrency"] = list(opts.concurrency)
    for name in ("key", "admin_key"):  # never a whole key
        raw[name] = None if raw[name] is None else _shorten(raw[name])
    for name in ("out", "profile"):
        raw[name] = None if raw[name] is None else str(raw[name])
    return raw


SECRET_OPTIONS = ("--key", "--admin-key")


def _shorten(key: str) -> str:
    return key[:6] + "…"


def masked_argv(argv: list[str]) -> list[str]:
    """The command line with the values of ``--key`` and ``--admin-key`` shortened."""
    masked: list[str] = []
    secret_next = False
    for arg in argv:
        name, eq, value = arg.partition("=")
        if secret_next:
            masked.append(_shorten(arg))
        elif eq and name in SECRET_OPTIONS:
            masked.append(f"{name}={_shorten(value)}")
        else:
            masked.append(arg)
        secret_next = arg in SECRET_OPTIONS
    return masked


def _overhead_json(o: Overhead | None) -> dict[str, Any] | None:
    if o is None:
        return None
    return {
        "tokens_per_s_ratio": _round(o.tokens_per_s_ratio, 4),
        "ttft_ms": _dist_json(o.ttft),
        "itl_ms": _dist_json(o.itl),
        "tpot_ms": _dist_json(o.tpot),
        "e2e_ms": _dist_json(o.e2e),
    }


def _metrics_json(m: RowMetrics | None) -> dict[str, Any]:
    if m is None:
        empty = _dist_json(Dist.empty())
        return {
            "requests": 0,
            "completed": 0,
            "errors": 0,
            "wrong": 0,
            "output_tokens": 0,
            "wall_s": None,
            "tokens_per_s": None,
            "requests_per_s": None,
            "ttft_ms": empty,
            "itl_ms": empty,
            "tpot_ms": empty,
            "e2e_ms": empty,
            "chunks_per_read": None,
            "tokens_per_chunk": None,
            "problems": [],
        }
    return {
        "requests": m.requests,
        "completed": m.completed,
        "errors": m.errors,
        "wrong": m.wrong,
        "output_tokens": m.output_tokens,
        "wall_s": _round(m.wall_s, 4),
        "tokens_per_s": _round(m.tokens_per_s, 2),
        "requests_per_s": _round(m.requests_per_s, 3),
        "ttft_ms": _dist_json(m.ttft),
        "itl_ms": _dist_json(m.itl),
        "tpot_ms": _dist_json(m.tpot),
        "e2e_ms": _dist_json(m.e2e),
        "chunks_per_read": _round(m.chunks_per_read),
        "tokens_per_chunk": _round(m.tokens_per_chunk),
        "problems": list(m.problems),
    }


def _round_json(row: RowRun) -> dict[str, Any]:
    m = row.metrics
    return {
        "round": row.round,
        "tokens_per_s": None if m is None else _round(m.tokens_per_s, 2),
        "requests_per_s": None if m is None else _round(m.requests_per_s, 3),
        "wall_s": None if m is None else _round(m.wall_s, 4),
        "errors": 0 if m is None else m.errors,
        "wrong": 0 if m is None else m.wrong,
        "ttft_ms": _dist_json(Dist.empty() if m is None else m.ttft),
        "itl_ms": _dist_json(Dist.empty() if m is None else m.itl),
        "connect_s": _round(row.connect_s, 4),
        "server_cpu_s_per_1k_tokens": _round(row.cpu_s_per_1k_tokens(row.server), 4),
        "server_cpu_ms_per_request": _round(row.cpu_ms_per_request(row.server), 4),
        "server_peak_rss_mib": _round(row.peak_rss_mib(row.server), 1),
        "client_rss_kib_per_stream": _round(row.client_rss_kib_per_stream, 2),
        "host_cpu_percent": _round(row.resources.host_cpu_percent if row.resources else None, 1),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def _per_request_json(rows: list[RowRun], save_itl: bool) -> dict[str, list[Any]]:
    """Columnar arrays over every request of every measured round."""
    columns: dict[str, list[Any]] = {
        name: []
        for name in (
            "round",
            "user",
            "index",
            "ttft_ms",
            "e2e_ms",
            "tpot_ms",
            "output_tokens",
            "error",
            "wrong",
        )
    }
    if save_itl:
        columns["itl_ms"] = []
    for row in rows:
        for r in row.records:
            columns["round"].append(row.round)
            columns["user"].append(r.user)
            columns["index"].append(r.index)
            columns["ttft_ms"].append(_ms(r.ttft_s))
            columns["e2e_ms"].append(_ms(r.e2e_s))
            columns["tpot_ms"].append(_ms(r.tpot_s))
            columns["output_tokens"].append(r.output_tokens)
            columns["error"].append(r.error)
            columns["wrong"].append(r.wrong)
            if save_itl:
                columns["itl_ms"].append([round(g * 1000, 3) for g in r.itl_s])
    return columns


def record_json(record: ScenarioRecord, save_itl: bool) -> dict[str, Any]:
    """One scenario x concurrency as a JSON object."""
    scenario = record.scenario
    measured = [r for r in record.rows if r.metrics is not None]
    return {
        "scenario": scenario.value,
        "transport": scenario.transport,
        "description": SCENARIO_DESCRIPTIONS[scenario],
        "concurrency": record.concurrency,
        "status": record.status,
        "note": record.note,
        "rounds": len(measured),
        "expected_requests": record.expected_requests,
        **_metrics_json(record.metrics),
        "server": server_of(scenario),
        "server_cpu_s_per_1k_tokens": _round(record.server_cpu_s_per_1k_tokens, 4),
        "server_cpu_ms_per_request": _round(record.server_cpu_ms_per_request, 4),
        "server_peak_rss_mib": _round(record.server_peak_rss_mib, 1),
        "upstream_cpu_s_per_1k_tokens": _round(record.upstream_cpu_s_per_1k_tokens, 4),
        "client_cpu_s_per_1k_tokens": _round(record.client_cpu_s_per_1k_tokens, 4),
        "client_rss_kib_per_stream": _round(record.client_rss_kib_per_stream, 2),
        "host_cpu_percent": _round(record.host_cpu_percent, 1),
        "overhead_vs_direct": _overhead_json(record.overhead),
        "per_round": [_round_json(r) for r in measured],
        "per_request": _per_request_json(measured, save_itl),
    }


def build_document(outcome: RunOutcome) -> dict[str, Any]:
    """The whole run as the JSON document ``results.schema.json`` describes."""
    opts, ends, idle = outcome.opts, outcome.endpoints, outcome.idle
    started_upstream = ends.upstream_pid is not None
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "tokenwire bench",
        "started_at": outcome.started_at.isoformat(),
        "finished_at": None if outcome.finished_at is None else outcome.finished_at.isoformat(),
        "argv": masked_argv(outcome.argv),
        "exit_code": outcome.exit_code,
        "options": options_dict(opts),
        "setup": {
            "mode": ends.mode,
            "gateway_url": ends.gateway_url,
            "upstream_url": ends.upstream_url,
            "model": ends.model,
            "gateway_pid": ends.gateway_pid,
            "upstream_pid": ends.upstream_pid,
            "passthrough_url": ends.passthrough_url,
            "passthrough_pid": ends.passthrough_pid,
            "gateway_server": opts.gateway_server if ends.mode == "started" else None,
            "gateway_workers": opts.workers if ends.mode == "started" else None,
            "gateway_shared_state": ends.shared_state,
            "upstream_ttft_ms": opts.ttft_ms if started_upstream else None,
            "upstream_itl_ms": opts.itl_ms if started_upstream else None,
            "ws_mode": opts.ws_mode,
            "ws_mux_mode": "envelope",
            "mux_streams_per_socket": opts.mux_streams_per_socket,
            "ws_compression": "on" if opts.ws_compression else "off",
            "ws_compression_negotiated": outcome.ws_compression_negotiated,
            "client": CLIENT_DESCRIPTION,
            "key_max_streams": ends.key_max_streams,
        },
        "environment": outcome.environment,
        "notes": outcome.notes,
        "warmup_problems": outcome.warmup_problems,
        "check": None
        if outcome.check is None
        else {
            "passed": outcome.check.passed,
            "reasons": outcome.check.reasons,
            "notes": outcome.check.notes,
        },
        "leaks": {
            "source": None if ends.admin_key is None else RUNTIME_PATH,
            "settle_s": opts.settle_s,
            "tolerance": dict(TOLERANCE),
            "max_rss_growth_pct": opts.max_rss_growth_pct,
            "per_concurrency": [leak_json(a, opts.max_rss_growth_pct) for a in outcome.leaks],
        },
        "idle_websockets": None
        if idle is None
        else {
            "requested": idle.requested,
            "opened": idle.opened,
            "failed": idle.failed,
            "first_error": idle.first_error,
            "server_rss_before_mib": _round(idle.rss_before_mib, 1),
            "server_rss_after_mib": _round(idle.rss_after_mib, 1),
            "server_kib_per_connection": _round(idle.kib_per_connection, 2),
        },
        "records": [record_json(r, opts.save_itl) for r in outcome.records],
    }


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def describe(outcome: RunOutcome) -> str:
    """What is about to run (or ran), in a few lines."""
    opts, ends = outcome.opts, outcome.endpoints
    load = (
        f"{opts.duration_s:g} s per row"
        if opts.duration_s is not None
        else f"{opts.requests_per_user} request(s) per user"
    )
    upstream = (
        f"sim-upstream TTFT {opts.ttft_ms:g} ms, ITL {opts.itl_ms:g} ms"
        if ends.upstream_pid is not None
        else f"upstream {ends.upstream_url or '(none)'}"
    )
    workers = "" if opts.workers == 1 else f", {opts.workers} workers"
    target = (
        f"gateway {ends.gateway_url} (started, {opts.gateway_server}{workers}, "
        f"pid {ends.gateway_pid})"
        if ends.mode == "started"
        else f"target {ends.gateway_url} model {ends.model} (pid {ends.gateway_pid or '?'})"
    )
    return "\n".join(
        [
            f"{target}; {upstream}",
            f"scenarios {', '.join(s.value for s in opts.scenarios)}; concurrency "
            f"{', '.join(map(str, opts.concurrency))}; {load}; {opts.tokens} tokens each; "
            f"{opts.warmup} warm-up + {opts.rounds} measured round(s), direct first; "
            f"ramp {opts.ramp_s:g} s",
            f"ws: {opts.ws_mode} mode, one socket per user; ws-mux: envelope mode, "
            f"{opts.mux_streams_per_socket} streams per socket; WebSocket compression "
            f"{'on' if opts.ws_compression else 'off'}",
            "leak accounting: "
            + (
                f"GET {RUNTIME_PATH} after the warm-up and after the rows, settled "
                f"{opts.settle_s:g} s"
                if ends.admin_key is not None
                else "no admin key"
            )
            + (
                ""
                if ends.key_max_streams is None
                else f"; the API key allows {ends.key_max_streams} streams"
            ),
        ]
    )


MARKDOWN_COLUMNS = (
    "scenario",
    "conc",
    "ok / req",
    "err",
    "wrong",
    "tok/s",
    "req/s",
    "TTFT p50",
    "TTFT p90",
    "TTFT p99",
    "ITL p50",
    "ITL p99",
    "TPOT p50",
    "E2E p50",
    "E2E p99",
    "tok/s vs direct",
    "Δ TTFT p50",
    "Δ TTFT p99",
    "Δ ITL p99",
    "Δ E2E p50",
    "server CPU s/1k tok",
    "server CPU ms/req",
    "server peak RSS MiB",
    "client KiB/stream",
    "chunks/read",
)


def _row_cells(r: ScenarioRecord) -> list[str]:
    m, o = r.metrics, r.overhead
    if m is None:
        label = r.status + (f": {r.note}" if r.note else "")
        return [r.scenario.value, str(r.concurrency), label, *["-"] * (len(MARKDOWN_COLUMNS) - 3)]
    return [
        r.scenario.value,
        str(r.concurrency),
        f"{m.completed} / {m.requests}",
        str(m.errors),
        str(m.wrong),
        _cell(m.tokens_per_s, ",.0f"),
        _cell(m.requests_per_s, ",.1f"),
        _cell(m.ttft.p50),
        _cell(m.ttft.p90),
        _cell(m.ttft.p99),
        _cell(m.itl.p50),
        _cell(m.itl.p99),
        _cell(m.tpot.p50),
        _cell(m.e2e.p50),
        _cell(m.e2e.p99),
        "-" if o is None else _cell(o.tokens_per_s_ratio, ".3f"),
        "-" if o is None else _signed(o.ttft.p50),
        "-" if o is None else _signed(o.ttft.p99),
        "-" if o is None else _signed(o.itl.p99),
        "-" if o is None else _signed(o.e2e.p50),
        _cell(r.server_cpu_s_per_1k_tokens, ".3f"),
        _cell(r.server_cpu_ms_per_request, ".3f"),
        _cell(r.server_peak_rss_mib, ".0f"),
        _cell(r.client_rss_kib_per_stream, ".1f"),
        _cell(m.chunks_per_read, ".2f"),
    ]


def _loadavg(value: object) -> str:
    if not isinstance(value, list | tuple):
        return "?"
    return " ".join(f"{float(v):.2f}" for v in value)


def markdown(outcome: RunOutcome) -> str:
    """``results.md``: the setup, one table row per scenario x concurrency, notes."""
    lines = ["# tokenwire bench results", ""]
    lines += [f"{line}  " for line in describe(outcome).splitlines()]
    env = outcome.environment
    lines += [
        f"Host: {env.get('cpu_count')} CPUs, load average before {_loadavg(env.get('loadavg'))}, "
        f"after {_loadavg(env.get('loadavg_after'))}; Python {env.get('python')}. Started "
        f"{outcome.started_at.isoformat(timespec='seconds')}; exit code {outcome.exit_code}.",
        "",
        "Latencies in ms (medians over rounds of each round's percentile); Δ = this row - the "
        "direct row of the same round and concurrency; server = sim-upstream for `direct`, the "
        "bare pass-through for `bare`, the gateway otherwise.",
        "",
        "| " + " | ".join(MARKDOWN_COLUMNS) + " |",
        "|" + "---|" * len(MARKDOWN_COLUMNS),
    ]
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in outcome.records]
    idle = outcome.idle
    if idle is not None:
        lines += [
            "",
            f"Idle WebSockets: {idle.opened:,} of {idle.requested:,} open at once "
            f"({idle.failed} failed); gateway RSS {_cell(idle.rss_before_mib)} → "
            f"{_cell(idle.rss_after_mib)} MiB: **{_cell(idle.kib_per_connection)} KiB per "
            "connection**.",
        ]
    lines += leak_markdown(outcome)
    if outcome.check is not None:
        verdict = "PASS" if outcome.check.passed else "FAIL: " + "; ".join(outcome.check.reasons)
        lines += ["", f"Check: {verdict}"]
        lines += [f"- {note}" for note in outcome.check.notes]
    problems = [
        f"- {r.scenario.value} c={r.concurrency}: {p}"
        for r in outcome.records
        if r.metrics is not None
        for p in r.metrics.problems
    ]
    notes = [f"- {n}" for n in outcome.notes + outcome.warmup_problems]
    if problems:
        lines += ["", "Problems:", *problems]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def write_all(outcome: RunOutcome, out_dir: Path) -> list[Path]:
    """Write ``results.json`` and ``results.md``; return their paths."""
    json_path = out_dir / "results.json"
    encoded = msgspec.json.encode(build_document(outcome))
    json_path.write_bytes(msgspec.json.format(encoded, indent=1) + b"\n")
    md_path = out_dir / "results.md"
    md_path.write_text(markdown(outcome))
    return [json_path, md_path]


def print_tables(outcome: RunOutcome, console: Console) -> None:
    """Throughput and resources, then latency and overhead, then the verdict."""
    first = Table(title="Throughput, correctness, resources (median over rounds)")
    for col in ("scenario", "conc", "ok/req", "err", "wrong", "tok/s", "req/s", "vs direct",
                "server CPU s/1k", "ms/req", "server RSS MiB", "client KiB/str",
                "chunks/read"):  # fmt: skip
        first.add_column(col, justify="right")
    second = Table(title="Latency, ms: p50 / p90 / p99 (Δ vs direct: p50 / p99)")
    for col in ("scenario", "conc", "TTFT", "ITL", "TPOT", "E2E", "Δ TTFT", "Δ ITL", "Δ E2E"):
        second.add_column(col, justify="right")

    def dist3(d: Dist) -> str:
        return " / ".join(_cell(getattr(d, s)) for s in DIST_STATS[:3])

    def delta(get: Callable[[Overhead], Dist], o: Overhead | None) -> str:
        return "-" if o is None else f"{_signed(get(o).p50)} / {_signed(get(o).p99)}"

    for r in outcome.records:
        m, o = r.metrics, r.overhead
        if m is None:
            first.add_row(r.scenario.value, str(r.concurrency), r.status, *["-"] * 10)
            continue
        first.add_row(
            r.scenario.value,
            str(r.concurrency),
            f"{m.completed}/{m.requests}",
            str(m.errors),
            str(m.wrong),
            _cell(m.tokens_per_s, ",.0f"),
            _cell(m.requests_per_s, ",.1f"),
            "-" if o is None else _cell(o.tokens_per_s_ratio, ".3f"),
            _cell(r.server_cpu_s_per_1k_tokens, ".3f"),
            _cell(r.server_cpu_ms_per_request, ".3f"),
            _cell(r.server_peak_rss_mib, ".0f"),
            _cell(r.client_rss_kib_per_stream, ".1f"),
            _cell(m.chunks_per_read, ".2f"),
        )
        second.add_row(
            r.scenario.value,
            str(r.concurrency),
            dist3(m.ttft),
            dist3(m.itl),
            dist3(m.tpot),
            dist3(m.e2e),
            delta(lambda x: x.ttft, o),
            delta(lambda x: x.itl, o),
            delta(lambda x: x.e2e, o),
        )
    console.print(first)
    console.print(second)
    for r in outcome.records:
        if r.note and r.status != "ok":
            console.print(f"{r.scenario.value} c={r.concurrency}: {r.status}: {r.note}")
        if r.metrics is not None:
            for problem in r.metrics.problems:
                console.print(f"{r.scenario.value} c={r.concurrency}: {problem}", highlight=False)
    for note in outcome.notes + outcome.warmup_problems:
        console.print(f"note: {note}", highlight=False)
    print_leaks(outcome, console)
    if outcome.check is not None:
        for note in outcome.check.notes:
            console.print(f"check: {note}", highlight=False)
        if outcome.check.passed:
            console.print("[bold green]check PASS[/bold green]")
        else:
            console.print(f"[bold red]check FAIL[/bold red] {'; '.join(outcome.check.reasons)}")
    failed = outcome.failed_records()
    if failed:
        names = ", ".join(f"{r.scenario.value} c={r.concurrency}" for r in failed)
        console.print(f"[bold red]errors or wrong outputs in:[/bold red] {names}")


def scenario_label(scenario: Scenario) -> str:
    """The scenario's name and what it measures."""
    return f"{scenario.value}: {SCENARIO_DESCRIPTIONS[scenario]}"
