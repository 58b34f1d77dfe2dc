"""The schedule of a run, and its exit code.

For each concurrency (ascending): ``--warmup`` unrecorded rounds of every scenario (one request
per user: connections opened, caches warm), then ``--rounds`` measured rounds, each running
the scenarios in order with ``direct`` first (A/B alternation: every round has its own
baseline), with ``--pause-s`` between rows. ``--idle-websockets`` runs first, on the fresh
gateway.

Leak accounting (:mod:`tokenwire.bench.leaks`, when an admin key can read the gateway's
runtime counts): after the warm-up the load generators close their connections and the
gateway's counts are taken once it is quiet; one more warm-up round then opens the
connections again, so the measured rows start warm as before; after the last measured row
the connections are closed again and the counts taken again.

Exit codes: 0 every row completed correctly (and ``--check`` passed); 1 a row had errors or
wrong outputs, ``--check`` failed, or a load generator failed; 2 the servers would not start
or an optional package is missing; 130 Ctrl-C; 128 + N on signal N (SIGTERM, SIGHUP). The
servers and load generators it started are stopped in every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from tokenwire.bench import report, ws
from tokenwire.bench.errors import MissingDependency, ServerStartFailed, WorkerFailed
from tokenwire.bench.ipc import RowSpec
from tokenwire.bench.leaks import LeakAccount, ProbeError, RuntimeProbe, poll_peaks, settle
from tokenwire.bench.loadgen import LoadGenerator
from tokenwire.bench.metrics import summarize_row
from tokenwire.bench.options import UPSTREAM_MODEL, BenchOptions, Scenario
from tokenwire.bench.resources import ProcessWatch, host_facts, raise_nofile_limit, sample
from tokenwire.bench.results import (
    CLIENT,
    GATEWAY,
    PASSTHROUGH,
    UPSTREAM,
    RowRun,
    RunOutcome,
    aggregate,
    check,
    expected_requests,
)
from tokenwire.bench.servers import Endpoints, Profiler, ServerStack, clean_env

T = TypeVar("T")
EXIT_OK, EXIT_FAILED, EXIT_NO_SERVERS, EXIT_INTERRUPTED = 0, 1, 2, 130
FD_HEADROOM = 1024


@dataclass(slots=True)
class RunContext:
    """What the rows of one run share."""

    opts: BenchOptions
    endpoints: Endpoints
    workdir: Path
    console: Console
    progress: Progress
    rows_task: TaskID
    requests_task: TaskID
    loadgens: dict[Scenario, LoadGenerator] = field(default_factory=dict)
    client_watches: dict[Scenario, ProcessWatch] = field(default_factory=dict)
    client_baselines: dict[Scenario, float | None] = field(default_factory=dict)
    server_watches: dict[str, ProcessWatch] = field(default_factory=dict)
    unsupported: dict[Scenario, str] = field(default_factory=dict)
    profiler: Profiler | None = None
    probe_problem: str | None = None  # an admin key was given but the runtime counts failed


def _headers_json(key: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
    }


def row_spec(
    ctx: RunContext,
    scenario: Scenario,
    concurrency: int,
    tag: str,
    measured: bool,
    warm_for: float | None = None,
) -> RowSpec | str:
    """The worker's instructions for a row, or why the row cannot run.

    A warm-up row sends one request per user, or, with ``warm_for`` (``--warmup-s``), keeps
    the load going that long, so a soak's baseline is taken in the steady state.
    """
    opts, ends = ctx.opts, ctx.endpoints
    common: dict[str, Any] = {
        "row_id": tag,
        "scenario": scenario.value,
        "concurrency": concurrency,
        "requests_per_user": opts.requests_per_user if measured else 1,
        "duration_s": opts.duration_s if measured else warm_for,
        "tokens": opts.tokens,
        "ramp_s": opts.ramp_s,
        "timeout_s": opts.timeout_s,
    }
    if scenario in (Scenario.DIRECT, Scenario.BARE):  # the simulator's own model name
        direct = scenario is Scenario.DIRECT
        base = ends.upstream_url if direct else ends.passthrough_url
        if base is None:
            if direct:
                return "no upstream to measure directly (--target without --upstream)"
            return "no upstream to pass through to (--target without --upstream)"
        return RowSpec(
            transport="sse",
            url=base + "/v1/chat/completions",
            headers=_headers_json("sim"),
            model=UPSTREAM_MODEL,
            **common,
        )
    if scenario.transport in ("sse", "json"):
        return RowSpec(
            transport=scenario.transport,
            url=ends.gateway_url + "/v1/chat/completions",
            headers=_headers_json(ends.key),
            model=ends.model,
            keep_alive=scenario is not Scenario.SSE_NEW_CONN,
            **common,
        )
    mux = scenario is Scenario.WS_MUX
    return RowSpec(
        transport="ws",
        url=ws.ws_url(ends.gateway_url),
        headers={"Authorization": f"Bearer {ends.key}"},
        model=ends.model,
        streams_per_socket=opts.mux_streams_per_socket if mux else 1,
        ws_mode="envelope" if mux else opts.ws_mode,
        ws_compression=opts.ws_compression,
        **common,
    )


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


async def run_row(
    ctx: RunContext, scenario: Scenario, concurrency: int, label: str, round_no: int
) -> RowRun:
    """Prepare, sample and run one row; ``round_no`` 0 is a warm-up."""
    row = RowRun(scenario=scenario, concurrency=concurrency, round=round_no)
    if scenario in ctx.unsupported:
        row.status, row.note = "unsupported", ctx.unsupported[scenario]
        return row
    tag = f"{scenario.value}-c{concurrency}-{label}"
    warm_for = ctx.opts.warmup_s if label.startswith("warm-up") else None
    spec = row_spec(ctx, scenario, concurrency, tag, measured=round_no > 0, warm_for=warm_for)
    if isinstance(spec, str):
        row.status, row.note = "skipped", spec
        return row
    generator = ctx.loadgens[scenario]
    prepared = await generator.prepare(spec)
    if prepared.unsupported is not None:
        ctx.unsupported[scenario] = prepared.unsupported
        row.status, row.note = "unsupported", prepared.unsupported
        return row
    row.connect_s, row.compression = prepared.connect_s, prepared.compression
    expected = expected_requests(ctx.opts, concurrency) if round_no > 0 else concurrency
    ctx.progress.update(
        ctx.requests_task,
        description=f"{label} {scenario.value} c={concurrency}",
        total=expected,
        completed=0,
    )
    watches = {**ctx.server_watches, CLIENT: ctx.client_watches[scenario]}
    async with sample(watches) as usage:
        done = await generator.go(lambda n: ctx.progress.update(ctx.requests_task, completed=n))
    row.metrics = summarize_row(done.records, done.wall_s)
    row.resources = usage
    row.client_baseline_rss_mib = ctx.client_baselines.get(scenario)
    row.records = done.records
    m = row.metrics
    ctx.console.print(
        f"{label:<9} {scenario.value:<12} c={concurrency:<5} {m.tokens_per_s:9,.0f} tok/s  "
        f"TTFT p50 {_fmt(m.ttft.p50):>7} p99 {_fmt(m.ttft.p99):>7} ms  "
        f"ITL p99 {_fmt(m.itl.p99):>6} ms  ok {m.completed}/{m.requests}  "
        f"err {m.errors}  wrong {m.wrong}  CPU {_fmt(row.cpu_ms_per_request(row.server), '.3f')} "
        "ms/req",
        highlight=False,
    )
    return row


Step = tuple[str, int, Scenario]  # (label, round number (0 = warm-up), scenario)


def warmup_steps(opts: BenchOptions) -> list[Step]:
    """The unrecorded rounds before the measured ones."""
    return [
        (f"warm-up {number}", 0, scenario)
        for number in range(1, opts.warmup + 1)
        for scenario in opts.scenarios
    ]


def rewarm_steps(opts: BenchOptions) -> list[Step]:
    """One more warm-up round after the leak baseline (which closed the connections)."""
    return [("re-warm", 0, scenario) for scenario in opts.scenarios] if opts.warmup else []


def measured_steps(opts: BenchOptions) -> list[Step]:
    """The measured rounds, scenarios in order (direct first)."""
    return [
        (f"round {number}", number, scenario)
        for number in range(1, opts.rounds + 1)
        for scenario in opts.scenarios
    ]


def schedule(opts: BenchOptions, leaks: bool) -> Iterator[tuple[int, str, int, Scenario]]:
    """(concurrency, label, round number (0 = warm-up), scenario) in run order."""
    for concurrency in opts.concurrency:
        steps = warmup_steps(opts) + (rewarm_steps(opts) if leaks else []) + measured_steps(opts)
        for label, round_no, scenario in steps:
            yield concurrency, label, round_no, scenario


async def start_loadgens(ctx: RunContext) -> None:
    """One load generator per scenario, started together; their RSS when ready."""
    env = clean_env()
    for scenario in ctx.opts.scenarios:
        ctx.loadgens[scenario] = LoadGenerator(
            scenario.value, ctx.workdir / f"loadgen-{scenario.value}.log"
        )
    await asyncio.gather(*(g.start(env) for g in ctx.loadgens.values()))
    for scenario, generator in ctx.loadgens.items():
        assert generator.pid is not None
        watch = ProcessWatch(generator.pid)
        ctx.client_watches[scenario] = watch
        ctx.client_baselines[scenario] = watch.rss_mib()


async def idle_websockets(ctx: RunContext, outcome: RunOutcome) -> None:
    """Hold ``--idle-websockets`` sockets open at once; the gateway's RSS per connection."""
    gateway = ctx.server_watches.get(GATEWAY)
    ctx.console.print(
        f"opening {ctx.opts.idle_websockets:,} idle WebSockets to the gateway...",
        highlight=False,
    )
    outcome.idle = await ws.hold_idle(
        ws.ws_url(ctx.endpoints.gateway_url),
        {"Authorization": f"Bearer {ctx.endpoints.key}"},
        ctx.opts.idle_websockets,
        (lambda: None) if gateway is None else gateway.rss_mib,
        compression=ctx.opts.ws_compression,
    )
    idle = outcome.idle
    ctx.console.print(
        f"idle WebSockets: {idle.opened:,} open ({idle.failed} failed); gateway RSS "
        f"{_fmt(idle.rss_before_mib)} → {_fmt(idle.rss_after_mib)} MiB, "
        f"{_fmt(idle.kib_per_connection)} KiB per connection",
        highlight=False,
    )


async def run_steps(
    ctx: RunContext, outcome: RunOutcome, concurrency: int, steps: list[Step]
) -> list[RowRun]:
    """Run rows in order; keep the measured ones, note problems in the warm-up ones."""
    rows: list[RowRun] = []
    for label, round_no, scenario in steps:
        if round_no > 0 and ctx.profiler is None and ctx.opts.profile is not None:
            ctx.profiler = await start_profiler(ctx, outcome)
        row = await run_row(ctx, scenario, concurrency, label, round_no)
        if round_no > 0:
            outcome.rows.append(row)
            rows.append(row)
        elif row.metrics is not None and (row.metrics.errors or row.metrics.wrong):
            outcome.warmup_problems.append(
                f"{label} {scenario.value} c={concurrency}: {row.metrics.errors} errors, "
                f"{row.metrics.wrong} wrong: {'; '.join(row.metrics.problems)}"
            )
        ctx.progress.advance(ctx.rows_task)
        if row.metrics is not None and ctx.opts.pause_s:
            await asyncio.sleep(ctx.opts.pause_s)
    return rows


async def runtime_probe(ctx: RunContext, outcome: RunOutcome) -> RuntimeProbe | None:
    """A reader of the gateway's runtime counts, or None (with a note) when there is none."""
    admin_key = ctx.endpoints.admin_key
    if admin_key is None:
        return None
    probe = RuntimeProbe(ctx.endpoints.gateway_url, admin_key)
    try:
        await probe.read()
    except ProbeError as exc:
        outcome.notes.append(f"leak accounting impossible: {exc}")
        ctx.probe_problem = str(exc)
        return None
    return probe


async def snapshot(
    ctx: RunContext, probe: RuntimeProbe, account: LeakAccount, baseline: bool
) -> None:
    """Close the clients' connections, let the gateway settle, take its counts."""
    ctx.progress.update(
        ctx.requests_task,
        description=f"c={account.concurrency}: gateway settling, counting what it holds",
        total=None,
        completed=0,
    )
    await asyncio.gather(*(g.release() for g in ctx.loadgens.values()))
    try:
        taken = await settle(
            probe.read, ctx.opts.settle_s, baseline=None if baseline else account.before
        )
    except ProbeError as exc:
        account.problems.append(f"no runtime counts {'before' if baseline else 'after'}: {exc}")
        return
    gateway = ctx.server_watches.get(GATEWAY)
    taken.rss_mib = None if gateway is None else gateway.rss_mib()
    if baseline:
        account.before = taken
    else:
        account.after = taken
    counts = ", ".join(f"{k} {v}" for k, v in taken.counts.items())
    ctx.console.print(
        f"{'before' if baseline else 'after':<9} c={account.concurrency:<5} pid {taken.pid}: "
        f"{counts} ({taken.waited_s:.1f} s)",
        highlight=False,
    )


async def measure_concurrency(
    ctx: RunContext, outcome: RunOutcome, concurrency: int, probe: RuntimeProbe | None
) -> None:
    """Warm-up, leak baseline, re-warm, measured rounds, leak count at one concurrency."""
    opts = ctx.opts
    gateway = ctx.server_watches.get(GATEWAY)
    account = LeakAccount(concurrency)
    if ctx.probe_problem is not None:
        account.problems.append(f"leak accounting impossible: {ctx.probe_problem}")
    if probe is not None or gateway is not None or ctx.probe_problem is not None:
        outcome.leaks.append(account)
    await run_steps(ctx, outcome, concurrency, warmup_steps(opts))
    if probe is not None:
        await snapshot(ctx, probe, account, baseline=True)
        await run_steps(ctx, outcome, concurrency, rewarm_steps(opts))
    if gateway is not None:
        account.rss_after_warmup_mib = gateway.rss_mib()
    rss = (lambda: None) if gateway is None else gateway.rss_mib
    peaks = None if probe is None else asyncio.create_task(poll_peaks(probe.read, account, rss))
    try:
        rows = await run_steps(ctx, outcome, concurrency, measured_steps(opts))
    finally:
        if peaks is not None:
            peaks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await peaks
    measured = [p for r in rows if (p := r.peak_rss_mib(GATEWAY)) is not None]
    account.rss_peak_mib = max(measured) if measured else None
    if probe is not None:
        await snapshot(ctx, probe, account, baseline=False)


async def measure(ctx: RunContext, outcome: RunOutcome) -> None:
    """Start the load generators, run the idle sockets and every row, stop the generators."""
    ends = ctx.endpoints
    if ends.gateway_pid is not None:
        ctx.server_watches[GATEWAY] = ProcessWatch(
            ends.gateway_pid, include_children=ends.gateway_children
        )
    if ends.upstream_pid is not None:
        ctx.server_watches[UPSTREAM] = ProcessWatch(ends.upstream_pid)
    if ends.passthrough_pid is not None:
        ctx.server_watches[PASSTHROUGH] = ProcessWatch(ends.passthrough_pid)
    try:
        await start_loadgens(ctx)
        probe = await runtime_probe(ctx, outcome)
        if ctx.opts.idle_websockets:
            await idle_websockets(ctx, outcome)
        ctx.progress.update(
            ctx.rows_task, total=len(list(schedule(ctx.opts, leaks=probe is not None)))
        )
        for concurrency in ctx.opts.concurrency:
            await measure_concurrency(ctx, outcome, concurrency, probe)
    finally:
        if ctx.profiler is not None:
            await ctx.profiler.stop()
        await asyncio.gather(*(g.stop() for g in ctx.loadgens.values()), return_exceptions=True)


async def start_profiler(ctx: RunContext, outcome: RunOutcome) -> Profiler:
    """py-spy on the gateway from the first measured row on."""
    assert ctx.opts.profile is not None and ctx.endpoints.gateway_pid is not None
    profiler = Profiler(
        ctx.endpoints.gateway_pid, ctx.opts.profile, subprocesses=ctx.endpoints.gateway_children
    )
    note = await profiler.start()
    outcome.notes.append(note or f"py-spy profile of the gateway: {ctx.opts.profile}")
    return profiler


def run_loop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` on uvloop when available (as the servers and workers do)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def environment() -> dict[str, object]:
    """Host and library facts for the report."""
    import aiohttp
    import msgspec
    from websockets.version import version as websockets_version

    import tokenwire

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        **host_facts(),
        "tokenwire": getattr(tokenwire, "__version__", None),
        "aiohttp": aiohttp.__version__,
        "websockets": websockets_version,
        "msgspec": msgspec.__version__,
    }


def exit_code(outcome: RunOutcome) -> int:
    """1 when a row failed or ``--check`` failed, else 0."""
    if outcome.failed_records() or (outcome.check is not None and not outcome.check.passed):
        return EXIT_FAILED
    return EXIT_OK


@contextlib.contextmanager
def signals_raise_system_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit(128 + N) so ``finally`` blocks stop the servers."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(opts: BenchOptions, argv: list[str], console: Console | None = None) -> int:
    """Run the benchmark; write the results; return the exit code."""
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    started_at = datetime.now(UTC)
    out_dir = opts.out_dir(started_at.astimezone())
    if opts.plots:
        from tokenwire.bench.plots import require_matplotlib

        try:
            require_matplotlib()
        except MissingDependency as exc:
            console.print(f"[bold red]error:[/bold red] {exc.message}", highlight=False)
            return EXIT_NO_SERVERS
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-bench-"))
    stack = ServerStack(workdir)
    loadgens: dict[Scenario, LoadGenerator] = {}
    wanted_fds = max(opts.concurrency) * 2 + opts.idle_websockets + FD_HEADROOM
    soft, _hard = raise_nofile_limit(wanted_fds)
    with signals_raise_system_exit():
        try:
            endpoints = stack.start(opts)
            outcome = RunOutcome(
                opts=opts,
                argv=argv,
                started_at=started_at,
                endpoints=endpoints,
                environment={**environment(), "rlimit_nofile": soft},
                notes=list(endpoints.notes),
            )
            if soft < wanted_fds:
                outcome.notes.append(
                    f"RLIMIT_NOFILE is {soft}, below the {wanted_fds} this run may need"
                )
            console.print(report.describe(outcome), highlight=False)
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as progress:
                ctx = RunContext(
                    opts=opts,
                    endpoints=endpoints,
                    workdir=workdir,
                    console=console,
                    progress=progress,
                    rows_task=progress.add_task("rows", total=None),
                    requests_task=progress.add_task("requests", total=None),
                    loadgens=loadgens,
                )

                async def main() -> None:
                    await measure(ctx, outcome)

                run_loop(main)
            finish(outcome, out_dir, console)
            return outcome.exit_code
        except ServerStartFailed as exc:
            console.print(f"[bold red]servers did not start:[/bold red] {exc.message}")
            return EXIT_NO_SERVERS
        except WorkerFailed as exc:
            console.print(f"[bold red]load generator failed:[/bold red] {exc.message}")
            return EXIT_FAILED
        except KeyboardInterrupt:
            console.print("interrupted; stopping what bench started")
            return EXIT_INTERRUPTED
        finally:
            for generator in loadgens.values():
                generator.kill()
            stack.stop()
            if opts.keep_temp:
                console.print(f"temp dir kept: {workdir}", highlight=False)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def finish(outcome: RunOutcome, out_dir: Path, console: Console) -> None:
    """Aggregate, judge, print and write everything."""
    opts = outcome.opts
    outcome.finished_at = datetime.now(UTC)
    outcome.environment["loadavg_after"] = list(os.getloadavg())
    outcome.records = aggregate(outcome.rows, opts)
    negotiated = [r.compression for r in outcome.rows if r.compression is not None]
    outcome.ws_compression_negotiated = any(negotiated) if negotiated else None
    if opts.check:
        outcome.check = check(outcome.records, opts, outcome.leaks)
    outcome.exit_code = exit_code(outcome)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.print_tables(outcome, console)
    written = report.write_all(outcome, out_dir)
    if opts.plots:
        from tokenwire.bench.plots import write_plots

        started = time.perf_counter()
        written += write_plots(outcome.records, out_dir)
        console.print(f"plots in {time.perf_counter() - started:.1f} s", highlight=False)
    for path in written:
        console.print(f"wrote {path}", highlight=False)
