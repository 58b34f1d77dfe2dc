"""``tokenwire serve --workers N``: N gateway processes on one port, each with its own event loop.

The supervisor (the process ``serve`` started) never serves a request. It:

1. binds one listening socket per worker slot, all on the same address and port with
   ``SO_REUSEPORT``, so the kernel spreads new connections evenly over the workers; a slot's
   socket stays open in the supervisor while its worker restarts, so connections the kernel
   hashes to it wait in its queue instead of being refused (without ``SO_REUSEPORT`` every
   worker accepts from one shared socket);
2. starts one worker per slot: ``python -m tokenwire.workers``, a fresh interpreter in a
   process group of its own (a terminal's Ctrl-C reaches the supervisor only, which forwards
   it once), told its settings and socket through its standard input; on Linux a worker also
   dies with its supervisor (``PR_SET_PDEATHSIG``), so a supervisor killed with SIGKILL leaves
   no orphans;
3. watches them. SIGTERM or SIGINT is forwarded as SIGTERM to every worker, each drains
   (``tokenwire.server.DrainingServer``) and exits, then the supervisor exits 0; a second
   signal reaches them as SIGINT, which ends what is left of their drains. SIGHUP to the
   supervisor is a rolling restart: one worker at a time gets SIGHUP (it drains, its
   WebSockets close with 1012, it exits 0) and the next only once its replacement is ready,
   so the port always has a worker. (SIGHUP, or SIGTERM, to one worker restarts that worker:
   a worker exiting 0 is started again at once, which is not counted as a crash.) A worker that
   fails before it is ready (bad settings, a database it cannot reach at start) stops
   everything, exit 1. A worker that dies after
   being ready is restarted after a backoff (1 s, doubling to 30 s; reset once a worker has
   served 60 s); after ``MAX_CRASHES`` deaths in a row without such a stable minute the
   supervisor gives up: it stops the others and exits 1.

Prometheus: before starting the workers the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a
fresh empty directory (removed at exit), so the workers' metrics add up on any of them, and
calls ``prometheus_client.multiprocess.mark_process_dead`` for every worker that exits.

State the workers must share lives in Redis and the database: :func:`shared_state_problems`
names the in-process settings that forbid more than one worker. SQLite is allowed: several
processes on one host may write one SQLite file (WAL journal, 30 s busy timeout; every write
is a short transaction, and the ledger writer batches), see ``docs/deployment.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Literal

from tokenwire.config import ConfigError, Settings

log = logging.getLogger("tokenwire.workers")

MAX_CRASHES = 5
"""Worker deaths in a row (none separated by ``STABLE_S`` of service) before giving up."""
STABLE_S = 60.0
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
POLL_S = 0.1
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def resolve_workers(value: int | Literal["auto"]) -> int:
    """The number of worker processes: ``value``, or the CPUs this process may run on."""
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    if value < 1:
        raise ConfigError(f"server.workers must be >= 1 or 'auto', got {value}")
    return value


def shared_state_problems(settings: Settings) -> list[str]:
    """What keeps ``settings`` from running in several processes (empty: nothing).

    Rate limits (and the failed-authentication throttle), resumable streams and WebSocket
    tickets must be seen by every worker, so they must live in Redis; the database is shared
    already (SQLite on one host, PostgreSQL anywhere).
    """
    problems: list[str] = []
    if settings.limits.backend != "redis":
        problems.append(
            'limits.backend = "memory": each worker would count rate limits and stream slots '
            'on its own; set [limits] backend = "redis"'
        )
    if settings.server.stream_backend != "redis":
        problems.append(
            'server.stream_backend = "memory": a stream could be resumed only on the worker '
            "that runs it, and WebSocket tickets redeemed only where they were made; set "
            '[server] stream_backend = "redis"'
        )
    return problems


def check_shared_state(settings: Settings, workers: int) -> None:
    """Raise ``ConfigError`` naming what to change when ``workers`` > 1 cannot share state."""
    problems = shared_state_problems(settings) if workers > 1 else []
    if problems:
        raise ConfigError(
            f"--workers {workers} needs state shared between processes: "
            + "; ".join(problems)
            + " (or set TOKENWIRE_REDIS_URL, which selects Redis for both), or run one worker."
        )


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process is told on its standard input."""

    settings: Settings
    fd: int  # the API's listening socket (the worker's own, with SO_REUSEPORT)
    metrics_fd: int | None  # the metrics listener's socket, shared by every worker
    ready_fd: int  # write one byte here once serving
    access_log: bool
    index: int
    supervisor_pid: int


def bind_sockets(host: str, port: int, count: int, backlog: int = 4096) -> list[socket.socket]:
    """``count`` listening sockets on one address and port (``SO_REUSEPORT``), or one shared.

    Port 0 picks a free port for the first socket; the others join it.
    """
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    sockets: list[socket.socket] = []
    try:
        for _ in range(count if reuse_port else 1):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.set_inheritable(True)
            address = sock.getsockname()  # port 0: the others bind the port the first got
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets if reuse_port else sockets * count


@dataclass(slots=True)
class _Slot:
    """One worker position: its socket, and the process currently filling it."""

    index: int
    sock: socket.socket
    process: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None  # read end of the readiness pipe, until it speaks
    ready: bool = False
    ready_at: float = 0.0
    restart_at: float | None = None
    replacing: bool = False  # SIGHUP sent by a rolling restart: ready again, the next one goes


@dataclass
class Supervisor:
    """Starts, watches and stops the worker processes (see the module docstring).

    ``sockets`` are the API's listening sockets, one per worker (:func:`bind_sockets`);
    ``metrics`` the metrics listener's, which every worker serves; ``on_ready`` runs once,
    when every worker first answers.
    """

    settings: Settings
    sockets: list[socket.socket]
    metrics: socket.socket | None = None
    access_log: bool = True
    on_ready: Callable[[], None] | None = None
    slots: list[_Slot] = field(default_factory=list)
    crashes: int = 0  # deaths in a row without a stable minute between them
    stopping: int = 0  # signals received
    metrics_dir: str | None = None
    to_restart: list[_Slot] = field(default_factory=list)  # a rolling restart's next workers

    def run(self) -> int:
        """Serve until a signal (0) or a failure the supervisor cannot mend (1)."""
        self.slots = [_Slot(i, sock) for i, sock in enumerate(self.sockets)]
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        self.metrics_dir = tempfile.mkdtemp(prefix="tokenwire-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        try:
            for slot in self.slots:
                self._start(slot)
            return self._watch()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for sock in {id(s): s for s in [*self.sockets, self.metrics] if s}.values():
                sock.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # The first signal drains every worker (SIGTERM); a second ends what is left of the
        # drains (SIGINT after SIGTERM, as a second Ctrl-C does on one process).
        self.stopping += 1
        forwarded = signal.SIGTERM if self.stopping == 1 else signal.SIGINT
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(forwarded)
        for sock in self.sockets:  # with the workers' copies, the port closes: new connections
            sock.close()  # are refused (a load balancer tries another instance) while they drain

    def _on_hangup(self, _signum: int, _frame: FrameType | None) -> None:
        if self.stopping or self.to_restart or any(s.replacing for s in self.slots):
            return  # stopping, or a rolling restart is already under way
        self.to_restart = list(self.slots)
        self._restart_next()

    def _restart_next(self) -> None:
        """SIGHUP the next worker of a rolling restart (it drains and exits 0, then is
        started again; :meth:`_heard_from` calls this again once the new one is ready)."""
        while self.to_restart:
            slot = self.to_restart.pop(0)
            if slot.process is not None and slot.process.poll() is None:
                log.info("rolling restart: worker %d (pid %d)", slot.index, slot.process.pid)
                slot.replacing = True
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signal.SIGHUP)
                return

    def _start(self, slot: _Slot) -> None:
        read_fd, write_fd = os.pipe()
        metrics_fd = None if self.metrics is None else self.metrics.fileno()
        spec = WorkerSpec(
            settings=self.settings,
            fd=slot.sock.fileno(),
            metrics_fd=metrics_fd,
            ready_fd=write_fd,
            access_log=self.access_log,
            index=slot.index,
            supervisor_pid=os.getpid(),
        )
        passed = (slot.sock.fileno(), write_fd, *(() if metrics_fd is None else (metrics_fd,)))
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "tokenwire.workers"],
                stdin=subprocess.PIPE,
                pass_fds=passed,
                process_group=0,
            )
        finally:
            os.close(write_fd)
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it died at once: seen by the watch
            process.stdin.write(pickle.dumps(spec))
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        slot.process, slot.ready_fd, slot.ready, slot.restart_at = process, read_fd, False, None

    def _watch(self) -> int:
        while True:
            if self.stopping:
                return 0
            waiting = [s.ready_fd for s in self.slots if s.ready_fd is not None]
            readable: list[int] = []
            if waiting:
                readable, _, _ = select.select(waiting, [], [], POLL_S)
            else:
                time.sleep(POLL_S)
            now = time.monotonic()
            for slot in self.slots:
                if slot.ready_fd is not None and slot.ready_fd in readable:
                    self._heard_from(slot, now)
                if slot.ready and now - slot.ready_at >= STABLE_S:
                    self.crashes = 0
                if slot.process is not None and slot.process.poll() is not None:
                    if self.stopping:
                        return 0
                    failed = self._ended(slot, now)
                    if failed is not None:
                        log.error("%s; stopping the other workers", failed)
                        return 1
                if slot.restart_at is not None and now >= slot.restart_at:
                    self._start(slot)

    def _heard_from(self, slot: _Slot, now: float) -> None:
        assert slot.ready_fd is not None
        said = os.read(slot.ready_fd, 1)
        os.close(slot.ready_fd)
        slot.ready_fd = None
        if said:  # an empty read: it closed the pipe without saying (it is dying)
            slot.ready, slot.ready_at = True, now
            if slot.replacing:  # a rolling restart's new worker: on to the next
                slot.replacing = False
                self._restart_next()
        if self.on_ready is not None and all(s.ready for s in self.slots):
            pids = " ".join(str(s.process.pid) for s in self.slots if s.process is not None)
            log.info("supervisor %d: workers %s ready", os.getpid(), pids)
            self.on_ready()
            self.on_ready = None

    def _ended(self, slot: _Slot, now: float) -> str | None:
        """Handle a worker that exited on its own; a reason to give up, or None (restarting)."""
        process = slot.process
        assert process is not None
        if slot.ready_fd is not None:
            os.close(slot.ready_fd)
            slot.ready_fd = None
        _mark_dead(process.pid)
        slot.process = None
        code = process.returncode
        if not slot.ready:
            return f"worker {slot.index} (pid {process.pid}) exited with {code} before it was ready"
        slot.ready = False
        if code == 0:  # it drained on request (SIGHUP or SIGTERM to it): a restart, not a crash
            log.info(
                "worker %d (pid %d) drained and exited; starting it again", slot.index, process.pid
            )
            slot.restart_at = now
            return None
        self.crashes += 1
        if self.crashes > MAX_CRASHES:
            return (
                f"{self.crashes} worker deaths in a row; the last, worker {slot.index}, "
                f"exited with {code}"
            )
        delay = BACKOFF_S[min(self.crashes, len(BACKOFF_S)) - 1]
        log.error(
            "worker %d (pid %d) exited with %s; restarting it in %g s",
            slot.index,
            process.pid,
            code,
            delay,
        )
        slot.restart_at = now + delay
        return None

    def _stop_all(self) -> None:
        """SIGTERM every worker still running (unless a signal already did) and wait for it."""
        running = [
            s.process for s in self.slots if s.process is not None and s.process.poll() is None
        ]
        if not self.stopping:
            for process in running:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        for process in running:
            while True:
                try:
                    process.wait()
                    break
                except KeyboardInterrupt:  # pragma: no cover - a signal arriving mid-wait
                    continue
            _mark_dead(process.pid)
        for slot in self.slots:
            if slot.ready_fd is not None:
                os.close(slot.ready_fd)
                slot.ready_fd = None


def _mark_dead(pid: int) -> None:
    """Let prometheus_client drop a dead worker's live gauges (when it is installed)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call, unused-ignore]


def _die_with_supervisor(supervisor_pid: int) -> None:
    """Linux: SIGTERM this process when its supervisor dies (and exit if it already has)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor_pid:
        raise SystemExit(0)  # it died before the line above took effect


def worker_main() -> None:
    """One worker: read the spec from stdin, serve on the inherited sockets until told to stop."""
    spec: WorkerSpec = pickle.loads(sys.stdin.buffer.read())
    _die_with_supervisor(spec.supervisor_pid)
    from tokenwire.observability.logs import configure_logging, resolve_format
    from tokenwire.serving import run_server

    configure_logging(resolve_format(spec.settings.server.log_format, sys.stderr))
    sockets = [socket.socket(fileno=spec.fd)]
    if spec.metrics_fd is not None:
        sockets.append(socket.socket(fileno=spec.metrics_fd))

    def ready() -> None:
        with contextlib.suppress(OSError):
            os.write(spec.ready_fd, b"1")
            os.close(spec.ready_fd)

    if not run_server(spec.settings, sockets, access_log=spec.access_log, on_started=ready):
        raise SystemExit(3)  # uvicorn's start-up failure code; it logged why


if __name__ == "__main__":
    worker_main()
