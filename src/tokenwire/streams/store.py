"""Resumable streams kept in this process: live ones, and finished ones for a while.

A completion is *resumable* when its client asked (an ``Idempotency-Key``, the header
``X-Tokenwire-Resumable: true``, or ``resumable``/``idempotency_key`` in a WebSocket create).
Only those are kept here, because keeping them costs memory and, after a disconnect, upstream
tokens: such a generation keeps running for ``server.stream_grace_s`` after its last reader
leaves, and stays replayable for ``server.stream_retention_s`` after it ends.

Memory is bounded: when more than ``max_finished`` finished streams are kept, or their events
add up to more than ``max_events``, the oldest finished streams are evicted first. A stream
that was evicted or outlived its retention answers ``410 Gone``; one that never existed, or
belongs to another key, answers ``404`` (existence is never revealed to another key).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

from tokenwire.errors import GatewayError, InvalidRequest, NotFound
from tokenwire.streams.generation import Generation


class StreamGone(GatewayError):
    """The stream existed but its events are no longer kept."""

    status = 410
    type = "invalid_request_error"
    default_code = "stream_expired"


class IdempotencyConflict(GatewayError):
    """The same Idempotency-Key was used with a different request body."""

    status = 409
    type = "invalid_request_error"
    default_code = "idempotency_key_reused"


def body_digest(body: bytes) -> str:
    """The fingerprint that makes a retried request "the same request"."""
    return hashlib.sha256(body).hexdigest()


class StreamStore:
    """Resumable generations by stream id, plus the Idempotency-Key index."""

    def __init__(
        self, *, retention_s: float = 300.0, max_finished: int = 10_000, max_events: int = 2_000_000
    ) -> None:
        self._retention_s = retention_s
        self._max_finished = max_finished
        self._max_events = max_events
        self._live: dict[str, Generation] = {}
        self._finished: OrderedDict[str, tuple[Generation, float]] = OrderedDict()
        self._finished_events = 0
        self._gone: OrderedDict[str, str] = OrderedDict()  # stream id -> key id, recently evicted
        self._idempotency: dict[
            tuple[str, str], tuple[str, str]
        ] = {}  # (key, idem) -> (digest, id)
        self._idempotency_of: dict[str, tuple[str, str]] = {}  # stream id -> (key, idem)

    # -- writing -----------------------------------------------------------------------------

    def add(self, generation: Generation, idempotency: tuple[str, str] | None = None) -> None:
        """Keep a new resumable generation; ``idempotency`` is (Idempotency-Key, body digest)."""
        self._live[generation.id] = generation
        if idempotency is not None:
            key, digest = idempotency
            self._idempotency[(generation.key_id, key)] = (digest, generation.id)
            self._idempotency_of[generation.id] = (generation.key_id, key)

    def finished(self, generation: Generation) -> None:
        """Move a generation that ended to the retention area (and evict what is too old)."""
        if self._live.pop(generation.id, None) is None:
            return
        self._finished[generation.id] = (generation, time.monotonic() + self._retention_s)
        self._finished_events += generation.log.last_seq
        self._evict()

    def _evict(self) -> None:
        now = time.monotonic()
        while self._finished:
            stream_id, (generation, expires) = next(iter(self._finished.items()))
            over = (
                len(self._finished) > self._max_finished or self._finished_events > self._max_events
            )
            if expires > now and not over:
                break
            self._finished.popitem(last=False)
            self._finished_events -= generation.log.last_seq
            self._gone[stream_id] = generation.key_id
            if len(self._gone) > 100_000:
                self._gone.popitem(last=False)
            index = self._idempotency_of.pop(stream_id, None)
            if index is not None:
                self._idempotency.pop(index, None)

    # -- reading -----------------------------------------------------------------------------

    def get(self, stream_id: str, key_id: str) -> Generation:
        """The stream, for the key that created it; 404 otherwise, 410 when no longer kept."""
        self._evict()
        generation = self._live.get(stream_id)
        if generation is None and stream_id in self._finished:
            generation = self._finished[stream_id][0]
        if generation is not None and generation.key_id == key_id:
            return generation
        if generation is None and self._gone.get(stream_id) == key_id:
            raise StreamGone(
                f"Stream {stream_id!r} has ended and is no longer kept (retention "
                f"{self._retention_s:g} s).",
                param="stream_id",
            )
        raise NotFound(f"No stream {stream_id!r}.", param="stream_id", code="stream_not_found")

    def check_cursor(self, generation: Generation, after: int) -> None:
        """A cursor must not point past the last event of a finished stream."""
        if after < 0:
            raise InvalidRequest("starting_after must be >= 0.", param="starting_after")
        if generation.finished and after > generation.log.last_seq:
            raise StreamGone(
                f"Cursor {after} is past the end of stream {generation.id!r} "
                f"({generation.log.last_seq} events).",
                param="starting_after",
                code="cursor_out_of_range",
            )

    def by_idempotency_key(
        self, key_id: str, idempotency_key: str, digest: str
    ) -> Generation | None:
        """The generation an earlier request with this key started, if any; 409 on a new body."""
        entry = self._idempotency.get((key_id, idempotency_key))
        if entry is None:
            return None
        known_digest, stream_id = entry
        if known_digest != digest:
            raise IdempotencyConflict(
                "This Idempotency-Key was already used with a different request body.",
                param="Idempotency-Key",
            )
        try:
            return self.get(stream_id, key_id)
        except (NotFound, StreamGone):
            self._idempotency.pop((key_id, idempotency_key), None)
            return None

    def __contains__(self, generation: object) -> bool:
        return isinstance(generation, Generation) and (
            generation.id in self._live or generation.id in self._finished
        )

    @property
    def live_count(self) -> int:
        return len(self._live)

    @property
    def finished_count(self) -> int:
        return len(self._finished)
