"""The runner's side of a load-generator process (:mod:`tokenwire.bench.worker`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from tokenwire.bench.errors import WorkerFailed
from tokenwire.bench.ipc import (
    Command,
    Failed,
    Go,
    Prepare,
    Prepared,
    Progress,
    Quit,
    Ready,
    Release,
    Released,
    Reply,
    RowDone,
    RowSpec,
    frame,
    read_reply,
)


class LoadGenerator:
    """One worker process: started once, then asked to prepare and run rows."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._process: asyncio.subprocess.Process | None = None
        self._busy = False  # a row is running: the worker reads no command until it ends
        self.pid: int | None = None

    async def start(self, env: dict[str, str]) -> None:
        """Start the worker in its own session and wait until it is ready."""
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tokenwire.bench.worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        self.pid = self._process.pid
        reply = await self._reply()
        if not isinstance(reply, Ready):
            raise WorkerFailed(f"load generator {self.name}: unexpected first reply {reply!r}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        return ""

    async def _send(self, command: Command) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise WorkerFailed(f"load generator {self.name} is not running")
        process.stdin.write(frame(command))
        await process.stdin.drain()

    async def _reply(self) -> Reply:
        process = self._process
        if process is None or process.stdout is None:
            raise WorkerFailed(f"load generator {self.name} is not running")
        reply = await read_reply(process.stdout)
        if reply is None:
            code = await process.wait()
            raise WorkerFailed(f"load generator {self.name} exited ({code}):\n{self._log_tail()}")
        if isinstance(reply, Failed):
            raise WorkerFailed(f"load generator {self.name} failed:\n{reply.message}")
        return reply

    async def prepare(self, spec: RowSpec) -> Prepared:
        """Build the row's requests and open its sockets; not timed."""
        await self._send(Prepare(spec=spec))
        reply = await self._reply()
        if not isinstance(reply, Prepared):
            raise WorkerFailed(f"load generator {self.name}: expected Prepared, got {reply!r}")
        return reply

    async def go(self, on_progress: Callable[[int], None]) -> RowDone:
        """Run the prepared row; ``on_progress(done)`` as requests finish."""
        await self._send(Go())
        self._busy = True
        while True:
            reply = await self._reply()
            if isinstance(reply, Progress):
                on_progress(reply.done)
            elif isinstance(reply, RowDone):
                self._busy = False
                return reply
            else:
                raise WorkerFailed(f"load generator {self.name}: unexpected reply {reply!r}")

    async def release(self) -> None:
        """Have the worker close every connection it holds; the next row opens new ones."""
        await self._send(Release())
        reply = await self._reply()
        if not isinstance(reply, Released):
            raise WorkerFailed(f"load generator {self.name}: expected Released, got {reply!r}")

    async def stop(self) -> None:
        """Ask an idle worker to quit, terminate a busy one; kill it if it is not gone in 10 s."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        if self._busy:
            process.terminate()
        else:
            with contextlib.suppress(WorkerFailed, ConnectionError, RuntimeError):
                await self._send(Quit())
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()

    def kill(self) -> None:
        """Last resort (no event loop needed): SIGKILL by PID if it may still run."""
        process = self._process
        if self.pid is None or (process is not None and process.returncode is not None):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)
