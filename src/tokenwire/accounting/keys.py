"""API keys: created once, shown once, stored as a keyed HMAC-SHA256 of the secret.

A key looks like ``tw-<43 url-safe characters>``. The database keeps its id, a short prefix for
listings (``tw-AbC1dE…``) and ``HMAC-SHA256(server_secret, key)``; the plaintext is never stored
or logged. Lookup is by the digest (an index hit, so the time taken does not depend on how
much of a guessed key is right).

The server secret comes from ``TOKENWIRE_SECRET`` or, failing that, a file ``secret`` in the
data dir, created with mode 0600 on first use. Several gateway processes sharing one database
must share the secret.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokenwire.accounting.currency import usd_credit
from tokenwire.errors import NotFound
from tokenwire.storage.engine import database_errors
from tokenwire.storage.tables import api_keys, credit_events

KEY_PREFIX = "tw-"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A stored key, without its secret."""

    id: str
    name: str
    prefix: str
    is_admin: bool
    created_at: int
    expires_at: int | None
    revoked_at: int | None
    allowed_models: tuple[str, ...] | None = None  # None: every model
    rpm: int | None = None  # None: unlimited
    tpm: int | None = None
    max_concurrent_streams: int | None = None
    balance_micro: int = 0  # as read with the record; the database holds the live figure
    plan: str | None = None  # the price list it is charged by; None: the default plan

    def may_use(self, model: str) -> bool:
        """Whether this key may call ``model``."""
        return self.allowed_models is None or model in self.allowed_models

    def is_active(self, now: float) -> bool:
        """Not revoked and not expired at ``now`` (Unix seconds)."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at


def load_server_secret(data_dir: Path, env: dict[str, str] | None = None) -> bytes:
    """The HMAC key: ``$TOKENWIRE_SECRET`` or the data dir's ``secret`` file (made if absent)."""
    environ = os.environ if env is None else env
    if environ.get("TOKENWIRE_SECRET"):
        return environ["TOKENWIRE_SECRET"].encode()
    path = data_dir / "secret"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as handle:
        handle.write(value)
    return value


def _row_to_record(row: sa.Row[tuple[object, ...]]) -> KeyRecord:
    m = row._mapping
    models = m["allowed_models"]
    return KeyRecord(
        id=str(m["id"]),
        name=str(m["name"]),
        prefix=str(m["prefix"]),
        is_admin=bool(m["is_admin"]),
        created_at=int(m["created_at"]),
        expires_at=None if m["expires_at"] is None else int(m["expires_at"]),
        revoked_at=None if m["revoked_at"] is None else int(m["revoked_at"]),
        allowed_models=None if models is None else tuple(json.loads(str(models))),
        rpm=None if m["rpm"] is None else int(m["rpm"]),
        tpm=None if m["tpm"] is None else int(m["tpm"]),
        max_concurrent_streams=(
            None if m["max_concurrent_streams"] is None else int(m["max_concurrent_streams"])
        ),
        balance_micro=int(m["balance_micro"]),
        plan=None if m["plan"] is None else str(m["plan"]),
    )


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """The settable limits of a key; a field left as ``UNSET`` is not changed by an update."""

    allowed_models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent_streams: int | None = None

    def columns(self) -> dict[str, object]:
        return {
            "allowed_models": (
                None if self.allowed_models is None else json.dumps(list(self.allowed_models))
            ),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_concurrent_streams": self.max_concurrent_streams,
        }


class KeyOptions(TypedDict, total=False):
    """What a new key may be given besides its name (:meth:`KeyStore.insert`)."""

    is_admin: bool
    expires_at: int | None
    limits: KeyLimits | None
    grant_micro: int
    plan: str | None
    grant_note: str


Lookup = Callable[[str], Awaitable["KeyRecord | None"]]


class _RecordCache:
    """Key records by one lookup name (a digest, an id), cached ``ttl_s``, single-flight.

    Concurrent lookups of one name share a single query; an entry in its second half-life is
    refreshed in the background, so a key in steady use never waits for the database. A key
    forgotten (changed here) is dropped, and a lookup already under way neither fills the
    cache nor answers later requests. Records not found are not cached.
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._changes = 0  # bumped by forget(): a lookup begun before a change is not cached
        self._entries: dict[str, tuple[KeyRecord, float]] = {}
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    async def get(self, name: str, lookup: Lookup) -> KeyRecord | None:
        now = self._clock()
        cached = self._entries.get(name)
        if cached is not None and cached[1] > now:
            if cached[1] - now < self._ttl_s / 2 and name not in self._refreshing:
                self._refreshing[name] = asyncio.get_running_loop().create_task(
                    self._refresh(name, lookup)
                )
            return cached[0]
        inflight = self._inflight.get(name)
        if inflight is not None:
            return await asyncio.shield(inflight)
        changes = self._changes
        future: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._inflight[name] = future
        try:
            record = await lookup(name)
            future.set_result(record)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            if self._inflight.get(name) is future:
                del self._inflight[name]
        self._store(name, record, changes, now)
        return record

    def _store(self, name: str, record: KeyRecord | None, changes: int, now: float) -> None:
        if record is None or self._ttl_s <= 0 or changes != self._changes:
            return
        if len(self._entries) > 100_000:
            self._entries.clear()
        self._entries[name] = (record, now + self._ttl_s)

    async def _refresh(self, name: str, lookup: Lookup) -> None:
        try:
            await asyncio.sleep(0.005)  # after the request that noticed the age is admitted
            changes = self._changes
            record = await lookup(name)
        except Exception:  # noqa: BLE001 - the entry expires as usual; a request looks it up
            return
        finally:
            del self._refreshing[name]
        if record is None:
            self._entries.pop(name, None)
        elif name in self._entries:  # not forgotten meanwhile
            self._store(name, record, changes, self._clock())

    def forget(self, key_id: str) -> None:
        """Drop every entry of key ``key_id``; lookups under way are not cached."""
        self._changes += 1
        self._inflight.clear()
        self._entries = {n: e for n, e in self._entries.items() if e[0].id != key_id}


class KeyStore:
    """Create, list, revoke and authenticate API keys.

    Successful lookups are cached for ``cache_ttl_s`` (by digest, never by plaintext), and
    concurrent lookups of one key share a single database query: a burst of 200 requests
    with one key costs one query, not 200. A key revoked, rotated or changed through this
    store is refused (or served as changed) from the next request on: its cache entry is
    dropped, and a lookup already under way neither fills the cache nor answers later
    requests. One changed by another process (``tokenwire keys …``, another gateway) is
    noticed within ``cache_ttl_s``. ``clock`` is the monotonic clock of the cache (tests).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        server_secret: bytes,
        cache_ttl_s: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._secret = server_secret
        self._ttl_s = cache_ttl_s
        self._clock = clock
        self._by_digest = _RecordCache(cache_ttl_s, clock)  # authenticate()
        self._by_id = _RecordCache(cache_ttl_s, clock)  # current()

    def digest(self, plaintext: str) -> str:
        """The stored form of a key."""
        return hmac.digest(self._secret, plaintext.encode(), "sha256").hex()

    async def create(self, name: str, **options: Unpack[KeyOptions]) -> tuple[KeyRecord, str]:
        """Make a key (see :meth:`insert`); returns its record and the plaintext."""
        async with self._engine.begin() as conn:
            key_id, plaintext = await self.insert(conn, name, **options)
        record = await self.get(key_id)
        assert record is not None
        return record, plaintext

    async def insert(
        self,
        conn: AsyncConnection,
        name: str,
        *,
        is_admin: bool = False,
        expires_at: int | None = None,
        limits: KeyLimits | None = None,
        grant_micro: int = 0,
        plan: str | None = None,
        grant_note: str = "free grant for a new key",
    ) -> tuple[str, str]:
        """Insert a key with ``grant_micro`` of credit (a ``grant`` credit event) in the
        caller's transaction; returns its id and its plaintext."""
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        limits = limits or KeyLimits()
        key_id = "key_" + secrets.token_hex(8)
        now = int(time.time())
        await conn.execute(
            api_keys.insert().values(
                id=key_id,
                name=name,
                prefix=plaintext[:10],
                secret_hash=self.digest(plaintext),
                is_admin=is_admin,
                created_at=now,
                expires_at=expires_at,
                revoked_at=None,
                balance_micro=grant_micro,
                plan=plan,
                **limits.columns(),
            )
        )
        if grant_micro:
            await conn.execute(
                credit_events.insert().values(
                    key_id=key_id,
                    kind="grant",
                    amount_micro=grant_micro,
                    payment_id=None,
                    note=grant_note,
                    created_at=now,
                    **usd_credit(grant_micro),
                )
            )
        return key_id, plaintext

    async def update(self, key_id: str, **changes: object) -> KeyRecord:
        """Change a key's name, limits, models, expiry or plan; raises ``NotFound``."""
        allowed = {
            "name",
            "expires_at",
            "allowed_models",
            "rpm",
            "tpm",
            "max_concurrent_streams",
            "plan",
        }
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        values = dict(changes)
        if "allowed_models" in values and values["allowed_models"] is not None:
            values["allowed_models"] = json.dumps(list(values["allowed_models"]))  # type: ignore[call-overload]
        async with self._engine.begin() as conn:
            result = await conn.execute(
                api_keys.update().where(api_keys.c.id == key_id).values(**values)
            )
        if result.rowcount == 0:
            raise NotFound(f"No API key with id {key_id!r}.", param="id")
        self.forget(key_id)
        record = await self.get(key_id)
        assert record is not None
        return record

    async def rotate(self, key_id: str) -> tuple[KeyRecord, str]:
        """Give a key a new secret (the old one stops working at once); same id, limits, balance."""
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        async with self._engine.begin() as conn:
            result = await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(secret_hash=self.digest(plaintext), prefix=plaintext[:10])
            )
        if result.rowcount == 0:
            raise NotFound(f"No active API key with id {key_id!r}.", param="id")
        self.forget(key_id)
        record = await self.get(key_id)
        assert record is not None
        return record, plaintext

    async def list(self) -> list[KeyRecord]:
        """Every key, oldest first."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at))
            return [_row_to_record(row) for row in rows]

    async def count(self) -> int:
        """How many keys exist (revoked ones included)."""
        async with self._engine.connect() as conn:
            value = await conn.scalar(sa.select(sa.func.count()).select_from(api_keys))
            return int(value or 0)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key by id; raises ``NotFound`` for an unknown id."""
        async with self._engine.begin() as conn:
            await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=int(time.time()))
            )
            row = (await conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id))).first()
        if row is None:
            raise NotFound(f"No API key with id {key_id!r}.", param="id")
        self.forget(key_id)
        return _row_to_record(row)

    async def current(self, record: KeyRecord) -> KeyRecord | None:
        """``record`` as it stands now, if still active (a revoked, expired or deleted key:
        None): for a WebSocket authenticated earlier, before each request. Cached by id as
        :meth:`authenticate` caches by digest, so a change here counts at once, another
        process's within the cache TTL."""
        fresh = await self._by_id.get(record.id, self.get)
        if fresh is None or not fresh.is_active(time.time()):
            return None
        return fresh

    async def get(self, key_id: str) -> KeyRecord | None:
        """The key with this id (active or not), or None."""
        with database_errors("checking the API key"):
            async with self._engine.connect() as conn:
                row = (
                    await conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id))
                ).first()
        return None if row is None else _row_to_record(row)

    async def authenticate(self, plaintext: str) -> KeyRecord | None:
        """The active key with this secret, or None."""
        if not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 200:
            return None
        record = await self._by_digest.get(self.digest(plaintext), self._lookup)
        if record is None or not record.is_active(time.time()):
            return None
        return record

    async def _lookup(self, digest: str) -> KeyRecord | None:
        with database_errors("checking the API key"):
            async with self._engine.connect() as conn:
                row = (
                    await conn.execute(sa.select(api_keys).where(api_keys.c.secret_hash == digest))
                ).first()
        return None if row is None else _row_to_record(row)

    def forget(self, key_id: str) -> None:
        """Drop a key from the cache (after it was revoked or changed here).

        Lookups under way may have read the row before the change: they are not cached, and
        requests from now on start their own instead of waiting for them.
        """
        self._by_digest.forget(key_id)
        self._by_id.forget(key_id)
