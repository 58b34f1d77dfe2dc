"""A TCP proxy for tests that cuts connections in the middle of answers.

``CuttingProxy`` listens on a free loopback port and relays every connection to a target port
(a gateway), byte for byte, from its own thread and event loop (so sync clients, async
clients and subprocesses can all go through it). Each connection draws a budget ``n`` from
``marks``: as soon as any one completion on it has delivered ``n`` content chunks (a chunk is
recognised by its ``"id":"chatcmpl-…"`` followed by a ``"content"`` field, over SSE and
WebSocket alike), and a random number of further bytes has passed (so the cut often falls
inside a frame), both sides are cut: an abortive close (RST) or, sometimes, a FIN.
Connections are counted, and so are cuts.

Counting each completion's chunks, rather than bytes or time, makes "mid-answer" hold by
construction: no connection carries more than ``marks[1]`` content chunks of one completion,
so an answer with more of them is cut at least once after its first token, whatever the
machine's speed; and on a WebSocket shared by many requests, every one of them progresses
between two cuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import threading
from dataclasses import dataclass, field
from types import TracebackType

READ_BYTES = 65536
CONTENT_CHUNK = re.compile(rb'"id":"(chatcmpl-[\w-]+)"(?:(?!"id":").){0,400}?"content"', re.DOTALL)
"""A content chunk (group 1: its completion id); a chunk without content does not match."""
CARRY = 1024  # bytes kept from one read to the next: a chunk may straddle two reads


@dataclass
class _Budget:
    """What one connection may still deliver before it is cut."""

    marks: int  # content chunks of one completion that end the connection
    extra: int  # bytes relayed after the last of them
    seen: dict[bytes, int] = field(default_factory=dict)
    cut_after: int | None = None  # bytes still to relay once a completion used its marks


class CuttingProxy:
    """Relays ``127.0.0.1:port`` to ``127.0.0.1:target_port``, cutting connections mid-answer."""

    def __init__(
        self,
        target_port: int,
        *,
        marks: tuple[int, int] = (1, 8),
        extra_bytes: tuple[int, int] = (0, 120),
        seed: int | str = 0,
        fin_share: float = 0.25,
    ) -> None:
        self.target_port = target_port
        self.marks = marks
        self.extra_bytes = extra_bytes
        self.fin_share = fin_share
        self.cutting = True  # set False to relay without cutting
        self.connections = 0
        self.cuts = 0
        self.port = 0
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="cutting-proxy", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10) or self.port == 0:
            raise RuntimeError("the proxy did not start")

    def stop(self) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopped.set)
        self._thread.join(timeout=10)

    def __enter__(self) -> CuttingProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
            self.port = int(self._server.sockets[0].getsockname()[1])
        finally:
            self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()  # the relays see their connections end, and return
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- relaying ------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        budget = _Budget(self._rng.randint(*self.marks), self._rng.randint(*self.extra_bytes))
        fin = self._rng.random() < self.fin_share
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.transport.abort()
                return
            self._writers.add(up_writer)
            upward = asyncio.create_task(self._copy(reader, up_writer))
            try:
                cut = await self._relay_down(up_reader, writer, budget)
            finally:
                upward.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await upward
            if cut:
                self.cuts += 1
                for side in (writer, up_writer):
                    if fin:
                        side.close()
                    else:
                        side.transport.abort()
            else:
                for side in (writer, up_writer):
                    side.close()
        finally:
            self._writers.discard(writer)
            self._writers = {w for w in self._writers if not w.transport.is_closing()}
            self._tasks.discard(task)

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client to target, as it comes; the target's half is closed when the client's is."""
        while data := await reader.read(READ_BYTES):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def _relay_down(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: _Budget
    ) -> bool:
        """Target to client, until the target closes (False) or the budget is spent (True)."""
        carry = b""  # what the previous reads left unmatched (bounded)
        while True:
            try:
                data = await reader.read(READ_BYTES)
            except OSError:
                return False
            if not data:
                return False
            if budget.cut_after is None and self.cutting:
                budget.cut_after, carry = _cut_point(carry, data, budget)
            if budget.cut_after is not None and budget.cut_after <= len(data):
                writer.write(data[: budget.cut_after])
                with contextlib.suppress(OSError):
                    await writer.drain()
                return True
            if budget.cut_after is not None:
                budget.cut_after -= len(data)
            writer.write(data)
            try:
                await writer.drain()
            except OSError:
                return False


def _cut_point(carry: bytes, data: bytes, budget: _Budget) -> tuple[int | None, bytes]:
    """Where in ``data`` the cut falls once a completion used its marks (None while none
    has), and what to carry to the next read."""
    joined = carry + data
    end = 0
    for match in CONTENT_CHUNK.finditer(joined):
        end = match.end()
        completion = match.group(1)
        budget.seen[completion] = budget.seen.get(completion, 0) + 1
        if budget.seen[completion] >= budget.marks:
            return max(0, end - len(carry)) + budget.extra, b""
    return None, joined[end:][-CARRY:]
