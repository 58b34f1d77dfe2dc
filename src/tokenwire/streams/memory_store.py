"""The in-process stream store: live resumable generations, and finished ones for a while.

Memory is bounded: when more than ``max_finished`` finished streams are kept, or their events
add up to more than ``max_events``, the oldest finished streams are evicted first; a stream
that ended with more than ``max_events_per_stream`` events is not kept after it ends. A
stream that was evicted or outlived its retention answers ``410 Gone``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from tokenwire.errors import GatewayError, NotFound, StreamGone
from tokenwire.streams.generation import Generation
from tokenwire.streams.store import (
    check_cursor_sign,
    conflict,
    cursor_past_end,
    in_progress,
)

GONE_REMEMBERED = 100_000  # evicted stream ids kept to answer 410 rather than 404


class MemoryStreamStore:
    """Resumable generations by stream id, plus the Idempotency-Key index."""

    def __init__(
        self,
        *,
        retention_s: float = 300.0,
        max_finished: int = 10_000,
        max_events: int = 2_000_000,
        max_events_per_stream: int = 100_000,
    ) -> None:
        self._retention_s = retention_s
        self._max_finished = max_finished
        self._max_events = max_events
        self._max_events_per_stream = max_events_per_stream
        self._live: dict[str, Generation] = {}
        self._finished: OrderedDict[str, tuple[Generation, float]] = OrderedDict()
        self._finished_events = 0
        self._gone: OrderedDict[str, str] = OrderedDict()  # stream id -> key id, recently evicted
        # (key id, Idempotency-Key) -> (body digest, stream id); claimed before admission
        self._idempotency: dict[tuple[str, str], tuple[str, str]] = {}
        self._idempotency_of: dict[str, tuple[str, str]] = {}  # stream id -> (key, idem)

    async def start(self) -> None:
        """Nothing to open."""

    async def aclose(self) -> None:
        """Nothing to close."""

    # -- writing -----------------------------------------------------------------------------

    async def claim(
        self, key_id: str, idempotency_key: str, digest: str, stream_id: str
    ) -> Generation | None:
        index = (key_id, idempotency_key)
        entry = self._idempotency.get(index)
        if entry is not None:
            known_digest, known_id = entry
            if known_digest != digest:
                raise conflict()
            earlier = self._kept(known_id)
            if earlier is not None:
                return earlier
            if known_id not in self._gone:
                raise in_progress(idempotency_key)
        self._idempotency[index] = (digest, stream_id)
        self._idempotency_of[stream_id] = index
        return None

    async def release(self, key_id: str, idempotency_key: str, stream_id: str) -> None:
        index = (key_id, idempotency_key)
        if self._idempotency.get(index, ("", ""))[1] == stream_id:
            del self._idempotency[index]
        self._idempotency_of.pop(stream_id, None)

    async def add(self, generation: Generation, idempotency_key: str | None) -> None:
        self._live[generation.id] = generation

    def finished(self, generation: Generation) -> None:
        """Move a generation that ended to the retention area (and evict what is too old)."""
        if self._live.pop(generation.id, None) is None:
            return
        self._finished[generation.id] = (generation, time.monotonic() + self._retention_s)
        self._finished_events += generation.log.last_seq
        if generation.log.last_seq > self._max_events_per_stream:
            self._drop(generation.id)
        self._evict()

    def _evict(self) -> None:
        now = time.monotonic()
        while self._finished:
            stream_id, (_generation, expires) = next(iter(self._finished.items()))
            over = (
                len(self._finished) > self._max_finished or self._finished_events > self._max_events
            )
            if expires > now and not over:
                break
            self._drop(stream_id)

    def _drop(self, stream_id: str) -> None:
        generation, _expires = self._finished.pop(stream_id)
        self._finished_events -= generation.log.last_seq
        self._gone[stream_id] = generation.key_id
        if len(self._gone) > GONE_REMEMBERED:
            self._gone.popitem(last=False)
        index = self._idempotency_of.pop(stream_id, None)
        if index is not None:
            self._idempotency.pop(index, None)

    # -- reading -----------------------------------------------------------------------------

    def _kept(self, stream_id: str) -> Generation | None:
        self._evict()
        generation = self._live.get(stream_id)
        if generation is None and stream_id in self._finished:
            generation = self._finished[stream_id][0]
        return generation

    def find(self, stream_id: str, key_id: str) -> Generation | None:
        """The kept generation of ``key_id``; None if unknown here; 410 if it was evicted."""
        generation = self._kept(stream_id)
        if generation is not None:
            return generation if generation.key_id == key_id else None
        if self._gone.get(stream_id) == key_id:
            raise StreamGone(
                f"Stream {stream_id!r} has ended and is no longer kept (retention "
                f"{self._retention_s:g} s).",
                param="stream_id",
            )
        return None

    async def get(self, stream_id: str, key_id: str, after: int) -> Generation:
        check_cursor_sign(after)
        generation = self.find(stream_id, key_id)
        if generation is None:
            raise NotFound(f"No stream {stream_id!r}.", param="stream_id", code="stream_not_found")
        if generation.finished and after > generation.log.last_seq:
            raise cursor_past_end(stream_id, after, generation.log.last_seq)
        return generation

    def live(self, stream_id: str) -> Generation | None:
        """The running generation with this id, if it runs here."""
        return self._live.get(stream_id)

    def holds(self, generation: Generation) -> bool:
        return generation.id in self._live or generation.id in self._finished

    def readable_elsewhere_s(self, generation: Generation) -> float | None:
        return None  # this process's memory: gone when it exits

    @property
    def remote_reads(self) -> int:
        return 0  # every stream here is this process's own

    def interrupt_remote_reads(self, error_for: Callable[[str], GatewayError]) -> int:
        return 0

    @property
    def live_count(self) -> int:
        return len(self._live)

    @property
    def finished_count(self) -> int:
        return len(self._finished)
