"""Database engines and migrations: SQLite (embedded, default) or PostgreSQL by URL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from tokenwire.errors import DatabaseUnavailable

MIGRATIONS = Path(__file__).parent / "migrations"
CONNECT_TIMEOUT_S = 5.0  # a database that does not answer fails a request in bounded time
STATEMENT_TIMEOUT_S = 15.0
DATABASE_ERRORS = (sa.exc.DBAPIError, sa.exc.TimeoutError, OSError)
"""What a database outage looks like from here (connection refused, reset, timed out, a
statement the server refused), translated by :func:`database_errors`."""


@contextlib.contextmanager
def database_errors(what: str) -> Iterator[None]:
    """Turn a database failure inside the block into :class:`DatabaseUnavailable` (503)."""
    try:
        yield
    except DATABASE_ERRORS as exc:
        raise DatabaseUnavailable(
            f"The database is unavailable, so {what} is not possible right now; retry shortly."
        ) from exc


def insert_ignoring_duplicates(conn: AsyncConnection | sa.Connection, table: sa.Table) -> Any:
    """``INSERT … ON CONFLICT DO NOTHING`` into ``table``, on either database."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite connection waits for another's write lock before it gives up."""


def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:
    """Every SQLite connection, async or not: WAL, ``synchronous=NORMAL``, foreign keys."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> AsyncEngine:
    """An async engine for ``url``; SQLite gets WAL mode and a busy timeout."""
    if url.startswith("sqlite"):
        database = sa.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url,
        pool_size=10,
        max_overflow=20,
        pool_pre_ping=True,
        pool_timeout=CONNECT_TIMEOUT_S,
        connect_args={"timeout": CONNECT_TIMEOUT_S, "command_timeout": STATEMENT_TIMEOUT_S},
    )


def sqlite_thread_engine(engine: AsyncEngine) -> sa.Engine | None:
    """A synchronous engine (the standard library's ``sqlite3``) on ``engine``'s SQLite file,
    for transactions run whole in one hop to a thread (:mod:`tokenwire.storage.transactions`).

    Its connections get the same pragmas and busy timeout as ``engine``'s, and it is disposed
    when ``engine`` is. None for PostgreSQL, and for an in-memory SQLite database (another
    connection would open another database).
    """
    url = engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    threaded = sa.create_engine(
        url.set(drivername="sqlite"), connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}
    )
    sa.event.listen(threaded, "connect", _sqlite_pragmas)

    def _dispose(_engine: sa.Engine) -> None:
        threaded.dispose()

    sa.event.listen(engine.sync_engine, "engine_disposed", _dispose)
    return threaded


def _upgrade(connection: sa.Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema up to the newest migration (idempotent)."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)
