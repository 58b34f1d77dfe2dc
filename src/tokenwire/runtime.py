"""What a gateway process holds right now: the counts that must return to where they were.

Leaks show as a count that grows with traffic and never comes back: tasks, open files and
sockets, database connections checked out of the pool, stream slots, live generations,
settlements waiting to be written. :func:`snapshot` reads them all without touching the
database (so it answers during an outage); ``GET /v1/admin/runtime`` serves it, and
``tokenwire bench`` compares one taken before a run with one taken after it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from tokenwire.accounting.writer import LedgerWriter
from tokenwire.observability.metrics import RuntimeSample, Sampler
from tokenwire.providers.registry import ProviderRegistry
from tokenwire.state import AppState


def open_fds() -> int | None:
    """File descriptors this process has open (Linux ``/proc``; None elsewhere)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _checked_out(state: AppState) -> int | None:
    """Connections in use: the async engine's and those of the ledger's writing thread."""
    pool = state.engine.pool
    checkedout = getattr(pool, "checkedout", None)
    if not callable(checkedout):
        return None
    return int(checkedout()) + state.ledger.transactions.checked_out()


def _outbox_files(directory: Path) -> int:
    return len(list(directory.glob("ledger-*.jsonl"))) if directory.is_dir() else 0


def snapshot(state: AppState) -> dict[str, Any]:
    """The process's counts (see the module docstring); cheap enough to poll."""
    completions = state.completions
    writer = completions.writer
    return {
        "pid": os.getpid(),
        "tasks": len(asyncio.all_tasks()),
        "open_fds": open_fds(),
        "db_connections_checked_out": _checked_out(state),
        "live_generations": len(completions.live),
        "stream_slots_held": state.limiter.held_slots,
        "ledger_queued": writer.queued,
        "ledger_held_in_memory": writer.held,
        "ledger_outbox_files": _outbox_files(state.settings.data_dir / "ledger-outbox"),
        "ledger_write_failures": writer.write_failures,
    }


def metrics_sampler(writer: LedgerWriter, registry: ProviderRegistry, outbox_dir: Path) -> Sampler:
    """What ``/metrics`` samples when scraped: the ledger writer's counts, the circuits."""

    def sample() -> RuntimeSample:
        return RuntimeSample(
            ledger_queued=writer.queued,
            ledger_held=writer.held,
            ledger_outbox_files=_outbox_files(outbox_dir),
            ledger_write_failures=writer.write_failures,
            circuits=registry.circuits(),
        )

    return sample
