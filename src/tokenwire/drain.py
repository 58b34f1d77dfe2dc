"""Graceful drain: what a gateway process does between SIGTERM and its exit.

:class:`tokenwire.server.DrainingServer` (what ``tokenwire serve`` runs) closes its listening
sockets and calls :func:`run_drain` before uvicorn's own shutdown. In order:

1. **Stop taking work.** :meth:`Drain.begin` flips the flag every new request checks:
   ``/readyz`` answers 503 ``draining``, any other HTTP request on a connection that is still
   open gets ``503 server_shutting_down`` with ``Retry-After: 1`` and ``Connection: close``
   (``/healthz`` stays 200: the process is alive), a new WebSocket request gets the same
   error, and every open WebSocket is told (:meth:`Drainable.drain`): envelope-mode sockets
   get a ``session.closing`` message; each socket closes (1001, or 1012 for a restart) as soon
   as it runs no request.
2. **Let running streams finish**, for up to ``server.drain_timeout_s``: the drain waits
   until no generation is live, no stream of another process is being read here (a resume
   through the shared store) and no WebSocket is open.
3. **End the rest**: each generation still running then ends with an in-band
   ``server_shutting_down`` error (:func:`interrupted`), which names the stream and says
   whether its events can be read again on another instance; it is billed for what it
   generated (ledger status ``shutdown``). A read of another process's stream ends with the
   same code (:func:`moved`), and that stream goes on: the client resumes it elsewhere. The
   readers see the errors, sockets close.
4. uvicorn closes what is left; the lifespan's shutdown flushes the ledger writer (every row
   committed, or in the outbox for the next start) and closes the stores.

Nothing here runs per request except one attribute check (:attr:`Drain.draining`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from tokenwire.errors import ServerShuttingDown
from tokenwire.wire.ws import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART

if TYPE_CHECKING:
    from tokenwire.state import AppState

log = logging.getLogger("tokenwire.drain")

ENDING_WAIT_S = 3.0
"""After the drain timeout: how long the ended streams get to reach their readers and settle."""
POLL_S = 0.05

DrainReason = Literal["shutdown", "restart"]


@dataclass(frozen=True, slots=True)
class DrainNotice:
    """Why and until when this process drains (loop time), and how its sockets close."""

    reason: DrainReason
    deadline: float

    @property
    def close_code(self) -> int:
        return CLOSE_SERVICE_RESTART if self.reason == "restart" else CLOSE_GOING_AWAY

    @property
    def close_reason(self) -> str:
        return "server restarting" if self.reason == "restart" else "server shutting down"

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - asyncio.get_running_loop().time())


class Drainable(Protocol):
    """An open WebSocket session, told once when the drain begins."""

    def drain(self, notice: DrainNotice) -> None: ...


class Drain:
    """Whether this process drains, and the open WebSocket sessions to tell when it does."""

    def __init__(self) -> None:
        self.notice: DrainNotice | None = None
        self._sessions: set[Drainable] = set()

    @property
    def draining(self) -> bool:
        return self.notice is not None

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def join(self, session: Drainable) -> None:
        """A session opened; one that opens during the drain is told at once."""
        self._sessions.add(session)
        if self.notice is not None:
            session.drain(self.notice)

    def leave(self, session: Drainable) -> None:
        self._sessions.discard(session)

    def begin(self, *, reason: DrainReason, timeout_s: float) -> DrainNotice:
        """Start draining (once; a second call returns the first notice)."""
        if self.notice is None:
            deadline = asyncio.get_running_loop().time() + timeout_s
            self.notice = DrainNotice(reason, deadline)
            for session in list(self._sessions):
                session.drain(self.notice)
        return self.notice


def refusal() -> ServerShuttingDown:
    """The error for a request that arrives while this process drains."""
    return ServerShuttingDown(
        "This gateway instance is shutting down and takes no new requests; send it again "
        "(another instance will serve it)."
    )


def interrupted(
    stream_id: str, last_event: int, *, resumable: bool, retention_s: float
) -> ServerShuttingDown:
    """The in-band error that ends a stream still running when the drain timeout ends."""
    message = (
        f"This gateway instance is shutting down and ended stream {stream_id} after event "
        f"{last_event}, before the upstream finished; send the request again for a complete "
        "answer."
    )
    if resumable:
        message += (
            f" The events generated so far stay readable on any instance for "
            f"{retention_s:g} s: GET /v1/chat/completions/{stream_id}/stream with "
            "Last-Event-ID, or chat.completion.resume over WebSocket."
        )
    return ServerShuttingDown(message, stream_id=stream_id, resumable=resumable)


def moved(stream_id: str) -> ServerShuttingDown:
    """The in-band error that ends this process's read of a stream another process generates
    (the stream goes on there)."""
    return ServerShuttingDown(
        f"This gateway instance is shutting down; stream {stream_id} goes on in the instance "
        f"that generates it. Resume it on any instance: GET /v1/chat/completions/{stream_id}"
        "/stream with Last-Event-ID (the last id you received), or chat.completion.resume "
        "over WebSocket.",
        stream_id=stream_id,
        resumable=True,
    )


def _busy(state: AppState) -> bool:
    completions = state.completions
    return (
        bool(completions.live)
        or completions.streams.remote_reads > 0
        or state.drain.open_sessions > 0
    )


async def _wait_quiet(state: AppState, until: float, forced: Callable[[], bool]) -> None:
    """Until nothing runs, ``until`` (loop time) passes, or a forced exit is asked for.

    Polled (every 50 ms): this runs once per process lifetime, what it waits for (generations,
    some admitted while the drain began, and sockets) has no single event, and a forced exit
    is a flag a signal handler sets.
    """
    loop = asyncio.get_running_loop()
    while _busy(state) and loop.time() < until and not forced():  # noqa: ASYNC110 - see above
        await asyncio.sleep(POLL_S)


async def run_drain(
    state: AppState,
    *,
    reason: DrainReason,
    timeout_s: float,
    forced: Callable[[], bool] = lambda: False,
) -> int:
    """Drain this process (steps 1 to 3 above); the number of streams ended by the timeout."""
    notice = state.drain.begin(reason=reason, timeout_s=timeout_s)
    log.info(
        "draining for a %s: %d live generations, %d WebSockets; new requests get 503; "
        "running streams may finish for %g s",
        reason,
        len(state.completions.live),
        state.drain.open_sessions,
        timeout_s,
    )
    await _wait_quiet(state, notice.deadline, forced)
    ended = state.completions.interrupt_all()
    ended += state.completions.streams.interrupt_remote_reads(moved)
    if ended:
        log.warning("drain timeout: %d streams ended with server_shutting_down", ended)
    await _wait_quiet(state, asyncio.get_running_loop().time() + ENDING_WAIT_S, forced)
    log.info(
        "drained: %d live generations, %d WebSockets left",
        len(state.completions.live),
        state.drain.open_sessions,
    )
    return ended
