"""Metric definitions (vLLM ``bench serve``, ``docs/benchmarks.md``) and their aggregation.

All stamps are ``time.perf_counter()`` seconds taken by the client; distributions are reported
in milliseconds. A request's timeline is its send stamp and one stamp per content-bearing chunk
(a chunk whose ``delta.content`` is non-empty):

- TTFT = first content stamp - send.
- E2E = last content stamp - send (the finish-reason chunk, the usage chunk, ``[DONE]`` and
  ``chat.completion.done`` do not count).
- ITL = every gap between consecutive content stamps, pooled over all requests of a row.
- TPOT = (E2E - TTFT) / (output tokens - 1), per request; undefined below two tokens.

Requests that failed (HTTP error, transport error, in-band error, no end marker) are left out of
the latency figures; requests with wrong output are counted but kept in them.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

import msgspec


class RequestRecord(msgspec.Struct, frozen=True, array_like=True):
    """What one request saw, reduced to the figures the report needs (seconds)."""

    user: int
    index: int
    ttft_s: float | None
    e2e_s: float | None
    tpot_s: float | None
    itl_s: list[float]
    output_tokens: int
    content_chunks: int
    reads: int
    error: str | None = None
    wrong: str | None = None

    @property
    def ok(self) -> bool:
        """Completed without error and with the expected output."""
        return self.error is None and self.wrong is None


@dataclass(frozen=True, slots=True)
class Timeline:
    """TTFT, E2E, TPOT (seconds; None when undefined) and the ITL gaps of one request."""

    ttft_s: float | None
    e2e_s: float | None
    tpot_s: float | None
    itl_s: list[float]


def timeline(sent: float, stamps: Sequence[float], output_tokens: int) -> Timeline:
    """The per-request figures from the send stamp and the content-chunk stamps."""
    if not stamps:
        return Timeline(None, None, None, [])
    ttft = stamps[0] - sent
    e2e = stamps[-1] - sent
    tpot = (e2e - ttft) / (output_tokens - 1) if output_tokens > 1 else None
    itl = [b - a for a, b in itertools.pairwise(stamps)]
    return Timeline(ttft, e2e, tpot, itl)


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile of sorted data, linear interpolation (numpy's default)."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class Dist:
    """p50, p90, p99 and mean of a sample in milliseconds (None for an empty sample)."""

    p50: float | None
    p90: float | None
    p99: float | None
    mean: float | None
    count: int

    @staticmethod
    def empty() -> Dist:
        return Dist(None, None, None, None, 0)


DIST_STATS = ("p50", "p90", "p99", "mean")


def dist_ms(seconds: Iterable[float]) -> Dist:
    """:class:`Dist` of durations given in seconds."""
    ordered = sorted(s * 1000 for s in seconds)
    if not ordered:
        return Dist.empty()
    return Dist(
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p99=percentile(ordered, 99),
        mean=statistics.fmean(ordered),
        count=len(ordered),
    )


@dataclass(frozen=True, slots=True)
class RowMetrics:
    """The client-side figures of one row (one scenario, one concurrency, one round)."""

    requests: int
    completed: int
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
    chunks_per_read: float | None
    tokens_per_chunk: float | None
    problems: list[str]


def summarize_row(records: Sequence[RequestRecord], wall_s: float) -> RowMetrics:
    """Aggregate a row's records; wall time is first send → last stream end.

    Throughput counts the output tokens of requests without error (wrong ones included: they
    were delivered). ``chunks_per_read`` is content chunks per network read, for transports
    that can see reads (SSE); None otherwise.
    """
    streamed = [r for r in records if r.error is None]
    output = sum(r.output_tokens for r in streamed)
    chunks = sum(r.content_chunks for r in streamed)
    reads = sum(r.reads for r in streamed)
    problems = sorted({p for r in records for p in (r.error, r.wrong) if p is not None})
    return RowMetrics(
        requests=len(records),
        completed=sum(1 for r in records if r.ok),
        errors=sum(1 for r in records if r.error is not None),
        wrong=sum(1 for r in records if r.error is None and r.wrong is not None),
        output_tokens=output,
        wall_s=wall_s,
        tokens_per_s=output / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(records) / wall_s if wall_s > 0 else 0.0,
        ttft=dist_ms(r.ttft_s for r in streamed if r.ttft_s is not None),
        itl=dist_ms(gap for r in streamed for gap in r.itl_s),
        tpot=dist_ms(r.tpot_s for r in streamed if r.tpot_s is not None),
        e2e=dist_ms(r.e2e_s for r in streamed if r.e2e_s is not None),
        chunks_per_read=chunks / reads if reads else None,
        tokens_per_chunk=output / chunks if chunks else None,
        problems=problems[:5],
    )


def median_or_none(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_dist(dists: Sequence[Dist]) -> Dist:
    """Per statistic, the median over rounds; ``count`` is the total."""
    if not dists:
        return Dist.empty()
    return Dist(
        p50=median_or_none(d.p50 for d in dists),
        p90=median_or_none(d.p90 for d in dists),
        p99=median_or_none(d.p99 for d in dists),
        mean=median_or_none(d.mean for d in dists),
        count=sum(d.count for d in dists),
    )


def dist_difference(row: Dist, base: Dist) -> Dist:
    """``row - base`` per statistic (the gateway overhead when ``base`` is the direct row)."""

    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    return Dist(
        p50=minus(row.p50, base.p50),
        p90=minus(row.p90, base.p90),
        p99=minus(row.p99, base.p99),
        mean=minus(row.mean, base.mean),
        count=row.count,
    )


LATENCIES = ("ttft", "itl", "tpot", "e2e")


@dataclass(frozen=True, slots=True)
class Overhead:
    """A row against the direct row of the same round and concurrency."""

    tokens_per_s_ratio: float | None
    ttft: Dist
    itl: Dist
    tpot: Dist
    e2e: Dist


def overhead(row: RowMetrics, direct: RowMetrics) -> Overhead:
    """Overhead = row - direct, per percentile; throughput as the ratio row / direct."""
    ratio = row.tokens_per_s / direct.tokens_per_s if direct.tokens_per_s > 0 else None
    return Overhead(
        tokens_per_s_ratio=ratio,
        ttft=dist_difference(row.ttft, direct.ttft),
        itl=dist_difference(row.itl, direct.itl),
        tpot=dist_difference(row.tpot, direct.tpot),
        e2e=dist_difference(row.e2e, direct.e2e),
    )


def median_overhead(rounds: Sequence[Overhead]) -> Overhead | None:
    """The median over rounds of each overhead figure (None without rounds)."""
    if not rounds:
        return None
    return Overhead(
        tokens_per_s_ratio=median_or_none(o.tokens_per_s_ratio for o in rounds),
        ttft=median_dist([o.ttft for o in rounds]),
        itl=median_dist([o.itl for o in rounds]),
        tpot=median_dist([o.tpot for o in rounds]),
        e2e=median_dist([o.e2e for o in rounds]),
    )


def median_rows(rows: Sequence[RowMetrics]) -> RowMetrics:
    """Several rounds of one scenario x concurrency as one row.

    Counts (requests, completed, errors, wrong, output tokens) and wall time are totals; rates,
    distributions and ratios are medians over rounds (the machine is noisy: medians, not means).
    """
    if len(rows) == 1:
        return rows[0]

    def med(get: Callable[[RowMetrics], float | None]) -> float | None:
        return median_or_none(get(r) for r in rows)

    return RowMetrics(
        requests=sum(r.requests for r in rows),
        completed=sum(r.completed for r in rows),
        errors=sum(r.errors for r in rows),
        wrong=sum(r.wrong for r in rows),
        output_tokens=sum(r.output_tokens for r in rows),
        wall_s=sum(r.wall_s for r in rows),
        tokens_per_s=statistics.median(r.tokens_per_s for r in rows),
        requests_per_s=statistics.median(r.requests_per_s for r in rows),
        ttft=median_dist([r.ttft for r in rows]),
        itl=median_dist([r.itl for r in rows]),
        tpot=median_dist([r.tpot for r in rows]),
        e2e=median_dist([r.e2e for r in rows]),
        chunks_per_read=med(lambda r: r.chunks_per_read),
        tokens_per_chunk=med(lambda r: r.tokens_per_chunk),
        problems=sorted({p for r in rows for p in r.problems})[:5],
    )


def dist_dict(d: Dist) -> dict[str, float | int | None]:
    """A :class:`Dist` as a JSON object (``p50``, ``p90``, ``p99``, ``mean``, ``count``)."""
    return {f.name: getattr(d, f.name) for f in fields(d)}
