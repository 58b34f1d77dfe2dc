"""The leak accounting behind ``tokenwire bench --check``, without a gateway: what fails the
check (a count growing past its tolerance, RSS growth over the limit, another gateway process, a
gateway that never got quiet, nothing to judge), the RSS trend as the slope over the second half
of the polls, and ``settle`` waiting for quiet and ignoring a task that passes by.
"""

from __future__ import annotations

from typing import Any

import pytest

from tokenwire.bench.leaks import COUNTS, LeakAccount, ProbeError, Snapshot, settle
from tokenwire.bench.options import BenchOptions, Scenario
from tokenwire.bench.results import check


def snapshot_of(pid: int = 7, **counts: int) -> Snapshot:
    """A quiet snapshot: every count 0 unless given."""
    return Snapshot(pid, {name: counts.get(name, 0) for name in COUNTS}, True, 1.0, 5)


def test_check_fails_on_a_leak_or_rss_growth_and_passes_without() -> None:
    """--check fails when a count grows past its tolerance or RSS grows over the limit."""
    opts = BenchOptions(scenarios=(Scenario.SSE,), check=True)
    clean = LeakAccount(1000, snapshot_of(tasks=5, open_fds=40), snapshot_of(tasks=5, open_fds=52))
    clean.rss_after_warmup_mib, clean.rss_peak_mib = 180.0, 197.0  # +9.4 %, fds +12 <= 18
    assert check([], opts, [clean]).passed, check([], opts, [clean]).reasons

    leaky = LeakAccount(1000, snapshot_of(tasks=5), snapshot_of(tasks=6, stream_slots_held=3))
    result = check([], opts, [leaky])
    assert not result.passed
    assert any("tasks 5 → 6 (+1, allowed +0)" in r for r in result.reasons), result.reasons
    assert any("stream_slots_held 0 → 3" in r for r in result.reasons), result.reasons

    fds = LeakAccount(1000, snapshot_of(open_fds=40), snapshot_of(open_fds=59))
    assert not check([], opts, [fds]).passed  # +19 > 18

    grown = LeakAccount(1000, snapshot_of(), snapshot_of())
    grown.rss_after_warmup_mib, grown.rss_peak_mib = 180.0, 200.0  # +11.1 %
    (reason,) = check([], opts, [grown]).reasons
    assert "RSS grew 11.1 %" in reason

    restarted = LeakAccount(1000, snapshot_of(pid=7), snapshot_of(pid=8))
    assert "different gateway process" in check([], opts, [restarted]).reasons[0]
    stuck = LeakAccount(1000, snapshot_of(), Snapshot(7, {n: 0 for n in COUNTS}, False, 120, 9))
    assert "not quiet" in check([], opts, [stuck]).reasons[0]
    assert not check([], opts, []).passed  # sse alone and no leak figures: nothing judged


def test_rss_trend_is_the_slope_over_the_second_half_of_the_polls() -> None:
    """A step at the start does not count in the trend; a steady climb does, in MiB per minute."""
    step = LeakAccount(1000)
    for second in range(600):
        step.note_peaks({}, float(second), 165.0 if second < 11 else 177.0)
    assert step.rss_trend_mib_per_min == pytest.approx(0.0)
    climb = LeakAccount(1000)
    for second in range(600):
        climb.note_peaks({}, float(second), 170.0 + second / 60)  # +1 MiB a minute
    assert climb.rss_trend_mib_per_min == pytest.approx(1.0)
    assert LeakAccount(1000).rss_trend_mib_per_min is None


def test_settle_waits_for_quiet_and_ignores_a_passing_task() -> None:
    """The snapshot waits until nothing is live, then keeps each count's minimum of the last second."""
    now = [0.0]
    answers = iter(
        [{"live_generations": 3, "ledger_queued": 1, "tasks": 40}] * 5  # still finishing
        + [{"live_generations": 0, "ledger_queued": 0, "tasks": 6}]  # a periodic task runs
        + [{"live_generations": 0, "ledger_queued": 0, "tasks": 5}] * 200
    )

    async def read() -> dict[str, Any]:
        answer = next(answers)
        return {"pid": 7, **dict.fromkeys(COUNTS, 0), **answer}

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    def clock() -> float:
        return now[0]

    import asyncio

    before = asyncio.run(settle(read, 2.0, clock=clock, sleep=sleep))
    assert before.quiet and before.pid == 7
    assert before.counts["tasks"] == 5 and before.counts["live_generations"] == 0
    assert 3.0 <= before.waited_s <= 3.5  # 1 s until quiet, then 2 s
    start = now[0]
    after = asyncio.run(settle(read, 30.0, baseline=before, clock=clock, sleep=sleep))
    assert after.counts == before.counts
    assert now[0] - start <= 1.5  # back to the baseline: no need to wait 30 s

    async def refuse() -> dict[str, Any]:
        raise ProbeError("GET /v1/admin/runtime: HTTP 403")

    now[0] = 0.0
    with pytest.raises(ProbeError, match="403"):
        asyncio.run(settle(refuse, 0.0, quiet_limit_s=2.0, clock=clock, sleep=sleep))
