"""The numbered, replayable event log of one generation (in-process backend).

Events are numbered from 1; a reader asks for everything *after* a sequence number, so
``after=0`` is the whole stream and a reconnecting reader continues from the last number it saw.
Appending wakes every waiting reader; readers never block the writer.
"""

from __future__ import annotations

import asyncio
import contextlib

from tokenwire.streams.events import Event


class MemoryStreamLog:
    """An append-only list of events with async waiting for new ones."""

    __slots__ = ("_closed", "_events", "_waiters")

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._waiters: list[asyncio.Future[bool]] = []
        self._closed = False

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest event (0 when empty)."""
        return len(self._events)

    @property
    def closed(self) -> bool:
        """True once the writer has appended its last event."""
        return self._closed

    def append(self, event: Event) -> int:
        """Append an event, wake readers, and return its sequence number."""
        if self._closed:
            raise RuntimeError("append to a closed stream log")
        self._events.append(event)
        self._wake()
        return len(self._events)

    def close(self) -> None:
        """Mark the log complete; readers drain what is left and stop."""
        if not self._closed:
            self._closed = True
            self._wake()

    def read_after(self, seq: int) -> list[Event]:
        """Every event numbered above ``seq`` that is in the log now."""
        return self._events[seq:]

    async def wait_beyond(self, seq: int, timeout: float | None) -> bool:  # noqa: ASYNC109
        """Wait until an event above ``seq`` exists or the log closes.

        Returns False if ``timeout`` seconds passed first (the caller may send a heartbeat).
        This runs once per token per reader, so the timeout is a bare timer handle rather than
        ``asyncio.timeout`` (which costs twice as much per wait).
        """
        if len(self._events) > seq or self._closed:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        timer = None if timeout is None else loop.call_later(timeout, self._expire, waiter)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if not waiter.done():  # the reader itself was cancelled
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        if not waiter.done():
            waiter.set_result(False)
            self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(True)
