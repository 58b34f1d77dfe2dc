"""The Redis stream store, with two stores on one real Redis standing for two gateway processes.

``owner`` generates; ``other`` finds the stream through Redis and reads it as a RemoteStream:
replay plus live tail, leases that hold the owner's grace window open, cancel over pub/sub,
Idempotency-Key claims, 404/410 rules, and a reader told when the owner process is gone.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from tokenwire.app import make_stream_store
from tokenwire.config import load_settings
from tokenwire.errors import (
    IdempotencyConflict,
    IdempotencyInProgress,
    InvalidRequest,
    NotFound,
    RecordedError,
    ServerShuttingDown,
    StreamGone,
    UpstreamError,
)
from tokenwire.streams.codec import CorruptEvent, decode_event, encode_event
from tokenwire.streams.events import (
    Event,
    Finish,
    StreamError,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from tokenwire.streams.generation import Generation, GenerationState
from tokenwire.streams.redis_store import RedisStreamStore
from tokenwire.streams.remote import RemoteStream
from tokenwire.streams.source import StreamSource

REDIS_URL = "redis://127.0.0.1:6379/0"
KEY = "key_owner"


async def wait_until(check: Callable[[], bool], deadline_s: float = 5.0) -> bool:
    end = time.monotonic() + deadline_s
    while not check() and time.monotonic() < end:  # noqa: ASYNC110 - state set by timers
        await asyncio.sleep(0.01)  # polling state that changes on timers
    return check()


async def tokens(
    count: int, gate: asyncio.Event | None = None, at: int = -1
) -> AsyncIterator[Event]:
    for i in range(count):
        if gate is not None and i == at:
            await gate.wait()
        yield TextDelta(f"t{i} ")
    yield Usage(5, count)
    yield Finish("stop")


def generation(events: AsyncIterator[Event], *, grace_s: float = 0.0) -> Generation:
    async def settle(_generation: Generation) -> None:
        return None

    return Generation(
        completion_id="chatcmpl-" + secrets.token_hex(8),
        model="sim",
        events=events,
        prompt_tokens_estimate=5,
        disconnect_grace_s=grace_s,
        on_settle=settle,
        key_id=KEY,
        include_usage=True,
    )


async def started(
    store: RedisStreamStore, events: AsyncIterator[Event], *, grace_s: float = 0.0
) -> Generation:
    """A resumable generation kept by ``store`` (its owner), running."""
    gen = generation(events, grace_s=grace_s)
    await store.add(gen, None)
    gen.start()
    return gen


@pytest.fixture
async def stores() -> AsyncIterator[tuple[RedisStreamStore, RedisStreamStore, str]]:
    """Two stores ("processes") on one Redis prefix; their keys are removed afterwards."""
    prefix = f"tokenwire-test-{secrets.token_hex(6)}:"
    made = [
        RedisStreamStore(REDIS_URL, prefix=prefix, grace_s=1.0, retention_s=60, lease_refresh_s=0.1)
        for _ in range(2)
    ]
    for store in made:
        await store.start()
    try:
        yield made[0], made[1], prefix
    finally:
        for store in made:
            await store.aclose()
        client = aioredis.Redis.from_url(REDIS_URL)
        stale = [k async for k in client.scan_iter(match=prefix + "*")]
        if stale:
            await client.delete(*stale)
        await client.aclose()


async def read_all(source: StreamSource, after: int = 0) -> list[Event]:
    out: list[Event] = []
    async for batch in source.read(after=after):
        out.extend(batch or ())
    return out


async def finished_in_redis(owner: RedisStreamStore, gen: Generation) -> None:
    """Wait for the owner's mirror to have written the end of the stream."""
    await gen.wait_settled()
    owner.finished(gen)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = owner._keys(gen.id)

        async def state() -> bytes | None:
            return await client.hget(keys.meta, "state")  # type: ignore[no-any-return]

        end = time.monotonic() + 5
        while await state() != b"finished" and time.monotonic() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # polling Redis for the mirror task's last write
        assert await state() == b"finished"
    finally:
        await client.aclose()


def test_codec_round_trips_every_logged_event() -> None:
    """Every event kind survives encode/decode (a usage with its cost too); an error keeps status, type, code, message, param and any further fields."""
    for event in [
        TextDelta("héllo"),
        ToolCallDelta(1, "call_1", "get_weather", '{"city": "Oslo"}'),
        ToolCallDelta(0, None, None, "x"),
        Finish("length"),
        Usage(3, 4, estimated=True),
        Usage(3, 4, charge_micro=78),
        Usage(300, 4, cache_write_tokens=100, cache_read_tokens=150),
        Usage(300, 4, cache_read_tokens=150, charge_micro=0),
    ]:
        assert decode_event(encode_event(event)) == event
    error = UpstreamError("upstream broke", code="upstream_error", param="model")
    decoded = decode_event(encode_event(StreamError(error)))
    assert isinstance(decoded, StreamError) and isinstance(decoded.error, RecordedError)
    assert decoded.error.http_status == 502
    assert decoded.error.to_body() == error.to_body()
    shutdown = ServerShuttingDown("ended by a drain", stream_id="chatcmpl-x", resumable=True)
    decoded = decode_event(encode_event(StreamError(shutdown)))  # fields beyond OpenAI's four
    assert isinstance(decoded, StreamError) and decoded.error.http_status == 503
    assert decoded.error.to_body() == shutdown.to_body()
    assert decoded.error.to_body()["error"]["stream_id"] == "chatcmpl-x"
    with pytest.raises(CorruptEvent):
        decode_event(b'["zz"]')
    with pytest.raises(CorruptEvent):
        decode_event(b"not json")


async def test_another_process_replays_and_follows_a_live_stream(
    stores: tuple[RedisStreamStore, RedisStreamStore, str],
) -> None:
    """A stream paused mid-way on the owner is read from event 3 by the other store: replay, then the live tail, exactly."""
    owner, other, _ = stores
    gate = asyncio.Event()
    gen = await started(owner, tokens(10, gate, at=5), grace_s=5)
    assert await wait_until(lambda: gen.log.last_seq == 5)
    remote = await other.get(gen.id, KEY, 3)
    assert isinstance(remote, RemoteStream)
    assert (remote.model, remote.include_usage) == ("sim", True)
    reader = asyncio.create_task(read_all(remote, after=3))
    gate.set()
    events = await asyncio.wait_for(reader, 10)
    local = gen.log.read_after(3)
    assert events == local
    assert events[-2:] == [Finish("stop"), Usage(5, 10)]
    assert remote.finish_reason == "stop" and remote.usage == Usage(5, 10)
    await finished_in_redis(owner, gen)


async def test_finished_stream_rules_404_410_and_cursor(
    stores: tuple[RedisStreamStore, RedisStreamStore, str],
) -> None:
    """After the end: another key gets 404, an unknown id 404, a cursor past the end 410, a negative one 400; at the end exactly, nothing more is read."""
    owner, other, _ = stores
    gen = await started(owner, tokens(4))
    await finished_in_redis(owner, gen)
    last = gen.log.last_seq
    with pytest.raises(NotFound):
        await other.get(gen.id, "key_someone_else", 0)
    with pytest.raises(NotFound):
        await other.get("chatcmpl-nope", KEY, 0)
    with pytest.raises(StreamGone) as gone:
        await other.get(gen.id, KEY, last + 1)
    assert gone.value.code == "cursor_out_of_range"
    with pytest.raises(InvalidRequest):
        await other.get(gen.id, KEY, -1)
    at_end = await other.get(gen.id, KEY, last)
    assert await read_all(at_end, after=last) == []
    assert at_end.finish_reason == "stop"
    replay = await other.get(gen.id, KEY, 0)
    assert await read_all(replay) == gen.log.read_after(0)


async def test_after_retention_the_stream_is_gone_not_unknown(
    stores: tuple[RedisStreamStore, RedisStreamStore, str],
) -> None:
    """Once its events expired, a resume gets 410 stream_expired (the metadata outlives them)."""
    owner, other, _ = stores
    gen = await started(owner, tokens(3))
    await finished_in_redis(owner, gen)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.delete(owner._keys(gen.id).events)  # what expiry does after retention_s
    finally:
        await client.aclose()
    with pytest.raises(StreamGone) as gone:
        await other.get(gen.id, KEY, 0)
    assert gone.value.code == "stream_expired"


async def test_a_remote_reader_holds_the_grace_window_open_and_its_leaving_ends_it(
    stores: tuple[RedisStreamStore, RedisStreamStore, str],
) -> None:
    """No local reader and a 1 s grace window: while the other process reads, the owner keeps generating; after it leaves, the owner cancels."""
    owner, other, _ = stores
    gate = asyncio.Event()
    gen = await started(owner, tokens(10, gate, at=2), grace_s=1.0)
    local = gen.read()
    assert await anext(local)  # a local reader attaches, then leaves: the grace window starts
    await local.aclose()
    remote = await other.get(gen.id, KEY, 0)
    remote_reader = remote.read()
    assert await anext(remote_reader)
    since = time.monotonic()
    # well past the grace window, the generation still runs because the lease is renewed
    assert not await wait_until(lambda: gen.finished, deadline_s=2.5)
    assert time.monotonic() - since >= 2.4
    await remote_reader.aclose()  # the remote reader leaves: one more grace window, then cancel
    assert await wait_until(lambda: gen.finished, deadline_s=5.0)
    assert gen.state is GenerationState.CANCELLED
    assert gen.cancel_cause == "client_disconnected"


async def test_cancel_from_another_process_reaches_the_owner(
    stores: tuple[RedisStreamStore, RedisStreamStore, str],
) -> None:
    """RemoteStream.cancel publishes on the cancel channel; the owner's generation ends cancelled."""
    owner, other, _ = stores
    gate = asyncio.Event()
    gen = await started(owner, tokens(10, gate, at=2), grace_s=5)
    remote = await other.get(gen.id, KEY, 0)
    remote.cancel("client_cancelled")
    assert await wait_until(lambda: gen.finished)
    assert gen.state is GenerationState.CANCELLED
    assert gen.cancel_cause == "client_cancelled"


async def test_idempotency_key_claims_across_processes(
    stores: tuple[RedisStreamStore, RedisStreamStore, str],
) -> None:
    """One claim wins; while it is being admitted the other gets 409 in_use, then the same stream; another body gets 409 reused; a released claim is free again."""
    owner, other, _ = stores
    gen = generation(tokens(3))
    assert await owner.claim(KEY, "idem-1", "digest-a", gen.id) is None
    with pytest.raises(IdempotencyInProgress):
        await other.claim(KEY, "idem-1", "digest-a", "chatcmpl-second")
    await owner.add(gen, "idem-1")
    gen.start()
    again = await other.claim(KEY, "idem-1", "digest-a", "chatcmpl-second")
    assert again is not None and again.id == gen.id
    with pytest.raises(IdempotencyConflict):
        await other.claim(KEY, "idem-1", "digest-b", "chatcmpl-third")
    assert await other.claim("key_other", "idem-1", "digest-a", "chatcmpl-x") is None  # per key
    assert await owner.claim(KEY, "idem-2", "d", "chatcmpl-refused") is None
    await owner.release(KEY, "idem-2", "chatcmpl-refused")  # e.g. it got a 429
    assert await other.claim(KEY, "idem-2", "d", "chatcmpl-retry") is None
    await finished_in_redis(owner, gen)


async def test_a_reader_of_a_stream_whose_process_died_ends_with_an_error(
    stores: tuple[RedisStreamStore, RedisStreamStore, str],
) -> None:
    """Metadata of a live stream whose owner's liveness key is gone: the reader ends with 502 stream_owner_lost, not a hang."""
    owner, other, _ = stores
    client = aioredis.Redis.from_url(REDIS_URL)
    stream_id = "chatcmpl-orphan"
    keys = owner._keys(stream_id)
    try:
        await client.hset(
            keys.meta,
            mapping={
                "key_id": KEY,
                "model": "sim",
                "created": 1,
                "include_usage": "0",
                "owner": "dead-process",
                "state": "live",
            },
        )
        await client.xadd(keys.events, {"e": encode_event(TextDelta("a"))}, id="0-1")
    finally:
        await client.aclose()
    remote = await other.get(stream_id, KEY, 0)
    events = await asyncio.wait_for(read_all(remote), 5)
    assert events[0] == TextDelta("a")
    last = events[-1]
    assert isinstance(last, StreamError) and last.error.code == "stream_owner_lost"


async def test_stream_backend_is_chosen_by_config() -> None:
    """TOKENWIRE_REDIS_URL selects Redis for both rate limits and resumable streams."""
    settings = load_settings(env={"TOKENWIRE_REDIS_URL": REDIS_URL})
    store = make_stream_store(settings)
    try:
        assert isinstance(store, RedisStreamStore)
        assert settings.limits.backend == "redis"
    finally:
        await store.aclose()
