"""The load-generator process: ``python -m tokenwire.bench.worker`` (one per scenario).

Why a process per scenario: the client's CPU and memory per open stream are part of what is
compared (WebSocket vs SSE), and in one shared process memory freed by one scenario's row is
reused by the next, which hides the difference. Here each scenario's client starts from the
same empty interpreter; the runner samples the worker's RSS during a row against its RSS when
it became ready. The runner's progress bar and sampling run in another process, so they take
no time from the client's event loop.

A row: ``Prepare`` builds the request bodies and opens the WebSockets (not timed), ``Go`` starts
every user at once (or spread over ``ramp_s``), each sending its requests one after another
(``requests_per_user`` of them, or until ``duration_s`` has passed); the wall time runs from
the start to the end of the last stream. Correctness is checked after the clock stops.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import BinaryIO

import aiohttp
from websockets.asyncio.client import ClientConnection

from tokenwire.bench import plain, sse, ws
from tokenwire.bench.ipc import (
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
    read_command,
)
from tokenwire.bench.workload import StreamState, request_body

Channel = Callable[[StreamState], Awaitable[None]]
PROGRESS_INTERVAL_S = 0.2
CONNECT_BATCH = 100


def _dead_channel(reason: str) -> Channel:
    async def channel(state: StreamState) -> None:
        state.sent = time.perf_counter()
        state.error = reason

    return channel


def _envelope_channel(socket: ws.EnvelopeSocket) -> Channel:
    async def channel(state: StreamState) -> None:
        await socket.request(state, f"{state.user}.{state.index}")

    return channel


class Worker:
    """Runs rows on request; keeps HTTP sessions (keep-alive pools) between rows."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._sessions: dict[bool, aiohttp.ClientSession] = {}
        self._sockets: list[ws.EnvelopeSocket | ws.CompatSocket] = []
        self._spec: RowSpec | None = None
        self._channels: list[Channel] = []
        self._bodies: list[list[bytes]] | None = None
        self._end_marker = sse.END_MARKER
        self._completed = 0

    def send(self, reply: Reply) -> None:
        """Write one reply frame to the runner."""
        self._out.write(frame(reply))
        self._out.flush()

    def _session(self, spec: RowSpec) -> aiohttp.ClientSession:
        session = self._sessions.get(spec.keep_alive)
        if session is None:
            session = sse.make_session(keep_alive=spec.keep_alive, timeout_s=spec.timeout_s)
            self._sessions[spec.keep_alive] = session
        return session

    async def _close_sockets(self) -> None:
        sockets, self._sockets = self._sockets, []
        for start in range(0, len(sockets), CONNECT_BATCH):
            batch = sockets[start : start + CONNECT_BATCH]
            await asyncio.gather(*(s.close() for s in batch), return_exceptions=True)

    async def prepare(self, spec: RowSpec) -> Prepared:
        """Get the row ready: close the last row's sockets, open this row's."""
        await self._close_sockets()
        self._spec = spec
        self._completed = 0
        started = time.perf_counter()
        self._bodies = None
        if spec.duration_s is None:
            self._bodies = [
                [self._body(spec, user, index) for index in range(spec.requests_per_user)]
                for user in range(spec.concurrency)
            ]
        prepared = Prepared()
        if spec.transport in ("sse", "json"):
            session = self._session(spec)
            send = sse.stream_one if spec.transport == "sse" else plain.complete_one

            async def post(state: StreamState) -> None:
                await send(session, spec.url, spec.headers, state)

            self._channels = [post] * spec.concurrency
            self._end_marker = sse.END_MARKER if spec.transport == "sse" else "a JSON answer"
        else:
            prepared = await self._open_sockets(spec)
        gc.collect()
        gc.freeze()  # no full collection walks the set-up heap mid-row (as in the servers)
        return Prepared(
            connect_s=time.perf_counter() - started,
            unsupported=prepared.unsupported,
            compression=prepared.compression,
        )

    @staticmethod
    def _body(spec: RowSpec, user: int, index: int) -> bytes:
        stream = spec.transport != "json"
        return request_body(spec.model, spec.row_id, user, index, spec.tokens, stream=stream)

    async def _open_sockets(self, spec: RowSpec) -> Prepared:
        """One socket per ``streams_per_socket`` users; the first one tells if WS works."""
        compat = spec.ws_mode == "compat"
        per_socket = 1 if compat else max(1, spec.streams_per_socket)
        count = math.ceil(spec.concurrency / per_socket)
        self._end_marker = ws.COMPAT_END if compat else ws.ENVELOPE_END
        opened: list[ws.EnvelopeSocket | ws.CompatSocket | str] = []
        compression: bool | None = None
        for start in range(0, count, CONNECT_BATCH):
            results = await asyncio.gather(
                *(
                    ws.open_socket(spec.url, spec.headers, compression=spec.ws_compression)
                    for _ in range(min(CONNECT_BATCH, count - start))
                ),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    reason = ws.unsupported_reason(result)
                    if reason is not None and not opened:
                        for other in results:
                            if isinstance(other, ClientConnection):
                                await other.close()
                        return Prepared(unsupported=reason)
                    opened.append(f"connect failed: {type(result).__name__}: {result}")
                    continue
                if compression is None:
                    compression = ws.negotiated_compression(result)
                if compat:
                    opened.append(ws.CompatSocket(result, spec.timeout_s))
                else:
                    opened.append(ws.EnvelopeSocket(result, spec.timeout_s))
        self._sockets = [s for s in opened if not isinstance(s, str)]
        channels: list[Channel] = []
        for user in range(spec.concurrency):
            item = opened[user // per_socket]
            if isinstance(item, str):
                channels.append(_dead_channel(item))
            elif isinstance(item, ws.CompatSocket):
                channels.append(item.request)
            else:
                channels.append(_envelope_channel(item))
        self._channels = channels
        return Prepared(compression=compression)

    async def go(self) -> RowDone:
        """Run the prepared row; return its records once every user is done."""
        spec = self._spec
        if spec is None:
            raise RuntimeError("go before prepare")
        states: list[StreamState] = []
        bodies = self._bodies
        step = spec.ramp_s / spec.concurrency
        start = time.perf_counter()
        deadline = None if spec.duration_s is None else start + spec.duration_s

        async def user(number: int, channel: Channel) -> None:
            if step > 0:
                await asyncio.sleep(number * step)
            index = 0
            while True:
                if deadline is None:
                    if index >= spec.requests_per_user:
                        return
                elif time.perf_counter() >= deadline:
                    return
                if bodies is not None:
                    body = bodies[number][index]
                else:
                    body = self._body(spec, number, index)
                state = StreamState(number, index, body)
                await channel(state)
                states.append(state)
                self._completed += 1
                index += 1

        reporter = asyncio.get_running_loop().create_task(self._report_progress())
        try:
            await asyncio.gather(*(user(n, ch) for n, ch in enumerate(self._channels)))
        finally:
            reporter.cancel()
        wall_s = time.perf_counter() - start
        records = [s.record(spec.tokens, self._end_marker) for s in states]
        return RowDone(wall_s=wall_s, records=records)

    async def _report_progress(self) -> None:
        last = -1
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            if self._completed != last:
                last = self._completed
                self.send(Progress(done=last))

    async def close(self) -> None:
        """Close sockets and sessions (a later row opens new ones)."""
        await self._close_sockets()
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()


async def serve(out: BinaryIO) -> None:
    """Answer commands from stdin until ``Quit`` or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    worker = Worker(out)
    worker.send(Ready(pid=os.getpid()))
    try:
        while True:
            command = await read_command(reader)
            if command is None or isinstance(command, Quit):
                return
            try:
                if isinstance(command, Prepare):
                    worker.send(await worker.prepare(command.spec))
                elif isinstance(command, Go):
                    worker.send(await worker.go())
                elif isinstance(command, Release):
                    await worker.close()
                    worker.send(Released())
            except Exception:  # noqa: BLE001 - reported to the runner, which fails the run
                worker.send(Failed(message=traceback.format_exc()))
    finally:
        await worker.close()


def main() -> None:
    """Entry point: frames go to the real stdout; anything printed goes to stderr."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(out))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(out))


if __name__ == "__main__":
    main()
