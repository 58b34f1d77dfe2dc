"""Leak accounting: what the gateway holds before and after the load, and how its RSS grew.

Per concurrency, the runner takes two snapshots of ``GET /v1/admin/runtime`` (admin key): one
after the warm-up, one after the last measured row. Before each, the load generators close
every connection they hold, and :func:`settle` polls until the gateway is *quiet* (no live
generation, no ledger row queued), then for ``--settle-s`` more seconds (pooled upstream
connections idle for the gateway's 4 s keep-alive are closed by then), and keeps, per count,
the smallest value seen in the last second (a periodic background task that happens to run
during one poll is not a leak; a leak never goes away). The after snapshot stops earlier if
no count is above its before value.

A count that is higher after than before by more than its tolerance (:data:`TOLERANCE`) is a
leak. Only ``open_fds`` has one, 18: the descriptors a quiet gateway keeps open by design for
its database pool, which grows to the highest concurrent use and stays there. With SQLite (5
pooled connections, 10 more in overflow) that is up to 4 more pooled connections than the 1 a
fresh gateway has, 2 descriptors each (the database and its ``-wal``; ``-shm`` is shared):
+8; and SQLite keeps the database descriptor of a connection closed while another holds a
lock, to reuse for the next one it opens: up to +10 from the overflow. +18 is what the warm-up
of 1,000 WebSockets grew a fresh gateway by. PostgreSQL keeps up to 9 more sockets.

RSS growth compares the gateway's RSS at the end of the warm-up (just before the first
measured row, connections open and pools warm) with its peak during the measured rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tokenwire.bench.servers import http_get

RUNTIME_PATH = "/v1/admin/runtime"
COUNTS: tuple[str, ...] = (
    "tasks",
    "open_fds",
    "db_connections_checked_out",
    "live_generations",
    "stream_slots_held",
    "ledger_queued",
    "ledger_held_in_memory",
    "ledger_outbox_files",
    "ledger_write_failures",
)
"""The counts of ``GET /v1/admin/runtime`` that must not grow (``pid`` identifies the process)."""
TOLERANCE: dict[str, int] = {"open_fds": 18}
"""Growth allowed per count (0 when absent); see the module docstring."""
POLL_S = 0.2
WINDOW_S = 1.0
QUIET_LIMIT_S = 120.0
PEAK_INTERVAL_S = 1.0


class ProbeError(Exception):
    """``GET /v1/admin/runtime`` did not answer with the counts."""


class RuntimeProbe:
    """Reads ``GET /v1/admin/runtime`` with an admin key (in a thread: urllib blocks)."""

    def __init__(self, base_url: str, admin_key: str, timeout_s: float = 5.0) -> None:
        self.url = base_url + RUNTIME_PATH
        self._headers = {"Authorization": f"Bearer {admin_key}"}
        self._timeout_s = timeout_s

    def read_sync(self) -> dict[str, Any]:
        """The counts, or :class:`ProbeError` saying why not."""
        status, body = http_get(self.url, self._headers, timeout_s=self._timeout_s)
        if status != 200:
            what = "no answer" if status == 0 else f"HTTP {status}"
            raise ProbeError(f"GET {RUNTIME_PATH}: {what}")
        try:
            decoded = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise ProbeError(f"GET {RUNTIME_PATH}: not JSON ({exc})") from None
        if not isinstance(decoded, dict) or not all(name in decoded for name in COUNTS):
            raise ProbeError(f"GET {RUNTIME_PATH}: not the runtime counts")
        return decoded

    async def read(self) -> dict[str, Any]:
        """:meth:`read_sync` off the event loop."""
        return await asyncio.to_thread(self.read_sync)


Reader = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(slots=True)
class Snapshot:
    """The gateway's counts once quiet: each the smallest of the last second's polls."""

    pid: int | None
    counts: dict[str, int | None]
    quiet: bool  # live generations and the ledger queue reached 0 within QUIET_LIMIT_S
    waited_s: float
    polls: int
    rss_mib: float | None = None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def window_min(samples: list[dict[str, Any]]) -> dict[str, int | None]:
    """Per count, the smallest value in ``samples`` (None when no sample has it)."""
    result: dict[str, int | None] = {}
    for name in COUNTS:
        values = [v for s in samples if (v := _count(s.get(name))) is not None]
        result[name] = min(values) if values else None
    return result


def is_quiet(sample: dict[str, Any]) -> bool:
    """No generation alive and no ledger row waiting to be written."""
    return sample.get("live_generations") == 0 and sample.get("ledger_queued") == 0


def back_to(counts: dict[str, int | None], baseline: dict[str, int | None]) -> bool:
    """No count is above its baseline."""
    for name in COUNTS:
        now, before = counts.get(name), baseline.get(name)
        if now is not None and before is not None and now > before:
            return False
    return True


async def settle(
    read: Reader,
    settle_s: float,
    *,
    baseline: Snapshot | None = None,
    quiet_limit_s: float = QUIET_LIMIT_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Snapshot:
    """Poll until quiet, then ``settle_s`` more (see the module docstring).

    With ``baseline`` (the after snapshot) it returns as soon as no count of the last second
    is above it. Raises :class:`ProbeError` if no poll ever answered.
    """
    start = clock()
    samples: list[tuple[float, dict[str, Any]]] = []
    quiet_at: float | None = None
    last_error: ProbeError | None = None
    polls = 0
    while True:
        now = clock()
        try:
            sample = await read()
        except ProbeError as exc:
            last_error = exc
        else:
            polls += 1
            samples.append((now, sample))
            if quiet_at is None and is_quiet(sample):
                quiet_at = now
        if quiet_at is not None:
            recent = [s for t, s in samples if t >= max(quiet_at, now - WINDOW_S)]
            full_window = now - quiet_at >= WINDOW_S
            counts = window_min(recent)
            early = baseline is not None and full_window and back_to(counts, baseline.counts)
            if early or (full_window and now - quiet_at >= settle_s):
                return Snapshot(_pid(recent), counts, True, now - start, polls)
        elif now - start >= quiet_limit_s:
            if not samples:
                raise last_error or ProbeError(f"GET {RUNTIME_PATH}: no answer")
            recent = [s for t, s in samples if t >= now - WINDOW_S] or [samples[-1][1]]
            return Snapshot(_pid(recent), window_min(recent), False, now - start, polls)
        await sleep(POLL_S)


def _pid(samples: list[dict[str, Any]]) -> int | None:
    pids = {_count(s.get("pid")) for s in samples}
    return pids.pop() if len(pids) == 1 else None


@dataclass(frozen=True, slots=True)
class CountDelta:
    """One count before and after the load, its peak during it, and the growth allowed."""

    name: str
    before: int | None
    after: int | None
    peak: int | None
    tolerance: int

    @property
    def delta(self) -> int | None:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before

    @property
    def leaked(self) -> bool:
        """Higher after than before by more than the tolerance."""
        return self.delta is not None and self.delta > self.tolerance


@dataclass(slots=True)
class LeakAccount:
    """Leak accounting and RSS growth of the gateway at one concurrency."""

    concurrency: int
    before: Snapshot | None = None
    after: Snapshot | None = None
    peaks: dict[str, int] = field(default_factory=dict)  # polled during the measured rows
    peak_polls: int = 0
    timeline: dict[str, list[float | int | None]] = field(default_factory=dict)  # the polls
    rss_after_warmup_mib: float | None = None
    rss_peak_mib: float | None = None
    problems: list[str] = field(default_factory=list)

    def counts(self) -> list[CountDelta]:
        """Every count (empty when no snapshot was taken)."""
        if self.before is None and self.after is None:
            return []
        before = {} if self.before is None else self.before.counts
        after = {} if self.after is None else self.after.counts
        return [
            CountDelta(
                name,
                before.get(name),
                after.get(name),
                self.peaks.get(name),
                TOLERANCE.get(name, 0),
            )
            for name in COUNTS
        ]

    @property
    def rss_growth_pct(self) -> float | None:
        """(Peak RSS in the measured rows - RSS at the end of the warm-up) / the latter, in %."""
        warm, peak = self.rss_after_warmup_mib, self.rss_peak_mib
        if warm is None or peak is None or warm <= 0:
            return None
        return (peak - warm) / warm * 100

    @property
    def rss_trend_mib_per_min(self) -> float | None:
        """The slope of the gateway's RSS over the second half of the measured rows, MiB/min.

        Context for the growth figure: a leak keeps climbing to the end, while a working set
        that grew once (the first time the load took its steady shape) stays flat.
        """
        points = [
            (t, r)
            for t, r in zip(
                self.timeline.get("t_s", []), self.timeline.get("rss_mib", []), strict=True
            )
            if t is not None and r is not None
        ]
        if len(points) < 3:
            return None
        half = points[-1][0] / 2
        late = [(t, r) for t, r in points if t >= half]
        if len(late) < 3:
            return None
        mean_t = sum(t for t, _ in late) / len(late)
        mean_r = sum(r for _, r in late) / len(late)
        spread = sum((t - mean_t) ** 2 for t, _ in late)
        if spread <= 0:
            return None
        slope = sum((t - mean_t) * (r - mean_r) for t, r in late) / spread
        return slope * 60

    def note_peaks(
        self, sample: dict[str, Any], t_s: float | None = None, rss_mib: float | None = None
    ) -> None:
        """Keep each count's highest value seen while the rows ran, and the poll itself."""
        self.peak_polls += 1
        row: dict[str, float | int | None] = {"t_s": t_s, "rss_mib": rss_mib}
        for name in COUNTS:
            value = _count(sample.get(name))
            row[name] = value
            if value is not None:
                self.peaks[name] = max(self.peaks.get(name, value), value)
        for column, cell in row.items():
            self.timeline.setdefault(column, []).append(cell)

    def reasons(self, max_rss_growth_pct: float) -> list[str]:
        """Why ``--check`` fails at this concurrency (empty: it passes)."""
        c = f"c={self.concurrency}"
        reasons = [f"{c}: {problem}" for problem in self.problems]
        before, after = self.before, self.after
        if before is not None and after is not None:
            if before.pid != after.pid:
                reasons.append(
                    f"{c}: a different gateway process answered (pid {before.pid} before, "
                    f"{after.pid} after): the counts do not compare"
                )
            for snapshot, when in ((before, "after the warm-up"), (after, "after the rows")):
                if not snapshot.quiet:
                    reasons.append(
                        f"{c}: the gateway was not quiet {when} within {QUIET_LIMIT_S:g} s "
                        f"(live_generations {snapshot.counts.get('live_generations')}, "
                        f"ledger_queued {snapshot.counts.get('ledger_queued')})"
                    )
        for count in self.counts():
            if count.leaked:
                reasons.append(
                    f"{c}: {count.name} {count.before} → {count.after} (+{count.delta}, "
                    f"allowed +{count.tolerance})"
                )
        growth = self.rss_growth_pct
        if growth is not None and growth > max_rss_growth_pct:
            reasons.append(
                f"{c}: gateway RSS grew {growth:.1f} % ({self.rss_after_warmup_mib:.1f} MiB "
                f"after the warm-up, peak {self.rss_peak_mib:.1f} MiB) > {max_rss_growth_pct:g} %"
            )
        return reasons


async def poll_peaks(
    read: Reader,
    account: LeakAccount,
    rss_mib: Callable[[], float | None] = lambda: None,
    interval_s: float = PEAK_INTERVAL_S,
) -> None:
    """Until cancelled: poll the counts (and the RSS) every ``interval_s``; keep the peaks.

    The polls form ``account.timeline`` (is a count or the RSS still climbing at the end of a
    soak?). A busy gateway may miss a poll: the peaks are context (were slots really held?),
    not part of the verdict.
    """
    start = time.monotonic()
    while True:
        with contextlib.suppress(ProbeError):
            sample = await read()
            account.note_peaks(sample, round(time.monotonic() - start, 2), rss_mib())
        await asyncio.sleep(interval_s)
