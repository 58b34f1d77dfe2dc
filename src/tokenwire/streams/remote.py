"""Following, through Redis, a generation that another gateway process runs.

The generating process appends every event to a Redis Stream whose entry ids are ``0-<seq>``,
so "everything after event N" is ``XREAD … STREAMS <key> 0-N``: the replay and the live tail
are one loop. While it reads, a :class:`RemoteStream` keeps a *lease* key alive; the owner's
grace window does not end while the lease exists, and when the reader leaves it shortens the
lease to one grace window, which is exactly the window a local reader would have left.

A stream is over after its last event (``Usage`` or ``StreamError``). If the owner process
disappears (its liveness key expired) before that, the reader ends with a 502
``stream_owner_lost`` error rather than waiting for ever. When the *reading* process drains
(tokenwire.drain), :meth:`RemoteStream.interrupt` ends the read (not the stream, which goes on
in its owner) with the error given, within one ``XREAD`` block; the reader then leaves like
any reader, so the owner's grace window lets the client resume on another instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenwire.errors import GatewayError, StreamGone, UpstreamError
from tokenwire.streams.codec import decode_event, is_last
from tokenwire.streams.events import Event, Finish, FinishReason, StreamError, Usage
from tokenwire.streams.generation import CancelCause

log = logging.getLogger("tokenwire.streams")


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The Redis keys of one stream (one hash slot, thanks to the ``{id}`` tag)."""

    meta: str
    events: str
    lease: str

    @classmethod
    def of(cls, prefix: str, stream_id: str) -> StreamKeys:
        base = f"{prefix}{{{stream_id}}}"
        return cls(meta=f"{base}:meta", events=f"{base}:events", lease=f"{base}:lease")


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    """How a remote reader keeps the owner's generation alive."""

    grace_s: float  # the owner's grace window, restarted when the reader leaves
    refresh_s: float  # how often a reading reader renews its lease (and looks at the owner)

    @property
    def reading_ms(self) -> int:
        return int((self.grace_s + 3 * self.refresh_s) * 1000)

    @property
    def leaving_ms(self) -> int:
        return max(1, int(self.grace_s * 1000))


Entry = tuple[bytes, dict[bytes, bytes]]


def _entries(reply: object) -> list[Entry]:
    """The entries of the one stream an ``XREAD`` asked for (its RESP2 reply shape)."""
    return cast(list[tuple[bytes, list[Entry]]], reply)[0][1]


def entry_seq(entry_id: bytes) -> int:
    """The event number of a Redis Stream entry id ``0-<seq>``."""
    return int(entry_id.rpartition(b"-")[2])


class RemoteStream:
    """A :class:`~tokenwire.streams.source.StreamSource` read from Redis."""

    def __init__(
        self,
        redis: Redis,
        keys: StreamKeys,
        *,
        stream_id: str,
        meta: dict[bytes, bytes],
        policy: LeasePolicy,
        owner_alive: Callable[[], Awaitable[bool]],
        request_cancel: Callable[[str, CancelCause], None],
        reading: set[RemoteStream] | None = None,
    ) -> None:
        self.id = stream_id
        self.model = meta[b"model"].decode()
        self.created = int(meta[b"created"])
        self.include_usage = meta.get(b"include_usage") == b"1"
        self.response_headers: dict[str, str] = {}
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None
        self.error: GatewayError | None = None
        self._last_seq: int | None = None
        if meta.get(b"state") == b"finished":
            self._last_seq = int(meta[b"last_seq"])
            if meta.get(b"last_event"):
                self._note([decode_event(meta[b"last_event"])])
            if meta.get(b"finish_reason"):
                self.finish_reason = meta[b"finish_reason"].decode()  # type: ignore[assignment]
        self._redis = redis
        self._keys = keys
        self._policy = policy
        self._owner_alive = owner_alive
        self._request_cancel = request_cancel
        self._reading = set() if reading is None else reading  # the store's open reads
        self._interrupt: GatewayError | None = None

    def interrupt(self, error: GatewayError) -> None:
        """End this read (this process drains) with ``error``; the stream itself goes on."""
        self._interrupt = error

    def cancel(self, cause: CancelCause) -> None:
        """Ask the owner process to cancel (over Redis pub/sub)."""
        self._request_cancel(self.id, cause)

    def _note(self, batch: list[Event]) -> None:
        for event in batch:
            if isinstance(event, Finish):
                self.finish_reason = event.reason
            elif isinstance(event, Usage):
                self.usage = event
            elif isinstance(event, StreamError):
                self.error = event.error

    async def read(
        self, *, after: int = 0, heartbeat_s: float | None = None
    ) -> AsyncGenerator[list[Event] | None, None]:
        cursor = after
        ended = self._last_seq is not None and cursor >= self._last_seq
        if ended:
            return
        redis, keys, policy = self._redis, self._keys, self._policy
        block_s = policy.refresh_s if heartbeat_s is None else min(heartbeat_s, policy.refresh_s)
        idle_s = 0.0
        lease = asyncio.get_running_loop().create_task(self._keep_lease())
        self._reading.add(self)
        try:
            await redis.set(keys.lease, b"1", px=policy.reading_ms)
            while True:
                if self._interrupt is not None:
                    yield [StreamError(self._interrupt)]
                    return  # not ended: the owner's grace window starts, for a resume elsewhere
                reply = await redis.xread(
                    {keys.events: f"0-{cursor}"}, count=1000, block=max(1, int(block_s * 1000))
                )
                if not reply:
                    idle_s += block_s
                    if heartbeat_s is not None and idle_s >= heartbeat_s:
                        idle_s = 0.0
                        yield None
                    verdict = await self._idle_verdict(cursor)
                    if verdict == "ended":
                        ended = True
                        return
                    if verdict == "lost":
                        ended = True
                        yield [StreamError(_owner_lost(self.id))]
                        return
                    continue
                idle_s = 0.0
                entries = _entries(reply)
                if entry_seq(entries[0][0]) != cursor + 1:
                    ended = True  # trimmed under a reader slower than the per-stream cap
                    yield [StreamError(_trimmed(self.id, cursor))]
                    return
                batch = [decode_event(fields[b"e"]) for _id, fields in entries]
                cursor = entry_seq(entries[-1][0])
                self._note(batch)
                ended = is_last(batch[-1])
                yield batch
                if ended:
                    return
        except RedisError as exc:
            log.warning("reading stream %s from Redis failed: %s", self.id, exc)
            ended = True
            yield [StreamError(UpstreamError("The shared stream log is unavailable; retry."))]
        finally:
            self._reading.discard(self)
            lease.cancel()
            if not ended:  # the reader left early: the owner's grace window starts now
                with contextlib.suppress(RedisError):
                    await redis.set(keys.lease, b"1", px=policy.leaving_ms)

    async def _keep_lease(self) -> None:
        """Renew the lease while this reader is registered, pulling or not."""
        while True:
            await asyncio.sleep(self._policy.refresh_s)
            try:
                await self._redis.set(self._keys.lease, b"1", px=self._policy.reading_ms)
            except RedisError as exc:
                log.warning("cannot renew the lease on stream %s: %s", self.id, exc)

    async def _idle_verdict(self, cursor: int) -> str:
        """After a quiet spell: "ended", "lost" (owner gone), or "wait"."""
        meta = await self._redis.hmget(self._keys.meta, [b"state", b"last_seq"])
        state, last_seq = meta
        if state == b"finished" and last_seq is not None and cursor >= int(last_seq):
            self._last_seq = int(last_seq)
            return "ended"
        if state == b"finished":
            return "wait"  # its last events are readable: the next XREAD returns them
        if state == b"lost" or state is None or not await self._owner_alive():
            return "lost"
        return "wait"


def _owner_lost(stream_id: str) -> GatewayError:
    return UpstreamError(
        f"The gateway process generating stream {stream_id!r} stopped before it ended.",
        code="stream_owner_lost",
    )


def _trimmed(stream_id: str, cursor: int) -> GatewayError:
    return StreamGone(
        f"Events after {cursor} of stream {stream_id!r} are no longer kept.",
        param="starting_after",
        code="cursor_out_of_range",
    )
