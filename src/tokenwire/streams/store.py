"""Resumable streams: the interface both backends implement (its errors are in tokenwire.errors).

A completion is *resumable* when its client asked (an ``Idempotency-Key``, the header
``X-Tokenwire-Resumable: true``, or ``resumable``/``idempotency_key`` in a WebSocket create).
Only those are kept, because keeping them costs memory and, after a disconnect, upstream
tokens: such a generation keeps running for ``server.stream_grace_s`` after its last reader
leaves, and stays replayable for ``server.stream_retention_s`` after it ends.

Two backends (``server.stream_backend``):

* ``memory`` (:mod:`tokenwire.streams.memory_store`): this process's streams only;
* ``redis`` (:mod:`tokenwire.streams.redis_store`): every event is also appended to a Redis
  Stream, so any gateway process sharing the Redis can serve a resume of a stream that
  another process is generating.

A stream that was evicted or outlived its retention answers ``410 Gone``; one that never
existed, or belongs to another key, answers ``404`` (existence is never revealed to another
key). An ``Idempotency-Key`` is claimed atomically before anything is admitted, so two
identical requests racing each other start one generation, never two.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from tokenwire.errors import (
    GatewayError,
    IdempotencyConflict,
    IdempotencyInProgress,
    InvalidRequest,
    StreamGone,
)
from tokenwire.streams.generation import Generation
from tokenwire.streams.source import StreamSource

_DELIVERY_FIELDS = frozenset({"stream", "stream_options"})


def request_digest(body: dict[str, Any]) -> str:
    """The fingerprint that makes a retried request "the same request", on any transport.

    It is taken over the decoded body in a canonical form (keys sorted at every level, no
    whitespace) without the fields that only say how the answer is delivered (``stream``,
    ``stream_options``), so the same request sent over SSE, WebSocket or as JSON matches.
    """
    canonical = {k: v for k, v in body.items() if k not in _DELIVERY_FIELDS}
    return hashlib.sha256(msgspec.json.encode(canonical, order="sorted")).hexdigest()


def check_cursor_sign(after: int) -> None:
    """A cursor is the number of an event already seen: 0 or more."""
    if after < 0:
        raise InvalidRequest("starting_after must be >= 0.", param="starting_after")


def cursor_past_end(stream_id: str, after: int, last_seq: int) -> StreamGone:
    """The 410 for a cursor beyond the last event of a finished stream."""
    return StreamGone(
        f"Cursor {after} is past the end of stream {stream_id!r} ({last_seq} events).",
        param="starting_after",
        code="cursor_out_of_range",
    )


def in_progress(idempotency_key: str) -> IdempotencyInProgress:
    return IdempotencyInProgress(
        f"A request with Idempotency-Key {idempotency_key!r} is still being admitted; retry.",
        param="Idempotency-Key",
    )


def conflict() -> IdempotencyConflict:
    return IdempotencyConflict(
        "This Idempotency-Key was already used with a different request body.",
        param="Idempotency-Key",
    )


class StreamStore(Protocol):
    """Where resumable streams are kept and found again."""

    async def start(self) -> None:
        """Open connections and start background work (called once, at start-up)."""
        ...

    async def aclose(self) -> None:
        """Flush what is pending and close (after the live generations were settled)."""
        ...

    async def claim(
        self, key_id: str, idempotency_key: str, digest: str, stream_id: str
    ) -> StreamSource | None:
        """Claim an Idempotency-Key for a new stream, or find the stream that holds it.

        Returns None when the key is now ``stream_id``'s; the earlier stream when the same
        body was sent before; raises 409 for another body, or while the earlier request is
        still being admitted.
        """
        ...

    async def release(self, key_id: str, idempotency_key: str, stream_id: str) -> None:
        """Give back a claim whose request was refused (429, 402, ...) before it started."""
        ...

    async def add(self, generation: Generation, idempotency_key: str | None) -> None:
        """Keep a new resumable generation (started, or about to be)."""
        ...

    def finished(self, generation: Generation) -> None:
        """The generation ended and was settled: keep it for its retention window."""
        ...

    async def get(self, stream_id: str, key_id: str, after: int) -> StreamSource:
        """The stream for a reader of ``key_id`` starting after event ``after``.

        404 for an unknown stream or another key's; 410 when it (or the events after the
        cursor) is no longer kept, or the cursor is past the end of a finished stream.
        """
        ...

    def holds(self, generation: Generation) -> bool:
        """True when ``generation`` is kept here (it was started resumable)."""
        ...

    def readable_elsewhere_s(self, generation: Generation) -> float | None:
        """How long other gateway processes can read ``generation`` after this one exits
        (its retention), or None when they cannot (not kept, or kept in this process only)."""
        ...

    @property
    def remote_reads(self) -> int:
        """Reads, open in this process, of streams that other processes generate."""
        ...

    def interrupt_remote_reads(self, error_for: Callable[[str], GatewayError]) -> int:
        """End those reads (a drain's timeout) with ``error_for(stream id)``; the streams go
        on in their owners. The number of reads ended."""
        ...
