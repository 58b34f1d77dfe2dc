"""One transaction, written once as a synchronous function, run in one hop where it can be.

Through aiosqlite every statement is several round trips to the connection's thread (a queue,
a wake-up, the GIL handed over, a future, ``call_soon_threadsafe``): a ledger batch of a
``SELECT``, an ``INSERT``, a ``DELETE``, an ``UPDATE`` and the commit is about ten, and under
load each costs more CPU than the SQLite work itself. :class:`Transactions` runs a whole
transaction instead:

* on a SQLite file, in **one** hop to a worker thread (``asyncio.to_thread``), on a
  synchronous connection to the same file (:func:`~tokenwire.storage.engine.sqlite_thread_engine`:
  the same pragmas and busy timeout as the async engine's; disposed with it);
* on PostgreSQL (asyncpg), and on an in-memory SQLite database, on the async engine with
  ``AsyncConnection.run_sync``: SQLAlchemy's greenlet bridge, each statement awaited as before.

Either way the function gets a ``sqlalchemy.Connection`` inside ``begin()``: it commits when
the function returns and rolls back when it raises, so each statement is defined once for both
databases. A caller cancelled while the thread works does not stop it: the transaction still
ends (committed or rolled back) and its connection goes back to the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenwire.storage.engine import sqlite_thread_engine

P = ParamSpec("P")
T = TypeVar("T")


class Transactions:
    """Runs transaction functions against one database (see the module docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._threaded: sa.Engine | None = None
        self._looked = False  # whether _threaded was made (or found impossible) yet

    @property
    def threaded(self) -> sa.Engine | None:
        """The synchronous engine transactions run on in a worker thread (made on first use);
        None: they run on the async engine (PostgreSQL, in-memory SQLite)."""
        if not self._looked:
            self._threaded = sqlite_thread_engine(self._engine)
            self._looked = True
        return self._threaded

    def checked_out(self) -> int:
        """Connections of the thread's engine in use now (0 without one)."""
        threaded = self._threaded
        return 0 if threaded is None else int(threaded.pool.checkedout())  # type: ignore[attr-defined]

    async def run(
        self,
        work: Callable[Concatenate[sa.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``work(connection, *args, **kwargs)`` in one transaction; its result."""
        threaded = self.threaded
        if threaded is None:
            async with self._engine.begin() as conn:
                return await conn.run_sync(work, *args, **kwargs)

        def transaction() -> T:
            with threaded.begin() as conn:
                return work(conn, *args, **kwargs)

        return await asyncio.to_thread(transaction)
