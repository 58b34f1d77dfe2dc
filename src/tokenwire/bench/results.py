"""Rows as they were run, and their aggregation into one record per scenario x concurrency.

A *row* is one scenario at one concurrency in one measured round. A *record* joins the
rounds of one scenario x concurrency: counts are totals, every other figure is the median over
rounds (the machine is shared and noisy), and the gateway overhead is taken per round against
the ``direct`` row of the same round and concurrency before the median is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from tokenwire.bench.leaks import LeakAccount
from tokenwire.bench.metrics import (
    Overhead,
    RequestRecord,
    RowMetrics,
    median_or_none,
    median_overhead,
    median_rows,
    overhead,
)
from tokenwire.bench.options import BenchOptions, Scenario
from tokenwire.bench.resources import ResourceUsage
from tokenwire.bench.servers import Endpoints
from tokenwire.bench.ws import IdleResult

GATEWAY = "gateway"
UPSTREAM = "upstream"
PASSTHROUGH = "passthrough"
CLIENT = "client"


def server_of(scenario: Scenario) -> str:
    """The process a scenario's client talks to (whose CPU and RSS are its row's server's)."""
    if scenario is Scenario.DIRECT:
        return UPSTREAM
    return PASSTHROUGH if scenario is Scenario.BARE else GATEWAY


@dataclass(slots=True)
class RowRun:
    """One measured row (or why it did not run: ``unsupported``, ``skipped``)."""

    scenario: Scenario
    concurrency: int
    round: int
    status: str = "ok"  # "ok" | "unsupported" | "skipped"
    note: str | None = None
    metrics: RowMetrics | None = None
    resources: ResourceUsage | None = None
    client_baseline_rss_mib: float | None = None
    connect_s: float | None = None
    compression: bool | None = None
    records: list[RequestRecord] = field(default_factory=list)

    @property
    def server(self) -> str:
        """The process the client talks to: sim-upstream for ``direct``, the pass-through for
        ``bare``, else the gateway."""
        return server_of(self.scenario)

    def cpu_s_per_1k_tokens(self, process: str) -> float | None:
        """CPU seconds of ``process`` per 1,000 output tokens in this row."""
        if self.metrics is None or self.resources is None or not self.metrics.output_tokens:
            return None
        cpu = self.resources.cpu_s.get(process)
        return None if cpu is None else cpu / self.metrics.output_tokens * 1000

    def cpu_ms_per_request(self, process: str) -> float | None:
        """CPU milliseconds of ``process`` per request sent in this row."""
        if self.metrics is None or self.resources is None or not self.metrics.requests:
            return None
        cpu = self.resources.cpu_s.get(process)
        return None if cpu is None else cpu / self.metrics.requests * 1000

    def peak_rss_mib(self, process: str) -> float | None:
        return None if self.resources is None else self.resources.peak_rss_mib.get(process)

    @property
    def client_rss_kib_per_stream(self) -> float | None:
        """(Client peak RSS during the row - the worker's RSS when it started) / concurrency."""
        peak = self.peak_rss_mib(CLIENT)
        if peak is None or self.client_baseline_rss_mib is None:
            return None
        return (peak - self.client_baseline_rss_mib) * 1024 / self.concurrency


@dataclass(slots=True)
class ScenarioRecord:
    """One scenario at one concurrency, over all measured rounds."""

    scenario: Scenario
    concurrency: int
    status: str
    note: str | None
    rows: list[RowRun]
    expected_requests: int | None
    metrics: RowMetrics | None = None
    overhead: Overhead | None = None
    server_cpu_s_per_1k_tokens: float | None = None
    server_cpu_ms_per_request: float | None = None
    server_peak_rss_mib: float | None = None
    upstream_cpu_s_per_1k_tokens: float | None = None
    client_cpu_s_per_1k_tokens: float | None = None
    client_rss_kib_per_stream: float | None = None
    host_cpu_percent: float | None = None

    @property
    def failed(self) -> bool:
        """Errors or wrong outputs in any measured round."""
        return self.metrics is not None and (self.metrics.errors > 0 or self.metrics.wrong > 0)


def expected_requests(opts: BenchOptions, concurrency: int) -> int | None:
    """Requests a row of ``concurrency`` users sends per round (None with ``--duration``)."""
    return None if opts.duration_s is not None else concurrency * opts.requests_per_user


def aggregate(rows: list[RowRun], opts: BenchOptions) -> list[ScenarioRecord]:
    """One record per scenario x concurrency, in run order (concurrency, then scenario)."""
    keys: list[tuple[int, Scenario]] = []
    for row in rows:
        if (row.concurrency, row.scenario) not in keys:
            keys.append((row.concurrency, row.scenario))
    direct = {
        (r.concurrency, r.round): r.metrics
        for r in rows
        if r.scenario is Scenario.DIRECT and r.metrics is not None
    }
    records: list[ScenarioRecord] = []
    for concurrency, scenario in sorted(keys, key=lambda k: (k[0], list(Scenario).index(k[1]))):
        group = [r for r in rows if r.scenario is scenario and r.concurrency == concurrency]
        ran = [r for r in group if r.metrics is not None]
        per_round = expected_requests(opts, concurrency)
        record = ScenarioRecord(
            scenario=scenario,
            concurrency=concurrency,
            status="ok" if ran else group[0].status,
            note=next((r.note for r in group if r.note), None),
            rows=group,
            expected_requests=None if per_round is None else per_round * len(ran or group),
        )
        if ran:
            record.metrics = median_rows([r.metrics for r in ran if r.metrics is not None])
            if scenario is not Scenario.DIRECT:
                record.overhead = median_overhead(
                    [
                        overhead(r.metrics, base)
                        for r in ran
                        if r.metrics is not None
                        and (base := direct.get((concurrency, r.round))) is not None
                    ]
                )
            record.server_cpu_s_per_1k_tokens = median_or_none(
                r.cpu_s_per_1k_tokens(r.server) for r in ran
            )
            record.server_cpu_ms_per_request = median_or_none(
                r.cpu_ms_per_request(r.server) for r in ran
            )
            record.upstream_cpu_s_per_1k_tokens = median_or_none(
                r.cpu_s_per_1k_tokens(UPSTREAM) for r in ran
            )
            record.client_cpu_s_per_1k_tokens = median_or_none(
                r.cpu_s_per_1k_tokens(CLIENT) for r in ran
            )
            peaks = [p for r in ran if (p := r.peak_rss_mib(r.server)) is not None]
            record.server_peak_rss_mib = max(peaks) if peaks else None
            record.client_rss_kib_per_stream = median_or_none(
                r.client_rss_kib_per_stream for r in ran
            )
            record.host_cpu_percent = median_or_none(
                r.resources.host_cpu_percent if r.resources else None for r in ran
            )
        records.append(record)
    return records


@dataclass(frozen=True, slots=True)
class CheckResult:
    """``--check``: ``sse`` against ``direct`` at every concurrency, leaks and RSS growth."""

    passed: bool
    reasons: list[str]
    notes: list[str] = field(default_factory=list)  # what was not judged, and why


def check(
    records: list[ScenarioRecord], opts: BenchOptions, leaks: list[LeakAccount] | None = None
) -> CheckResult:
    """Pass when nothing below fails.

    - At every concurrency, ``sse`` keeps ``--min-ratio`` of direct's tokens/s and adds at
      most ``--max-ttft-overhead-ms`` to TTFT p50 (judged when both scenarios are asked for).
    - The gateway holds no more after the rows than after the warm-up (each count within its
      tolerance, :mod:`tokenwire.bench.leaks`), and its peak RSS in the measured rows is at
      most ``--max-rss-growth-pct`` above its RSS at the end of the warm-up.
    """
    reasons: list[str] = []
    notes: list[str] = []
    sse_records = [r for r in records if r.scenario is Scenario.SSE and r.overhead is not None]
    both = Scenario.DIRECT in opts.scenarios and Scenario.SSE in opts.scenarios
    if both and not sse_records:
        reasons.append("--check: no sse row has a direct row to compare with")
    elif not both:
        notes.append("throughput and TTFT not judged: that needs the direct and sse scenarios")
    for r in sse_records:
        assert r.overhead is not None
        ratio = r.overhead.tokens_per_s_ratio
        ttft = r.overhead.ttft.p50
        if ratio is None or ratio < opts.min_ratio:
            reasons.append(f"c={r.concurrency}: tokens/s ratio {ratio} < {opts.min_ratio:.2f}")
        if ttft is None or ttft > opts.max_ttft_overhead_ms:
            reasons.append(
                f"c={r.concurrency}: TTFT p50 overhead {ttft} ms > {opts.max_ttft_overhead_ms:g}"
            )
    accounts = leaks or []
    for account in accounts:
        reasons += account.reasons(opts.max_rss_growth_pct)
    if not any(a.counts() for a in accounts):
        notes.append("leaks not judged: no runtime counts (--target without --admin-key)")
    if not any(a.rss_growth_pct is not None for a in accounts):
        notes.append("RSS growth not judged: the gateway's RSS was not sampled")
    if not both and not any(a.counts() or a.rss_growth_pct is not None for a in accounts):
        reasons.append("--check had nothing to judge")
    return CheckResult(passed=not reasons, reasons=reasons, notes=notes)


@dataclass(slots=True)
class RunOutcome:
    """Everything one run produced, for the report."""

    opts: BenchOptions
    argv: list[str]
    started_at: datetime
    endpoints: Endpoints
    environment: dict[str, object]
    finished_at: datetime | None = None
    rows: list[RowRun] = field(default_factory=list)
    records: list[ScenarioRecord] = field(default_factory=list)
    idle: IdleResult | None = None
    check: CheckResult | None = None
    leaks: list[LeakAccount] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ws_compression_negotiated: bool | None = None
    warmup_problems: list[str] = field(default_factory=list)
    exit_code: int = 0

    def failed_records(self) -> list[ScenarioRecord]:
        """Records with errors or wrong outputs."""
        return [r for r in self.records if r.failed]
