"""Stop work for an HTTP client that has gone away.

``cancel_on_disconnect(receive)`` watches the ASGI ``receive`` channel for
``http.disconnect`` while its body runs; on disconnect it cancels the body and swallows that
cancellation, so the handler returns normally and its ``finally`` blocks (closing a reader,
which lets the generation cancel its upstream) run at once — even while nothing is being
written. Any other cancellation (server shutdown) propagates.

It is a plain class, not ``contextlib.asynccontextmanager``: every request enters it once,
and a generator-based manager costs an async generator (tracked by the event loop) and a
wrapper object per request.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.types import Receive


class Disconnect:
    """Whether the client disconnected while the guarded block ran."""

    __slots__ = ("happened",)

    def __init__(self) -> None:
        self.happened = False


async def _watch(receive: Receive, task: asyncio.Task[object], flag: Disconnect) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            flag.happened = True
            task.cancel()
            return


class cancel_on_disconnect:  # lower case: used like the context-manager function it replaced
    """Run the block; if the client disconnects meanwhile, cancel it and carry on quietly."""

    __slots__ = ("_flag", "_receive", "_task", "_watcher")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._flag = Disconnect()
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Disconnect:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        loop = task.get_loop()
        self._watcher = loop.create_task(_watch(self._receive, task, self._flag))
        return self._flag

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        assert self._watcher is not None and self._task is not None
        self._watcher.cancel()
        if kind is not None and issubclass(kind, asyncio.CancelledError) and self._flag.happened:
            self._task.uncancel()
            return True  # the client left: the block's cancellation ends here
        return False
