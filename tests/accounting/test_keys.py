"""API keys on SQLite and PostgreSQL: hashed at rest, authenticate, revoke."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tokenwire.accounting.keys import KeyRecord, KeyStore, load_server_secret
from tokenwire.errors import NotFound
from tokenwire.storage.engine import make_engine, migrate
from tokenwire.storage.tables import api_keys


async def test_key_lifecycle(database_url: str, tmp_path: Path) -> None:
    """A created key authenticates, is stored only as an HMAC, lists by prefix, and revokes."""
    engine = make_engine(database_url)
    try:
        await migrate(engine)
        await migrate(engine)  # idempotent
        store = KeyStore(engine, load_server_secret(tmp_path, env={}))
        record, plaintext = await store.create("alice")
        assert plaintext.startswith("tw-") and len(plaintext) > 40
        assert (await store.authenticate(plaintext)) == record
        assert await store.authenticate(plaintext + "x") is None
        assert await store.authenticate("not-a-key") is None
        async with engine.connect() as conn:
            stored = (await conn.execute(sa.select(api_keys))).mappings().all()
        assert plaintext not in repr(stored)
        assert stored[0]["secret_hash"] == store.digest(plaintext)
        assert [r.prefix for r in await store.list()] == [plaintext[:10]]
        revoked = await store.revoke(record.id)
        assert revoked.revoked_at is not None
        assert await store.authenticate(plaintext) is None
        try:
            await store.revoke("key_nope")
        except NotFound as exc:
            assert exc.http_status == 404
        else:
            raise AssertionError("revoking an unknown key must raise NotFound")
    finally:
        await engine.dispose()


async def test_other_server_secret_does_not_authenticate(tmp_path: Path) -> None:
    """A key made under one server secret does not authenticate under another."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await migrate(engine)
        _, plaintext = await KeyStore(engine, b"secret-one").create("bob")
        assert await KeyStore(engine, b"secret-two").authenticate(plaintext) is None
        assert await KeyStore(engine, b"secret-one").authenticate(plaintext) is not None
    finally:
        await engine.dispose()


def test_server_secret_file_is_private_and_stable(tmp_path: Path) -> None:
    """The secret file is created once with mode 0600; the env var takes precedence."""
    first = load_server_secret(tmp_path, env={})
    assert load_server_secret(tmp_path, env={}) == first
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert load_server_secret(tmp_path, env={"TOKENWIRE_SECRET": "s3"}) == b"s3"


@pytest.fixture
async def counted(tmp_path: Path) -> AsyncIterator[tuple[KeyStore, list[str]]]:
    """A key store with a 60 s cache, and the api_keys queries it sends (cleared by tests)."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    queries: list[str] = []

    @sa.event.listens_for(engine.sync_engine, "before_cursor_execute")
    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if "FROM api_keys" in statement:
            queries.append(statement)

    try:
        await migrate(engine)
        yield KeyStore(engine, b"s", cache_ttl_s=60), queries
    finally:
        await engine.dispose()


async def test_concurrent_lookups_share_one_query_and_revoke_clears_cache(
    counted: tuple[KeyStore, list[str]],
) -> None:
    """50 simultaneous authentications of one key cost one query; a local revoke takes effect at once."""
    store, queries = counted
    record, plaintext = await store.create("burst")
    queries.clear()
    results = await asyncio.gather(*(store.authenticate(plaintext) for _ in range(50)))
    assert results == [record] * 50
    assert len(queries) == 1
    assert await store.authenticate(plaintext) == record
    assert len(queries) == 1  # served from the cache
    await store.revoke(record.id)
    assert await store.authenticate(plaintext) is None


async def test_rechecking_a_key_by_id_is_cached_and_single_flight(
    counted: tuple[KeyStore, list[str]],
) -> None:
    """1,000 WebSocket requests re-checking one key at once cost one query (the 1,000-socket
    bench regressed when each cache miss read the database); a local revoke counts at once."""
    store, queries = counted
    record, _ = await store.create("socket")
    queries.clear()
    results = await asyncio.gather(*(store.current(record) for _ in range(1000)))
    assert results == [record] * 1000
    assert len(queries) == 1
    assert await store.current(record) == record and len(queries) == 1
    await store.revoke(record.id)
    assert await store.current(record) is None


@pytest.mark.parametrize("change", ["revoke", "rotate", "expire"])
async def test_a_lookup_begun_before_a_change_does_not_outlive_it(
    change: str, tmp_path: Path
) -> None:
    """A lookup that read the row before a revoke, rotation or expiry neither serves nor caches the old record after it."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await migrate(engine)
        store = KeyStore(engine, b"s", cache_ttl_s=60)
        record, plaintext = await store.create("raced")
        read, release = asyncio.Event(), asyncio.Event()
        lookup = store._lookup

        async def slow_lookup(digest: str) -> KeyRecord | None:
            found = await lookup(digest)  # the row as it was before the change
            read.set()
            await release.wait()
            return found

        store._lookup = slow_lookup  # type: ignore[method-assign]
        first = asyncio.create_task(store.authenticate(plaintext))
        await read.wait()
        if change == "revoke":
            await store.revoke(record.id)
        elif change == "rotate":
            await store.rotate(record.id)
        else:
            await store.update(record.id, expires_at=int(time.time()) - 1)
        store._lookup = lookup  # type: ignore[method-assign]
        after = asyncio.create_task(store.authenticate(plaintext))  # begun after the change
        release.set()
        await first
        assert await after is None
        assert await store.authenticate(plaintext) is None
    finally:
        await engine.dispose()


async def test_a_change_by_another_process_takes_effect_within_the_ttl(tmp_path: Path) -> None:
    """A key revoked through another KeyStore (as the CLI does) is refused once cache_ttl_s has passed."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    now = [1000.0]
    try:
        await migrate(engine)
        gateway = KeyStore(engine, b"s", cache_ttl_s=5, clock=lambda: now[0])
        cli = KeyStore(engine, b"s")
        record, plaintext = await cli.create("elsewhere")
        assert await gateway.authenticate(plaintext) == record  # cached until 1005
        await cli.revoke(record.id)
        now[0] = 1002.0  # before refresh-ahead (the last half of the TTL) begins
        assert await gateway.authenticate(plaintext) is not None  # the documented delay
        now[0] = 1005.0
        assert await gateway.authenticate(plaintext) is None
    finally:
        await engine.dispose()
