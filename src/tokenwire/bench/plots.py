"""PNG plots with matplotlib's Agg backend (no display needed), imported only when plotting.

- ``ttft_distribution.png``: TTFT CDF per scenario at the highest concurrency.
- ``throughput_vs_concurrency.png``: tokens/s and TTFT p99 against concurrency per scenario.
- ``cpu_per_1k_tokens.png``: server CPU seconds per 1,000 tokens per scenario and concurrency.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from tokenwire.bench.errors import MissingDependency
from tokenwire.bench.options import Scenario
from tokenwire.bench.results import ScenarioRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "plots need matplotlib: pip install 'tokenwire[bench]' (or run with --no-plots)"
COLORS = {
    Scenario.DIRECT: "#555555",
    Scenario.BARE: "#9467bd",
    Scenario.SSE: "#1f77b4",
    Scenario.SSE_NEW_CONN: "#17becf",
    Scenario.JSON: "#2ca02c",
    Scenario.WS: "#d62728",
    Scenario.WS_MUX: "#ff7f0e",
}


def require_matplotlib() -> None:
    """Fail early, with the install command, when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependency(INSTALL_HINT)


def _figure(width: float = 8.0, height: float = 5.0) -> Figure:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on an Agg canvas: no display, and none of pyplot's global state.
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _ran(records: list[ScenarioRecord]) -> list[ScenarioRecord]:
    return [r for r in records if r.metrics is not None]


def ttft_distribution(records: list[ScenarioRecord], path: Path) -> Path:
    """TTFT CDF per scenario at the highest concurrency that ran."""
    fig = _figure()
    ax = fig.add_subplot()
    ran = _ran(records)
    top = max((r.concurrency for r in ran), default=0)
    for r in ran:
        if r.concurrency != top:
            continue
        ttft = sorted(
            rec.ttft_s * 1000
            for row in r.rows
            for rec in row.records
            if rec.error is None and rec.ttft_s is not None
        )
        if not ttft:
            continue
        share = [(i + 1) / len(ttft) for i in range(len(ttft))]
        ax.step(ttft, share, where="post", label=r.scenario.value, color=COLORS[r.scenario])
    ax.set_xlabel("time to first token, ms")
    ax.set_ylabel("share of requests (CDF)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"TTFT distribution at {top} concurrent streams")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path)
    return path


def throughput_vs_concurrency(records: list[ScenarioRecord], path: Path) -> Path:
    """Two panels: tokens/s and TTFT p99 against concurrency, one line per scenario."""
    fig = _figure(11.0, 4.8)
    tput, ttft = fig.subplots(1, 2)
    ran = _ran(records)
    for scenario in Scenario:
        rows = sorted((r for r in ran if r.scenario is scenario), key=lambda r: r.concurrency)
        if not rows:
            continue
        xs = [r.concurrency for r in rows]
        style = {"marker": "o", "label": scenario.value, "color": COLORS[scenario]}
        tput.plot(xs, [r.metrics.tokens_per_s if r.metrics else 0.0 for r in rows], **style)
        p99 = [r.metrics.ttft.p99 if r.metrics else None for r in rows]
        ttft.plot(xs, [float("nan") if v is None else v for v in p99], **style)
    for ax, label in ((tput, "output tokens/s"), (ttft, "TTFT p99, ms")):
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        levels = sorted({r.concurrency for r in ran})
        if len(levels) > 1 and levels[-1] / levels[0] >= 10:
            ax.set_xscale("log")
        ax.set_xticks(levels, labels=[str(c) for c in levels])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    tput.set_title("throughput")
    ttft.set_title("time to first token, p99")
    fig.savefig(path)
    return path


def cpu_per_1k_tokens(records: list[ScenarioRecord], path: Path) -> Path:
    """Grouped bars: server CPU seconds per 1,000 tokens, per concurrency and scenario."""
    fig = _figure()
    ax = fig.add_subplot()
    ran = [r for r in _ran(records) if r.server_cpu_s_per_1k_tokens is not None]
    levels = sorted({r.concurrency for r in ran})
    scenarios = [s for s in Scenario if any(r.scenario is s for r in ran)]
    width = 0.8 / max(1, len(scenarios))
    for i, scenario in enumerate(scenarios):
        values = {
            r.concurrency: r.server_cpu_s_per_1k_tokens for r in ran if r.scenario is scenario
        }
        xs = [n + i * width for n in range(len(levels))]
        ax.bar(
            xs,
            [values.get(c) or 0.0 for c in levels],
            width=width,
            label=scenario.value + (" (sim-upstream)" if scenario is Scenario.DIRECT else ""),
            color=COLORS[scenario],
        )
    ax.set_xticks([n + width * (len(scenarios) - 1) / 2 for n in range(len(levels))])
    ax.set_xticklabels([str(c) for c in levels])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("server CPU seconds per 1,000 output tokens")
    ax.set_title("server CPU per 1,000 tokens (gateway; sim-upstream for direct)")
    ax.grid(alpha=0.3, axis="y")
    if not ran:
        ax.text(0.5, 0.5, "no server CPU figures (no --target-pid)", ha="center", va="center")
    else:
        ax.legend()
    fig.savefig(path)
    return path


def write_plots(records: list[ScenarioRecord], out_dir: Path) -> list[Path]:
    """Write the three PNGs into ``out_dir``; return their paths."""
    return [
        ttft_distribution(records, out_dir / "ttft_distribution.png"),
        throughput_vs_concurrency(records, out_dir / "throughput_vs_concurrency.png"),
        cpu_per_1k_tokens(records, out_dir / "cpu_per_1k_tokens.png"),
    ]
