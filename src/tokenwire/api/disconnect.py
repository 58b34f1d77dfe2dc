"""Stop work for an HTTP client that has gone away.

``cancel_on_disconnect(receive)`` watches the ASGI ``receive`` channel for
``http.disconnect`` while its body runs; on disconnect it cancels the body and swallows that
cancellation, so the handler returns normally and its ``finally`` blocks (closing a reader,
which lets the generation cancel its upstream) run at once — even while nothing is being
written. Any other cancellation (server shutdown) propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.types import Receive


class Disconnect:
    """Whether the client disconnected while the guarded block ran."""

    def __init__(self) -> None:
        self.happened = False


async def _watch(receive: Receive, task: asyncio.Task[object], flag: Disconnect) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            flag.happened = True
            task.cancel()
            return


@contextlib.asynccontextmanager
async def cancel_on_disconnect(receive: Receive) -> AsyncIterator[Disconnect]:
    """Run the block; if the client disconnects meanwhile, cancel it and carry on quietly."""
    task = asyncio.current_task()
    assert task is not None
    flag = Disconnect()
    watcher = asyncio.get_running_loop().create_task(_watch(receive, task, flag))
    try:
        yield flag
    except asyncio.CancelledError:
        if not flag.happened:
            raise
        task.uncancel()
    finally:
        watcher.cancel()
