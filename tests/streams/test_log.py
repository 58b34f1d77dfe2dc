"""The in-process stream log: numbering, replay from a cursor, waking readers."""

from __future__ import annotations

import asyncio

import pytest

from tokenwire.streams.events import Finish, TextDelta
from tokenwire.streams.log import Heartbeat, MemoryStreamLog


def test_events_are_numbered_from_one_and_replayable() -> None:
    """append returns 1, 2, …; read_after(n) returns everything after n."""
    log = MemoryStreamLog()
    assert [log.append(TextDelta(t)) for t in "abc"] == [1, 2, 3]
    assert log.read_after(0) == [TextDelta("a"), TextDelta("b"), TextDelta("c")]
    assert log.read_after(2) == [TextDelta("c")]
    assert log.read_after(3) == []


async def test_waiting_reader_wakes_on_append_and_close() -> None:
    """A reader waiting beyond the end wakes when an event arrives or the log closes."""
    log = MemoryStreamLog()
    waiter = asyncio.create_task(log.wait_beyond(0, None))
    await asyncio.sleep(0)
    assert not waiter.done()
    log.append(TextDelta("x"))
    assert await waiter is True
    closer = asyncio.create_task(log.wait_beyond(1, None))
    await asyncio.sleep(0)
    log.close()
    assert await closer is True


async def test_wait_times_out_for_heartbeats() -> None:
    """With a heartbeat and no event, wait_beyond returns False (time for a heartbeat)."""
    log = MemoryStreamLog()
    heartbeat = Heartbeat(0.01)
    assert await log.wait_beyond(0, heartbeat) is False
    assert log._waiters == []
    heartbeat.stop()


def test_append_after_close_is_a_bug() -> None:
    """Appending to a closed log raises."""
    log = MemoryStreamLog()
    log.append(Finish("stop"))
    log.close()
    with pytest.raises(RuntimeError):
        log.append(TextDelta("late"))
