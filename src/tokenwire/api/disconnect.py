"""Stop work for an HTTP client that has gone away.

``cancel_on_disconnect(scope, receive)`` cancels its body if the client disconnects while it
runs, and swallows that cancellation, so the handler returns normally and its ``finally``
blocks (closing a reader, which lets the generation cancel its upstream) run at once — even
while nothing is being written. Any other cancellation (server shutdown) propagates.

Under ``tokenwire serve`` the HTTP protocol tells it directly: the request's
:class:`~tokenwire.http_exchange.HttpExchange` (``scope["extensions"]["tokenwire.http"]``)
runs a callback when the connection is lost before the response is complete. Under other
ASGI servers (granian, a bare ``uvicorn`` running ``app_from_env``) a task per request
watches the ASGI ``receive`` channel for ``http.disconnect`` instead.

It is a plain class, not ``contextlib.asynccontextmanager``: every request enters it once,
and a generator-based manager costs an async generator (tracked by the event loop) and a
wrapper object per request.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.types import Receive, Scope

from tokenwire.http_exchange import HTTP_EXTENSION, HttpExchange


class Disconnect:
    """Whether the client disconnected while the guarded block ran."""

    __slots__ = ("happened",)

    def __init__(self) -> None:
        self.happened = False


async def _watch(receive: Receive, client_left: Disconnect, task: asyncio.Task[object]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            _cancel(client_left, task)
            return


def _cancel(client_left: Disconnect, task: asyncio.Task[object]) -> None:
    client_left.happened = True
    task.cancel()


class cancel_on_disconnect:  # lower case: used like the context-manager function it replaced
    """Run the block; if the client disconnects meanwhile, cancel it and carry on quietly."""

    __slots__ = ("_exchange", "_flag", "_receive", "_task", "_watcher")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        extensions = scope.get("extensions")
        self._exchange: HttpExchange | None = (
            None if extensions is None else extensions.get(HTTP_EXTENSION)
        )
        self._receive = receive
        self._flag = Disconnect()
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Disconnect:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        if self._exchange is not None:
            self._exchange.on_lost(self._lost)
        else:
            loop = task.get_loop()
            self._watcher = loop.create_task(_watch(self._receive, self._flag, task))
        return self._flag

    def _lost(self) -> None:
        assert self._task is not None
        _cancel(self._flag, self._task)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        assert self._task is not None
        if self._watcher is not None:
            self._watcher.cancel()
        elif self._exchange is not None:
            self._exchange.discard()
        if kind is not None and issubclass(kind, asyncio.CancelledError) and self._flag.happened:
            self._task.uncancel()
            return True  # the client left: the block's cancellation ends here
        return False
