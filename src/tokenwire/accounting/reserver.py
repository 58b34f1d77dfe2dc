"""Reservations many to a transaction: the requests admitted while one is written share the next.

Reserving credit is one database transaction per request (a conditional ``UPDATE`` of the
balance and the reservation row). When every statement was a round trip to aiosqlite's thread,
a reservation cost ~1.7 ms of CPU, four times everything else a request does; on SQLite a
transaction is now one hop to a thread (:mod:`tokenwire.storage.transactions`), and still each
one has a fixed cost that a batch shares. :class:`Reserver` writes the first reservation at
once and gathers those asked for while it is being written into the next transaction
(:meth:`Ledger.reserve_many`), so no request waits for a timer and a burst of N requests costs
a few transactions, not N.

A caller that goes away while its reservation is being written (a client gone, a shutdown)
does not leave it held: if the transaction then holds it, it is given back
(:meth:`Ledger.release`; should that fail too, the reservation is abandoned at a later start,
as one of a process that died).
"""

from __future__ import annotations

import asyncio
import logging

from tokenwire.accounting.ledger import Ledger, Reservation
from tokenwire.errors import DatabaseUnavailable

log = logging.getLogger("tokenwire.ledger")
MAX_BATCH = 256
UNAVAILABLE = (
    "The database is unavailable, so reserving credit for the request is not possible right "
    "now; retry shortly."
)

_Waiting = tuple[Reservation, "asyncio.Future[bool]"]


class Reserver:
    """Holds credit for admitted requests through :meth:`Ledger.reserve_many` (one per process)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._waiting: list[_Waiting] = []
        self._task: asyncio.Task[None] | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    async def reserve(self, reservation: Reservation) -> None:
        """Hold ``reservation``, or raise ``InsufficientQuota`` (402) / ``DatabaseUnavailable``."""
        loop = asyncio.get_running_loop()
        held: asyncio.Future[bool] = loop.create_future()
        self._waiting.append((reservation, held))
        if self._task is None:
            self._task = loop.create_task(self._run(), name="reserver")
        try:
            granted = await asyncio.shield(held)
        except asyncio.CancelledError:
            held.add_done_callback(lambda done: self._orphaned(reservation, done))
            raise
        if not granted:
            raise reservation.refusal()

    def _orphaned(self, reservation: Reservation, held: asyncio.Future[bool]) -> None:
        if held.cancelled() or held.exception() is not None or not held.result():
            return  # nothing was held
        task = held.get_loop().create_task(self._release(reservation.completion_id))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, completion_id: str) -> None:
        try:
            await self._ledger.release([completion_id])
        except Exception:
            log.exception("could not give back the reservation of %s", completion_id)

    async def aclose(self) -> None:
        """Wait for the transaction under way and for reservations being given back."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._releasing, return_exceptions=True)

    async def _run(self) -> None:
        batch: list[_Waiting] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                try:
                    granted = await self._ledger.reserve_many([r for r, _ in batch])
                except Exception as exc:
                    if isinstance(exc, DatabaseUnavailable):
                        message = exc.message
                    else:
                        log.error("reserving credit failed", exc_info=exc)
                        message = UNAVAILABLE
                    for _, held in batch:
                        if not held.done():
                            held.set_exception(DatabaseUnavailable(message))
                    continue
                for (_, held), ok in zip(batch, granted, strict=True):
                    if not held.done():
                        held.set_result(ok)
                batch = []
        finally:
            self._task = None
            if batch or self._waiting:  # cancelled (shutdown) with waiters left: release them
                for _, held in [*batch, *self._waiting]:
                    if not held.done():
                        held.set_exception(DatabaseUnavailable("The gateway is shutting down."))
                self._waiting = []
