"""Transactions run whole: one hop to a thread on a SQLite file, the async engine otherwise."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenwire.storage.engine import SQLITE_BUSY_TIMEOUT_S, make_engine, sqlite_thread_engine
from tokenwire.storage.transactions import Transactions

notes = sa.Table("notes", sa.MetaData(), sa.Column("text", sa.String, primary_key=True))


def add_note(conn: sa.Connection, text: str) -> int:
    """Insert a note; the thread it ran in."""
    conn.execute(notes.insert().values(text=text))
    return threading.get_ident()


async def texts(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.select(notes.c.text).order_by(notes.c.text))).scalars())


@pytest.fixture
async def sqlite_file(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An async engine on a SQLite file with the ``notes`` table."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    async with engine.begin() as conn:
        await conn.run_sync(notes.metadata.create_all)
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_a_sqlite_file_is_written_in_one_hop_on_its_own_connection(
    sqlite_file: AsyncEngine,
) -> None:
    """On a SQLite file the whole transaction runs in a worker thread, on a connection of the
    thread's engine (the async engine opens no transaction for it), and commits."""
    began: list[object] = []
    sa.event.listen(sqlite_file.sync_engine, "begin", began.append)
    transactions = Transactions(sqlite_file)
    thread = await transactions.run(add_note, "one")
    assert thread != threading.get_ident()
    assert began == []
    assert transactions.threaded is not None and transactions.checked_out() == 0
    assert await texts(sqlite_file) == ["one"]


async def test_the_thread_connection_has_the_async_engines_pragmas(
    sqlite_file: AsyncEngine,
) -> None:
    """The thread's connections run in WAL mode, synchronous=NORMAL, with foreign keys and the
    same busy timeout as the async engine's."""
    threaded = Transactions(sqlite_file).threaded
    assert threaded is not None
    with threaded.connect() as conn:
        pragma = {
            name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }
    assert pragma == {
        "journal_mode": "wal",
        "synchronous": 1,
        "foreign_keys": 1,
        "busy_timeout": int(SQLITE_BUSY_TIMEOUT_S * 1000),
    }


async def test_a_transaction_that_raises_writes_nothing(sqlite_file: AsyncEngine) -> None:
    """An exception inside the function rolls its statements back and reaches the caller;
    the connection goes back to the pool."""

    def half(conn: sa.Connection) -> None:
        add_note(conn, "half")
        raise LookupError("stop")

    transactions = Transactions(sqlite_file)
    with pytest.raises(LookupError):
        await transactions.run(half)
    assert await texts(sqlite_file) == []
    assert transactions.checked_out() == 0


async def test_a_cancelled_caller_leaves_the_transaction_to_end(sqlite_file: AsyncEngine) -> None:
    """A caller cancelled while the thread works gets CancelledError; the transaction still
    commits and its connection is checked back in."""
    transactions = Transactions(sqlite_file)
    threaded = transactions.threaded
    assert threaded is not None
    started, go_on, checked_in = threading.Event(), threading.Event(), threading.Event()
    sa.event.listen(threaded.pool, "checkin", lambda *_: checked_in.set())

    def slow(conn: sa.Connection) -> None:
        started.set()
        go_on.wait(10)
        add_note(conn, "late")

    running = asyncio.ensure_future(transactions.run(slow))
    assert await asyncio.to_thread(started.wait, 10)
    running.cancel()
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert await asyncio.to_thread(checked_in.wait, 10)
    assert transactions.checked_out() == 0
    assert await texts(sqlite_file) == ["late"]


async def test_the_thread_engine_is_disposed_with_the_async_engine(
    sqlite_file: AsyncEngine,
) -> None:
    """Disposing the async engine closes the thread engine's pooled connections too."""
    threaded = sqlite_thread_engine(sqlite_file)
    assert threaded is not None
    with threaded.connect():
        pass
    assert threaded.pool.checkedin() == 1  # type: ignore[attr-defined]
    await sqlite_file.dispose()
    assert threaded.pool.checkedin() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_postgresql_runs_the_function_on_the_async_engine(database_url: str) -> None:
    """On PostgreSQL there is no thread engine: the same function runs on the async engine's
    connection (SQLAlchemy's greenlet bridge), in the event loop's thread, and commits."""
    await _on_the_async_engine(database_url)


async def test_an_in_memory_sqlite_database_runs_on_the_async_engine() -> None:
    """An in-memory SQLite database (another connection would open another database) has no
    thread engine either: the function runs on the async engine's connection."""
    await _on_the_async_engine("sqlite+aiosqlite:///:memory:")


async def _on_the_async_engine(url: str) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(notes.metadata.create_all)
        transactions = Transactions(engine)
        assert transactions.threaded is None
        assert await transactions.run(add_note, "async") == threading.get_ident()
        assert await texts(engine) == ["async"]
        assert transactions.checked_out() == 0
    finally:
        await engine.dispose()
