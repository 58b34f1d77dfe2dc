"""``ChatSession`` request tasks in isolation: they close their log readers however they end.

A reader registration (``StreamSource.read``) must end with the request that made it; leaving
it to garbage collection lets it outlive the request whenever anything else still refers to
the iterator, and the generation then never learns that nobody is listening.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from types import SimpleNamespace
from typing import Any

from tokenwire.api.ws import ChatSession
from tokenwire.config import ServerConfig
from tokenwire.streams.events import Event, TextDelta


class StuckSocket:
    """A WebSocket whose client accepts nothing: every send waits for ever (ASGI only, no
    ``tokenwire.ws`` extension: the writer's own send timeout applies)."""

    client = None
    scope: dict[str, Any] = {"extensions": {}}  # noqa: RUF012 - read only

    async def send(self, message: Any) -> None:
        await asyncio.Event().wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await asyncio.Event().wait()


class EndlessSource:
    """A StreamSource with endless text; it keeps the readers it hands out, as a registry would."""

    id = "chatcmpl-test"
    model = "sim"
    created = 0
    include_usage = False
    finish_reason = None
    usage = None
    error = None

    def __init__(self) -> None:
        self.response_headers: dict[str, str] = {}
        self.readers = 0
        self.handed_out: list[AsyncGenerator[list[Event] | None, None]] = []

    def read(
        self, *, after: int = 0, heartbeat_s: float | None = None
    ) -> AsyncGenerator[list[Event] | None, None]:
        reader = self._read()
        self.handed_out.append(reader)
        return reader

    async def _read(self) -> AsyncGenerator[list[Event] | None, None]:
        self.readers += 1
        try:
            while True:
                await asyncio.sleep(0)
                yield [TextDelta("x")]
        finally:
            self.readers -= 1

    def cancel(self, cause: str) -> None:
        return None


class Session(ChatSession):
    """A session whose compatible requests are served by ``source`` (no service needed)."""

    def __init__(self, source: EndlessSource) -> None:
        state = SimpleNamespace(settings=SimpleNamespace(server=ServerConfig()))
        super().__init__(StuckSocket(), state, key=None, envelope=False)  # type: ignore[arg-type]
        self.source = source

    async def _start(self, *args: Any, **kwargs: Any) -> Any:
        return self.source

    def queue_full(self) -> bool:
        return self._out is not None and self._out.full()

    def stop_writer(self) -> None:
        if self._writer_task is not None:
            self._writer_task.cancel()


async def until(predicate: Callable[[], bool], deadline_s: float = 5.0) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.001)


async def test_envelope_request_cancelled_while_waiting_for_the_writer_closes_its_reader() -> None:
    """An envelope request task cancelled while its chunks wait for a stuck client detaches its reader before it ends."""
    source = EndlessSource()
    session = Session(source)
    task = asyncio.create_task(session._serve_envelope("r1", source, 0))
    try:
        await until(session.queue_full)  # the task now waits to hand over a chunk
        assert source.readers == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert source.readers == 0
    finally:
        session.stop_writer()


async def test_compatible_request_cancelled_while_waiting_for_the_writer_closes_its_reader() -> (
    None
):
    """The same for a compatible-mode request."""
    source = EndlessSource()
    session = Session(source)
    task = asyncio.create_task(session._serve_compatible({"model": "sim", "messages": []}))
    try:
        await until(session.queue_full)
        assert source.readers == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert source.readers == 0
    finally:
        session.stop_writer()
