"""Leak accounting and RSS growth rendered three ways: JSON, Markdown and rich tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from tokenwire.bench.leaks import RUNTIME_PATH, LeakAccount, Snapshot
from tokenwire.bench.results import RunOutcome


def rounded(value: float | None, digits: int = 3) -> float | None:
    """``value`` rounded for a JSON document (None stays None)."""
    return None if value is None else round(value, digits)


def cell(value: float | None, spec: str = ".1f") -> str:
    """``value`` for a table cell ("-" when unknown)."""
    return "-" if value is None else format(value, spec)


def _snapshot_json(snapshot: Snapshot | None) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    return {
        "pid": snapshot.pid,
        "quiet": snapshot.quiet,
        "waited_s": rounded(snapshot.waited_s, 2),
        "polls": snapshot.polls,
        "rss_mib": rounded(snapshot.rss_mib, 1),
        "counts": snapshot.counts,
    }


def leak_json(account: LeakAccount, max_rss_growth_pct: float) -> dict[str, Any]:
    """One concurrency's leak accounting and RSS growth as a JSON object."""
    reasons = account.reasons(max_rss_growth_pct)
    return {
        "concurrency": account.concurrency,
        "passed": not reasons,
        "reasons": reasons,
        "before": _snapshot_json(account.before),
        "after": _snapshot_json(account.after),
        "counts": [
            {
                "name": c.name,
                "before": c.before,
                "after": c.after,
                "delta": c.delta,
                "peak": c.peak,
                "tolerance": c.tolerance,
                "leaked": c.leaked,
            }
            for c in account.counts()
        ],
        "peak_polls": account.peak_polls,
        "timeline": {
            name: [rounded(v, 1) if isinstance(v, float) else v for v in values]
            for name, values in account.timeline.items()
        },
        "rss_after_warmup_mib": rounded(account.rss_after_warmup_mib, 1),
        "rss_peak_mib": rounded(account.rss_peak_mib, 1),
        "rss_growth_pct": rounded(account.rss_growth_pct, 2),
        "rss_trend_mib_per_min": rounded(account.rss_trend_mib_per_min, 3),
        "problems": account.problems,
    }


def _int_cell(value: int | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+d}" if signed else str(value)


def rss_line(account: LeakAccount, max_growth_pct: float) -> str:
    """The gateway's RSS after the warm-up, its peak in the measured rows, the growth."""
    growth, trend = account.rss_growth_pct, account.rss_trend_mib_per_min
    return (
        f"gateway RSS {cell(account.rss_after_warmup_mib)} MiB at the end of the warm-up, peak "
        f"{cell(account.rss_peak_mib)} MiB in the measured rows: "
        f"{'-' if growth is None else f'{growth:+.1f}'} % (limit {max_growth_pct:g} %)"
        + ("" if trend is None else f"; {trend:+.2f} MiB/min over the second half of the rows")
    )


def leak_markdown(outcome: RunOutcome) -> list[str]:
    """Per concurrency: the runtime counts before, after, Δ, and the RSS growth."""
    opts = outcome.opts
    lines: list[str] = []
    for account in outcome.leaks:
        lines += ["", f"## Leak accounting, {account.concurrency} streams", ""]
        counts = account.counts()
        if counts:
            before, after = account.before, account.after
            lines += [
                f"Gateway counts (`GET {RUNTIME_PATH}`) after the warm-up and after the last "
                f"row, every client connection closed, the gateway quiet and then settled "
                f"{opts.settle_s:g} s (pid {before.pid if before else '-'} → "
                f"{after.pid if after else '-'}); peak = highest count polled during the "
                f"measured rows (polled {account.peak_polls} times).",
                "",
                "| count | before | after | Δ | peak | allowed Δ |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {c.name} | {_int_cell(c.before)} | {_int_cell(c.after)} | "
                f"{_int_cell(c.delta, signed=True)}{' **leak**' if c.leaked else ''} | "
                f"{_int_cell(c.peak)} | {c.tolerance} |"
                for c in counts
            ]
            lines.append("")
        lines.append(rss_line(account, opts.max_rss_growth_pct) + ".")
        reasons = account.reasons(opts.max_rss_growth_pct)
        lines += ["", "Result: " + ("no growth" if not reasons else "; ".join(reasons)) + "."]
    return lines


def print_leaks(outcome: RunOutcome, console: Console) -> None:
    """One table per concurrency with runtime counts; the RSS growth line."""
    for account in outcome.leaks:
        counts = account.counts()
        if counts:
            table = Table(title=f"Gateway runtime counts, c={account.concurrency}")
            for col in ("count", "before", "after", "Δ", "peak", "allowed Δ"):
                table.add_column(col, justify="right")
            for c in counts:
                delta = _int_cell(c.delta, signed=True)
                table.add_row(
                    c.name,
                    _int_cell(c.before),
                    _int_cell(c.after),
                    f"[bold red]{delta}[/bold red]" if c.leaked else delta,
                    _int_cell(c.peak),
                    str(c.tolerance),
                )
            console.print(table)
        console.print(
            f"c={account.concurrency}: {rss_line(account, outcome.opts.max_rss_growth_pct)}",
            highlight=False,
        )
        for problem in account.problems:
            console.print(f"c={account.concurrency}: {problem}", highlight=False)
