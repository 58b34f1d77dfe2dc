"""The numbered, replayable event log of one generation (in-process backend).

Events are numbered from 1; a reader asks for everything *after* a sequence number, so
``after=0`` is the whole stream and a reconnecting reader continues from the last number it saw.
Appending wakes every waiting reader; readers never block the writer.
"""

from __future__ import annotations

import asyncio
import contextlib

from tokenwire.streams.events import Event


class Heartbeat:
    """When one reader stops waiting to send a heartbeat: ``interval_s`` into a wait with no
    event.

    One timer per reader, armed when a wait begins with none pending and re-armed for the
    rest of the interval if it fires early: a reader that gets a token every few
    milliseconds makes no timer per token (creating and cancelling one per wait was the
    most frequent timer operation of a busy gateway).
    """

    __slots__ = ("_deadline", "_interval_s", "_log", "_timer", "_waiter")

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self._log: MemoryStreamLog | None = None

    def _watch(
        self, log: MemoryStreamLog, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[bool]
    ) -> None:
        self._log, self._waiter = log, waiter
        self._deadline = loop.time() + self._interval_s
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._fire, loop)

    def _unwatch(self) -> None:
        self._waiter = None

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        waiter, log = self._waiter, self._log
        if waiter is None or waiter.done() or log is None:
            return  # not waiting: the next wait arms a timer
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._fire, loop)
            return
        log._expire(waiter)

    def stop(self) -> None:
        """Cancel the timer (the reader is done)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiter = self._log = None


class MemoryStreamLog:
    """An append-only list of events with async waiting for new ones."""

    __slots__ = ("_closed", "_events", "_loop", "_waiters")

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._waiters: list[asyncio.Future[bool]] = []
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the first waiter's

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

    async def wait_beyond(self, seq: int, heartbeat: Heartbeat | None) -> bool:
        """Wait until an event above ``seq`` exists or the log closes.

        Returns False if the reader's ``heartbeat`` interval passed first (the caller may
        send a heartbeat). This runs once per token per reader: the loop is looked up once
        per log, and the heartbeat's timer is not made anew per wait (:class:`Heartbeat`).
        """
        if len(self._events) > seq or self._closed:
            return True
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        if heartbeat is not None:
            heartbeat._watch(self, loop, waiter)
        try:
            return await waiter
        finally:
            if heartbeat is not None:
                heartbeat._unwatch()
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
