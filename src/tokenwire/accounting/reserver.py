"""Reservations many to a transaction: the requests admitted while one is written share the next.

Reserving credit is one database transaction per request (a conditional ``UPDATE`` of the
balance and the reservation row). When every statement was a round trip to aiosqlite's thread,
a reservation cost ~1.7 ms of CPU, four times everything else a request does; on SQLite a
transaction is now one hop to a thread (:mod:`tokenwire.storage.transactions`), and still each
one has a fixed cost that a batch shares. :class:`Reserver` writes the first reservation at
once and gathers those asked for while it is being written into the next transaction
(:meth:`Ledger.reserve_many`, through a :class:`tokenwire.batching.Batcher`), so no request
waits for a timer and a burst of N requests costs a few transactions, not N.

A caller that goes away while its reservation is being written (a client gone, a shutdown)
does not leave it held: if the transaction then holds it, it is given back
(:meth:`Ledger.release`; should that fail too, the reservation is abandoned at a later start,
as one of a process that died).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tokenwire.accounting.ledger import Ledger, Reservation
from tokenwire.batching import Batcher
from tokenwire.errors import DatabaseUnavailable

log = logging.getLogger("tokenwire.ledger")
UNAVAILABLE = (
    "The database is unavailable, so reserving credit for the request is not possible right "
    "now; retry shortly."
)


class Reserver:
    """Holds credit for admitted requests through :meth:`Ledger.reserve_many` (one per process)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._batcher: Batcher[Reservation, bool] = Batcher(
            self._reserve_many,
            name="reserver",
            unavailable=lambda: DatabaseUnavailable("The gateway is shutting down."),
            abandoned=self._give_back,
        )

    async def reserve(self, reservation: Reservation) -> None:
        """Hold ``reservation``, or raise ``InsufficientQuota`` (402) / ``DatabaseUnavailable``."""
        if not await self._batcher.submit(reservation):
            raise reservation.refusal()

    async def _reserve_many(self, batch: list[Reservation]) -> Sequence[bool | Exception]:
        try:
            return await self._ledger.reserve_many(batch)
        except DatabaseUnavailable as exc:
            return [DatabaseUnavailable(exc.message) for _ in batch]
        except Exception as exc:
            log.error("reserving credit failed", exc_info=exc)
            return [DatabaseUnavailable(UNAVAILABLE) for _ in batch]

    async def _give_back(self, reservation: Reservation, granted: bool) -> None:
        if not granted:
            return  # nothing was held
        try:
            await self._ledger.release([reservation.completion_id])
        except Exception:
            log.exception("could not give back the reservation of %s", reservation.completion_id)

    async def aclose(self) -> None:
        """Wait for the transaction under way and for reservations being given back."""
        await self._batcher.aclose()
