"""The uvicorn server ``tokenwire serve`` runs: uvicorn's, with a graceful drain before exit.

uvicorn on SIGTERM (or SIGINT) stops its main loop and shuts down at once: it closes the
listening sockets, closes idle connections, sends close 1012 to every WebSocket, gives open
HTTP responses ``timeout_graceful_shutdown`` seconds, cancels what is left, and then runs the
lifespan's shutdown. A streaming gateway needs more: streams may run for minutes, WebSocket
clients should hear why the socket is closing, and a load balancer should see the instance
go unready while it finishes its work.

:class:`DrainingServer` keeps uvicorn's sequence and puts the app's drain in front of it
(:mod:`tokenwire.drain`): on SIGTERM or SIGINT it stops accepting connections, then lets the
app drain for ``server.drain_timeout_s`` (running streams finish; requests on connections
still open get 503; ``/readyz`` says ``draining``), then runs uvicorn's own shutdown with a
short ``timeout_graceful_shutdown``. SIGHUP does the same for a *restart*: WebSockets close
with 1012 (service restart) instead of 1001 (going away), and the process exits with status
0 rather than re-raising the signal (so a supervisor such as systemd with ``Restart=always``
starts it again). A second SIGINT (Ctrl-C) skips what is left of the drain.

Everything is per process: with several worker processes on one port, each worker runs its
own ``DrainingServer`` and drains on the SIGTERM its supervisor forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from tokenwire.app import Gateway
from tokenwire.drain import DrainReason

RESTART_SIGNAL = signal.SIGHUP


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` that drains the tokenwire app before its shutdown (module docstring)."""

    def __init__(self, config: uvicorn.Config, *, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain_timeout_s = drain_timeout_s
        self.drain_reason: DrainReason = "shutdown"
        self.streams_ended_by_drain = 0

    def request_drain(self, reason: DrainReason = "shutdown") -> None:
        """Drain and exit, as on SIGTERM (``"restart"``: as on SIGHUP); for embedders and tests."""
        self.drain_reason = reason
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's SIGINT/SIGTERM handling, plus SIGHUP for a restart."""
        if threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        previous = signal.signal(RESTART_SIGNAL, self._restart_requested)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(RESTART_SIGNAL, previous)

    def _restart_requested(self, _sig: int, _frame: FrameType | None) -> None:
        self.request_drain("restart")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        if isinstance(app, Gateway) and not self.force_exit:
            for server in self.servers:
                if not _listens_on(server, app.metrics_port):  # Prometheus scrapes the drain
                    server.close()  # no new connections: a balancer's connect goes elsewhere
            self.streams_ended_by_drain = await app.drain_before_exit(
                reason=self.drain_reason,
                timeout_s=self.drain_timeout_s,
                forced=lambda: self.force_exit,
            )
        await super().shutdown(sockets)


def _listens_on(server: asyncio.Server, port: int | None) -> bool:
    return port is not None and any(sock.getsockname()[1] == port for sock in server.sockets)
