"""Resource figures with psutil: CPU seconds and peak RSS of the processes a row involves.

CPU seconds are user + system time read before and after the load; RSS is sampled every
``interval_s`` (100 ms) while it runs and the peak kept. psutil's CPU times tick at 10 ms, so
the CPU figures of very short rows are coarse. A watched process can include its children
(granian runs the app in worker processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import psutil  # type: ignore[import-untyped, unused-ignore]

MIB = 1024 * 1024


class ProcessWatch:
    """One process (optionally with its children) to read CPU time and RSS from."""

    def __init__(self, pid: int, *, include_children: bool = False) -> None:
        self.pid = pid
        self.include_children = include_children
        self._process = psutil.Process(pid)

    def _tree(self) -> list[psutil.Process]:
        if not self.include_children:
            return [self._process]
        try:
            return [self._process, *self._process.children(recursive=True)]
        except psutil.Error:
            return [self._process]

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds so far (None if the process is gone)."""
        total = 0.0
        try:
            for process in self._tree():
                times = process.cpu_times()
                total += float(times.user + times.system)
        except psutil.Error:
            return None
        return total

    def rss_mib(self) -> float | None:
        """Resident memory in MiB (None if the process is gone)."""
        total = 0
        try:
            for process in self._tree():
                total += int(process.memory_info().rss)
        except psutil.Error:
            return None
        return total / MIB


@dataclass(slots=True)
class ResourceUsage:
    """Per watched process: CPU seconds used and peak RSS during one row; host CPU %."""

    cpu_s: dict[str, float | None] = field(default_factory=dict)
    peak_rss_mib: dict[str, float | None] = field(default_factory=dict)
    host_cpu_percent: float | None = None


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


@contextlib.asynccontextmanager
async def sample(
    watches: Mapping[str, ProcessWatch], interval_s: float = 0.1
) -> AsyncIterator[ResourceUsage]:
    """CPU seconds used and RSS peaks (sampled every ``interval_s``) while the block runs."""
    usage = ResourceUsage()
    before = {name: w.cpu_seconds() for name, w in watches.items()}
    usage.peak_rss_mib = {name: w.rss_mib() for name, w in watches.items()}
    psutil.cpu_percent(interval=None)

    def take() -> None:
        for name, w in watches.items():
            usage.peak_rss_mib[name] = _max(usage.peak_rss_mib[name], w.rss_mib())

    async def sampler() -> None:
        while True:
            await asyncio.sleep(interval_s)
            take()

    task = asyncio.get_running_loop().create_task(sampler())
    try:
        yield usage
    finally:
        task.cancel()
        take()
        usage.host_cpu_percent = float(psutil.cpu_percent(interval=None))
        for name, w in watches.items():
            start, end = before[name], w.cpu_seconds()
            usage.cpu_s[name] = None if start is None or end is None else end - start


def raise_nofile_limit(wanted: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (children inherit it).

    Returns the (soft, hard) limits in force afterwards; the soft limit never exceeds the hard
    one, which only root can raise.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def host_facts() -> dict[str, object]:
    """CPU count, memory and load average of the host (it is shared: the load matters)."""
    return {
        "cpu_count": psutil.cpu_count(),
        "memory_mib": round(psutil.virtual_memory().total / MIB),
        "loadavg": list(psutil.getloadavg()),
    }
