"""The Redis stream store: resume, in any gateway process, a stream another one generates.

Each process keeps its own resumable generations in a :class:`MemoryStreamStore` (its readers
read the local log, at no extra cost) and *mirrors* each one into Redis:

* ``{p}{<id>}:meta`` (hash): key id, model, created, include_usage, owner process, state
  (``live`` → ``finished``), and once finished the last sequence number, finish reason and
  last event. It outlives the events by ``TOMBSTONE_S`` so a late resume gets 410, not 404.
* ``{p}{<id>}:events`` (stream): every event, entry id ``0-<seq>``, written with
  ``XADD … MAXLEN ~ server.stream_max_events_per_stream``; it expires
  ``server.stream_retention_s`` after the stream ends.
* ``{p}{<id>}:lease``: held by readers in other processes (see :mod:`.remote`); the owner asks
  for it before a grace window ends.
* ``{p}idem:<key id>:<sha256(Idempotency-Key)>``: ``"<body digest> <stream id>"``, claimed
  with ``SET NX`` before admission, so identical requests racing on different processes start
  one generation.
* ``{p}proc:<process>``: this process is alive (renewed every ``HEARTBEAT_S``).
* channel ``{p}cancel``: ``"<stream id> <cause>"``; the owner cancels its generation.

The mirror writes each batch of events the log holds in one pipelined round trip, so a slow
Redis makes batches larger, never the stream slower. Events are mirrored only for streams
that asked to be resumable. Redis errors on the request path are 503s; a mirror that fails
marks its stream ``lost`` (remote readers then end with an error; local ones are unaffected).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Callable
from functools import partial
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline, PubSub
from redis.exceptions import RedisError

from tokenwire.errors import GatewayError, NotFound, StreamGone, StreamStoreUnavailable
from tokenwire.redis_client import connect
from tokenwire.streams.codec import encode_event
from tokenwire.streams.generation import CancelCause, Generation
from tokenwire.streams.memory_store import MemoryStreamStore
from tokenwire.streams.remote import LeasePolicy, RemoteStream, StreamKeys, entry_seq
from tokenwire.streams.source import StreamSource
from tokenwire.streams.store import (
    check_cursor_sign,
    conflict,
    cursor_past_end,
    in_progress,
)

log = logging.getLogger("tokenwire.streams")

HEARTBEAT_S = 3.0  # how often this process says it is alive
ALIVE_MS = 10_000  # and for how long each time
CLAIM_MS = 60_000  # an Idempotency-Key claimed but never started frees itself after this
LIVE_MS = 24 * 3600 * 1000  # a live stream's keys, should its process die without cleaning up
TOMBSTONE_S = 3600.0  # a finished stream's metadata outlives its events this long (410, not 404)
CLAIM_ATTEMPTS = 3

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _unavailable(exc: RedisError) -> StreamStoreUnavailable:
    return StreamStoreUnavailable(f"The shared stream store is unavailable ({type(exc).__name__}).")


class RedisStreamStore:
    """Resumable streams shared by every gateway process on one Redis."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tokenwire:",
        retention_s: float = 300.0,
        grace_s: float = 30.0,
        max_finished: int = 10_000,
        max_events: int = 2_000_000,
        max_events_per_stream: int = 100_000,
        lease_refresh_s: float = 2.0,
    ) -> None:
        self._local = MemoryStreamStore(
            retention_s=retention_s,
            max_finished=max_finished,
            max_events=max_events,
            max_events_per_stream=max_events_per_stream,
        )
        self._redis: Redis = connect(
            url, wait_s=2.0, socket_connect_timeout=2.0, health_check_interval=30
        )
        self._prefix = f"{prefix}st:"
        self._retention_ms = int(retention_s * 1000)
        self._max_events_per_stream = max_events_per_stream
        self._policy = LeasePolicy(grace_s=grace_s, refresh_s=min(lease_refresh_s, grace_s / 3))
        self.process_id = secrets.token_hex(8)
        self._release = self._redis.register_script(_RELEASE)
        self._idem_key_of: dict[str, str] = {}  # stream id -> its Idempotency-Key's Redis key
        self._mirrors: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._requests: set[asyncio.Task[None]] = set()
        self._reading: set[RemoteStream] = set()  # reads of streams other processes own

    # -- names -------------------------------------------------------------------------------

    def _keys(self, stream_id: str) -> StreamKeys:
        return StreamKeys.of(self._prefix, stream_id)

    def _alive_key(self, process_id: str) -> str:
        return f"{self._prefix}proc:{process_id}"

    def _idem_key(self, key_id: str, idempotency_key: str) -> str:
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
        return f"{self._prefix}idem:{key_id}:{digest}"

    @property
    def _cancel_channel(self) -> str:
        return f"{self._prefix}cancel"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Say this process is alive and listen for cancel requests."""
        try:
            await self._redis.set(self._alive_key(self.process_id), b"1", px=ALIVE_MS)
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(self._cancel_channel)
        except RedisError as exc:
            raise _unavailable(exc) from None
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(self._heartbeat(), name="streams-heartbeat"),
            loop.create_task(self._listen(pubsub), name="streams-cancel-listener"),
        ]

    async def aclose(self) -> None:
        """Finish mirroring (the generations were settled before), then disconnect."""
        if self._mirrors:
            await asyncio.wait(self._mirrors, timeout=5.0)
        for task in [*self._mirrors, *self._background, *self._requests]:
            task.cancel()
        await asyncio.gather(
            *self._mirrors, *self._background, *self._requests, return_exceptions=True
        )
        with contextlib.suppress(RedisError):
            await self._redis.delete(self._alive_key(self.process_id))
        await self._redis.aclose()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._redis.set(self._alive_key(self.process_id), b"1", px=ALIVE_MS)
            except RedisError as exc:
                log.warning("cannot renew this process's liveness in Redis: %s", exc)

    async def _listen(self, pubsub: PubSub) -> None:
        backoff_s = 0.1
        while True:
            try:
                async for message in pubsub.listen():
                    backoff_s = 0.1
                    if message.get("type") == "message":
                        self._on_cancel(message["data"])
            except RedisError as exc:
                log.warning("cancel channel lost (%s); resubscribing", exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                with contextlib.suppress(RedisError):
                    await pubsub.subscribe(self._cancel_channel)

    def _on_cancel(self, data: bytes) -> None:
        stream_id, _, _cause = data.decode(errors="replace").partition(" ")
        generation = self._local.live(stream_id)
        if generation is not None:
            generation.cancel("client_cancelled")

    def _request_cancel(self, stream_id: str, cause: CancelCause) -> None:
        local = self._local.live(stream_id)
        if local is not None:
            local.cancel(cause)
            return
        message = f"{stream_id} {cause}".encode()
        task = asyncio.get_running_loop().create_task(self._publish(message))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _publish(self, message: bytes) -> None:
        try:
            await self._redis.publish(self._cancel_channel, message)
        except RedisError as exc:
            log.warning("cannot publish a cancel request: %s", exc)

    async def _owner_alive(self, process_id: str) -> bool:
        return bool(await self._redis.exists(self._alive_key(process_id)))

    # -- Idempotency-Key ---------------------------------------------------------------------

    async def claim(
        self, key_id: str, idempotency_key: str, digest: str, stream_id: str
    ) -> StreamSource | None:
        name = self._idem_key(key_id, idempotency_key)
        value = f"{digest} {stream_id}".encode()
        try:
            for _attempt in range(CLAIM_ATTEMPTS):
                if await self._redis.set(name, value, nx=True, px=CLAIM_MS):
                    self._idem_key_of[stream_id] = name
                    return None
                held = cast(bytes | None, await self._redis.get(name))
                if held is None:
                    continue  # it expired in between: claim again
                known_digest, _, known_id = held.decode().partition(" ")
                if known_digest != digest:
                    raise conflict()
                try:
                    return await self.get(known_id, key_id, 0)
                except NotFound:
                    raise in_progress(idempotency_key) from None
                except StreamGone:
                    await self._release(keys=[name], args=[held])
        except RedisError as exc:
            raise _unavailable(exc) from None
        raise in_progress(idempotency_key)

    async def release(self, key_id: str, idempotency_key: str, stream_id: str) -> None:
        name = self._idem_key_of.pop(stream_id, None)
        if name is None:
            return
        try:
            value = cast(bytes | None, await self._redis.get(name))
            if value is not None and value.endswith(b" " + stream_id.encode()):
                await self._release(keys=[name], args=[value])
        except RedisError as exc:
            log.warning("cannot release Idempotency-Key claim of %s: %s", stream_id, exc)

    # -- writing -----------------------------------------------------------------------------

    async def add(self, generation: Generation, idempotency_key: str | None) -> None:
        """Keep it locally, then share it; if Redis fails now, it stays resumable here only."""
        await self._local.add(generation, idempotency_key)
        keys = self._keys(generation.id)
        meta = {
            b"key_id": generation.key_id,
            b"model": generation.model,
            b"created": generation.created,
            b"include_usage": b"1" if generation.include_usage else b"0",
            b"owner": self.process_id,
            b"state": b"live",
        }
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(keys.meta, mapping=meta)  # type: ignore[arg-type]
                pipe.pexpire(keys.meta, LIVE_MS)
                idem = self._idem_key_of.get(generation.id)
                if idem is not None:
                    pipe.pexpire(idem, LIVE_MS)
                await pipe.execute()
        except RedisError as exc:
            log.warning("stream %s is resumable in this process only: %s", generation.id, exc)
            self._idem_key_of.pop(generation.id, None)
            return
        generation.extend_grace = partial(self._lease_left_s, keys.lease)
        task = asyncio.get_running_loop().create_task(
            self._mirror(generation, keys), name=f"mirror-{generation.id}"
        )
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    async def _lease_left_s(self, lease: str) -> float:
        left_ms = await self._redis.pttl(lease)
        return max(0, int(left_ms)) / 1000

    async def _mirror(self, generation: Generation, keys: StreamKeys) -> None:
        stream_log = generation.log
        seq = 0
        try:
            while True:
                await stream_log.wait_beyond(seq, None)
                batch = stream_log.read_after(seq)
                async with self._redis.pipeline(transaction=False) as pipe:
                    for event in batch:
                        seq += 1
                        pipe.xadd(
                            keys.events,
                            {b"e": encode_event(event)},
                            id=f"0-{seq}",
                            maxlen=self._max_events_per_stream,
                            approximate=True,
                        )
                    done = stream_log.closed and seq == stream_log.last_seq
                    if done:
                        self._finish(pipe, generation, keys, seq)
                    await pipe.execute()
                if done:
                    return
        except RedisError as exc:
            log.warning("mirroring stream %s to Redis failed: %s", generation.id, exc)
            with contextlib.suppress(RedisError):
                await self._redis.hset(keys.meta, b"state", b"lost")

    def _finish(self, pipe: Pipeline, generation: Generation, keys: StreamKeys, seq: int) -> None:
        last = generation.log.read_after(seq - 1)
        fields: dict[bytes, bytes | int] = {b"state": b"finished", b"last_seq": seq}
        if last:
            fields[b"last_event"] = encode_event(last[0])
        if generation.finish_reason is not None:
            fields[b"finish_reason"] = generation.finish_reason.encode()
        pipe.hset(keys.meta, mapping=fields)  # type: ignore[arg-type]
        pipe.pexpire(keys.events, self._retention_ms)
        pipe.pexpire(keys.meta, self._retention_ms + int(TOMBSTONE_S * 1000))
        idem = self._idem_key_of.pop(generation.id, None)
        if idem is not None:
            pipe.pexpire(idem, self._retention_ms)

    def finished(self, generation: Generation) -> None:
        self._local.finished(generation)

    # -- reading -----------------------------------------------------------------------------

    async def get(self, stream_id: str, key_id: str, after: int) -> StreamSource:
        check_cursor_sign(after)
        with contextlib.suppress(StreamGone, NotFound):
            return await self._local.get(stream_id, key_id, after)
        keys = self._keys(stream_id)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.meta)
                pipe.xrange(keys.events, count=1)
                meta, first = await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from None
        if not meta or meta.get(b"key_id", b"").decode() != key_id:
            raise NotFound(f"No stream {stream_id!r}.", param="stream_id", code="stream_not_found")
        if meta.get(b"state") == b"finished":
            last_seq = int(meta[b"last_seq"])
            if not first and last_seq > 0:
                raise StreamGone(
                    f"Stream {stream_id!r} has ended and is no longer kept (retention "
                    f"{self._retention_ms / 1000:g} s).",
                    param="stream_id",
                )
            if after > last_seq:
                raise cursor_past_end(stream_id, after, last_seq)
        if first and entry_seq(first[0][0]) > after + 1:
            raise StreamGone(
                f"Events after {after} of stream {stream_id!r} are no longer kept.",
                param="starting_after",
                code="cursor_out_of_range",
            )
        owner = meta.get(b"owner", b"").decode()
        return RemoteStream(
            self._redis,
            keys,
            stream_id=stream_id,
            meta=meta,
            policy=self._policy,
            owner_alive=partial(self._owner_alive, owner),
            request_cancel=self._request_cancel,
            reading=self._reading,
        )

    @property
    def remote_reads(self) -> int:
        return len(self._reading)

    def interrupt_remote_reads(self, error_for: Callable[[str], GatewayError]) -> int:
        for stream in list(self._reading):
            stream.interrupt(error_for(stream.id))
        return len(self._reading)

    def holds(self, generation: Generation) -> bool:
        return self._local.holds(generation)

    def readable_elsewhere_s(self, generation: Generation) -> float | None:
        # ``extend_grace`` is set exactly when ``add`` shared the stream in Redis (and not
        # when Redis failed then: such a stream is resumable in this process only).
        if not self.holds(generation) or generation.extend_grace is None:
            return None
        return self._retention_ms / 1000
