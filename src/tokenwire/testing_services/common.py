"""What the private servers share: their error, ports, ending a process, the base class."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from tokenwire.testing_cluster import free_port

T = TypeVar("T")

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.02


class ServiceError(RuntimeError):
    """A private server would not start, stop or answer in time (its log is in the message)."""


def service_port() -> int:
    """A TCP port free on 127.0.0.1, below the ephemeral range when there is room for one.

    Unlike :func:`tokenwire.testing_cluster.free_port`, the port cannot be handed to an
    outgoing connection by the kernel while its server is down, so a restarted server can
    bind it again.
    """
    low = _ephemeral_low()
    lower = max(10_000, low - 12_000)
    if low - lower < 1_000:
        return free_port()
    for _ in range(200):
        port = lower + secrets.randbelow(low - lower)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def end_process(
    process: subprocess.Popen[bytes],
    sig: signal.Signals,
    timeout_s: float,
    *,
    then: signal.Signals = signal.SIGKILL,
) -> int | None:
    """Send ``sig`` and wait up to ``timeout_s``; if still alive send ``then`` and wait 10 s,
    and SIGKILL last of all. The exit code, or None if the process could not be reaped."""
    steps = [(sig, timeout_s), (then, 10.0), (signal.SIGKILL, 10.0)]
    for step, wait_s in steps:
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(step)
            if step != signal.SIGKILL:
                process.send_signal(signal.SIGCONT)  # a paused process handles nothing else
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait_s)
    return process.returncode


def blocking(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a fresh event loop in a worker thread and return its result.

    Works from plain code and from inside a running loop (which it blocks meanwhile).
    """
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenwire-svc") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


class OwnedServer:
    """What both private servers share: a port kept for the object's life, a process, and a
    temp dir of their own, removed with the server by :meth:`close` (idempotent; also run at
    interpreter exit); use as a context manager. ``_log_name`` names the log in that dir."""

    _kind = "server"
    _log_name = "server.log"

    def __init__(self, base_dir: Path | None, startup_timeout_s: float) -> None:
        self._base_dir = base_dir
        self._startup_timeout_s = startup_timeout_s
        self._root: Path | None = None
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise ServiceError(f"the {self._kind} has not been started")
        return self._port

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self._dir() / self._log_name

    def log_tail(self) -> str:
        return tail(self.log_path) if self._root is not None else ""

    def _dir(self) -> Path:
        if self._root is None:
            raise ServiceError(f"the {self._kind} has not been started")
        return self._root

    def _make_dir(self, prefix: str) -> None:
        """The temp dir, made on the first start (and removed by :meth:`close`)."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix=prefix, dir=self._base_dir))
            atexit.register(self.close)

    def start(self) -> None:
        raise NotImplementedError

    def _launch(self, port: int) -> None:
        """Start the server process on ``port`` and wait until it answers."""
        raise NotImplementedError

    def _run_until_ready(
        self,
        command: list[str],
        output: Path,
        wait_ready: Callable[[subprocess.Popen[bytes]], None],
    ) -> None:
        """Start ``command`` in the temp dir (a session of its own, output appended to
        ``output``) and ``wait_ready`` for it; a server that never gets ready is killed."""
        with output.open("ab") as out:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._dir(),
                start_new_session=True,
            )
        self._process = process
        try:
            wait_ready(process)
        except BaseException:
            end_process(process, signal.SIGKILL, 5)
            raise

    def _launch_on_its_port(self) -> None:
        """Launch on the port of the first start; the first time, pick one (three tries: a
        freshly picked port can be taken before the server binds it)."""
        if self._port is not None:
            self._launch(self._port)
            return
        error: ServiceError | None = None
        for _ in range(3):
            port = service_port()
            try:
                self._launch(port)
            except ServiceError as exc:
                error = exc
                continue
            self._port = port
            return
        assert error is not None
        raise error

    def _halt(self) -> None:
        """Stop the server at once."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the server at once and remove its dir."""
        try:
            self._halt()
        finally:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None
            atexit.unregister(self.close)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
