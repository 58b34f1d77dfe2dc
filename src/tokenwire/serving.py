"""Running the gateway under uvicorn: one process, or one worker of ``serve --workers N``."""

from __future__ import annotations

import contextlib
import gc
import socket
from collections.abc import Callable

from tokenwire.config import Settings


def freeze_startup_heap() -> None:
    """Keep the garbage collector's full passes off everything loaded at start-up.

    A server process holds a few hundred thousand long-lived objects (modules, classes,
    SQLAlchemy, Alembic and Starlette internals: about 106,000 tracked objects in the gateway).
    Each full (generation 2) collection walks all of them, 36 ms with the event loop stopped,
    and more on a busy host: under 200 streams those pauses were the TTFT p99. ``gc.freeze()``
    moves them to a permanent generation the collector skips (CPython's advice for
    long-running servers); a full pass then walks only what serving made.
    """
    gc.collect()
    gc.freeze()


def run_server(
    settings: Settings,
    sockets: list[socket.socket],
    *,
    access_log: bool = True,
    on_started: Callable[[], None] | None = None,
) -> bool:
    """Serve the gateway on ``sockets`` (listening) until stopped, draining on SIGTERM
    (:class:`~tokenwire.server.DrainingServer`); False if it never started.

    Logging is the caller's (``observability.logs.configure_logging``): uvicorn's lines are
    formatted like ours. ``on_started`` runs once the app is ready to serve, after the
    start-up heap is frozen.
    """
    import uvicorn

    from tokenwire.app import create_app, server_options
    from tokenwire.server import DrainingServer

    def started() -> None:
        freeze_startup_heap()
        if on_started is not None:
            on_started()

    config = uvicorn.Config(
        create_app(settings, on_started=started),
        access_log=access_log,
        log_level="info",
        log_config=None,
        **server_options(settings),
    )
    server = DrainingServer(config, drain_timeout_s=settings.server.drain_timeout_s)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: Ctrl-C is a normal stop
        server.run(sockets=sockets)
    return bool(server.started)
