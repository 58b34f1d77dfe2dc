"""``PrivateRedis``: a redis-server of a test's own, to kill, hang and restart."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tokenwire.testing_services.common import (
    POLL_INTERVAL_S,
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    OwnedServer,
    ServiceError,
    end_process,
)


def delete_keys(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` on the Redis at ``url`` (a test's or a bench run's
    own prefix on a shared server, tidied at the end)."""
    client = redis.Redis.from_url(url)
    try:
        stale = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(stale), 1000):
            client.delete(*stale[start : start + 1000])
    finally:
        client.close()


class PrivateRedis(OwnedServer):
    """A ``redis-server`` of its own on a loopback port, without persistence, to break.

    Nothing runs until :meth:`start` (or ``with``); the port chosen then is kept for the
    object's life, so :meth:`kill` + :meth:`start` brings an empty server back on the same URL.
    """

    _log_name = "redis.log"

    def __init__(
        self,
        *,
        base_dir: Path | None = None,
        executable: str = "redis-server",
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        found = shutil.which(executable)
        if found is None:
            raise ServiceError(f"{executable!r} not found on PATH")
        super().__init__(base_dir, startup_timeout_s)
        self._executable = found

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, the same across restarts."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server (on the port of the first start, if any) and wait for PING."""
        if self.running:
            raise ServiceError(f"redis on port {self._port} is already running")
        self._make_dir("tokenwire-redis-")
        self._launch_on_its_port()

    def _launch(self, port: int) -> None:
        assert self._root is not None
        command = [
            self._executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._root),
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        self._run_until_ready(command, self.log_path, lambda p: self._wait_ready(p, port))

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        client = redis.Redis(
            host="127.0.0.1",
            port=port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),  # the default retries with backoff for seconds
        )
        try:
            while True:
                if process.poll() is not None:
                    raise ServiceError(
                        f"redis-server on port {port} exited with {process.returncode}:\n"
                        + self.log_tail()
                    )
                try:
                    info = client.info("server")
                    if int(info["process_id"]) == process.pid:
                        return
                    raise ServiceError(
                        f"port {port} is answered by another redis (pid {info['process_id']})"
                    )
                except (redis.RedisError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"redis-server on port {port} did not answer within "
                        f"{self._startup_timeout_s} s:\n" + self.log_tail()
                    )
                time.sleep(POLL_INTERVAL_S)  # the polling interval
        finally:
            client.close()

    def ensure_running(self) -> None:
        """Start the server unless it runs (resuming it if paused is up to the caller)."""
        if not self.running:
            self.start()

    def kill(self) -> None:
        """SIGKILL the server (a crash: clients see their connections reset) and reap it."""
        process = self._process
        if process is not None and end_process(process, signal.SIGKILL, 10) is None:
            raise ServiceError(f"redis pid {process.pid} survived SIGKILL")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Shut the server down cleanly (SIGTERM; SIGKILL after ``timeout_s``)."""
        if self._process is not None:
            end_process(self._process, signal.SIGTERM, timeout_s)

    def restart(self) -> None:
        """:meth:`kill` and :meth:`start` again on the same port: an empty server, same URL."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open, commands hang until :meth:`resume`."""
        if self._process is None or not self.running:
            raise ServiceError("the server is not running")
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self._process is not None and self.running:
            self._process.send_signal(signal.SIGCONT)

    def _halt(self) -> None:
        self.kill()
