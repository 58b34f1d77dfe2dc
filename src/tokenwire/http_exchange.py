"""One HTTP request on tokenwire's uvicorn protocol: what the app gets besides ASGI, and how
its response reaches the socket.

:class:`~tokenwire.protocols.GuardedHttpProtocol` gives every request two things:

* **``scope["extensions"]["tokenwire.http"]``**, an :class:`HttpExchange`: the app registers
  a callback run when the connection is lost before the response is complete
  (:meth:`HttpExchange.on_lost`). Watching for ``http.disconnect`` through ASGI needs a task
  per request doing nothing but ``await receive()``; this needs none
  (``api/disconnect.py`` uses it when it is there, the task under other ASGI servers).
* **a writer between uvicorn's request cycle and the socket** (:class:`ResponseWriter`):
  uvicorn writes the response head on ``http.response.start`` and each body part on its own,
  one system call each (on loopback each costs the kernel's whole TCP path). The writer
  holds the head and sends it with the first body part, which nearly always follows in the
  same event-loop step (a JSON answer; an SSE stream's first events); if none does, the head
  goes at the end of that step (``call_soon``), so nothing waits longer than the step. The
  bytes on the wire are the same, in fewer writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

HTTP_EXTENSION = "tokenwire.http"
"""The key of :class:`HttpExchange` in an HTTP scope's ``extensions``."""

LARGE_BODY = 16384  # bytes: a body at least this long is written beside the head, not copied

log = logging.getLogger("tokenwire.server")


class LostCallbacks:
    """A connection's callbacks for its loss (one per connection, run by its protocol)."""

    __slots__ = ("_entries", "lost")

    def __init__(self) -> None:
        self.lost = False
        self._entries: list[tuple[RequestResponseCycle, Callable[[], None]]] = []

    def add(self, cycle: RequestResponseCycle, callback: Callable[[], None]) -> None:
        self._entries.append((cycle, callback))

    def discard(self, cycle: RequestResponseCycle, callback: Callable[[], None]) -> None:
        entries = self._entries
        for index, (their_cycle, their_callback) in enumerate(entries):
            if their_cycle is cycle and their_callback == callback:
                del entries[index]
                return

    def connection_lost(self) -> None:
        """The connection is gone: run the callbacks of requests whose response was not
        complete (a finished response's client has nothing left to miss)."""
        self.lost = True
        entries, self._entries = self._entries, []
        for cycle, callback in entries:
            if cycle.response_complete:
                continue
            try:
                callback()
            except Exception:  # one callback's bug must not skip the others
                log.exception("a connection-lost callback failed")


class HttpExchange:
    """What the app may do on a request besides ASGI: ``scope["extensions"]["tokenwire.http"]``."""

    __slots__ = ("_callbacks", "_cycle")

    def __init__(self, callbacks: LostCallbacks, cycle: RequestResponseCycle) -> None:
        self._callbacks = callbacks
        self._cycle = cycle

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (no arguments, from the event loop) if the connection is lost
        before this request's response is complete; at once if it already is.

        Registering resumes reading the socket, as ASGI's ``receive`` does (uvicorn pauses it
        while a pipelined request waits), so that the client's hang-up is seen.
        """
        cycle = self._cycle
        if cycle.response_complete:
            return
        if self._callbacks.lost:
            callback()
            return
        cycle.flow.resume_reading()
        self._callbacks.add(cycle, callback)

    def discard(self, callback: Callable[[], None]) -> None:
        """Call off ``callback`` (nothing happens if it ran or was never registered)."""
        self._callbacks.discard(self._cycle, callback)


class ResponseWriter:
    """The transport as one response's uvicorn cycle sees it (``cycle.transport``): the head
    waits for the first body part, or for the end of the event-loop step, and goes with it.

    The head is the first write once the cycle's response has started (before that, only
    ``100 Continue`` is written, and it goes at once). A ``HEAD`` response has no body: its
    head goes at once too.
    """

    __slots__ = ("_cycle", "_head", "_head_due", "_loop", "_transport")

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        cycle: RequestResponseCycle,
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._cycle = cycle
        self._head: bytes | None = None
        self._head_due = True

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if len(data) < LARGE_BODY:
                self._transport.write(head + data)
            else:
                self._transport.writelines((head, data))
            return
        if self._head_due and self._cycle.response_started:
            self._head_due = False
            if self._cycle.scope["method"] != "HEAD":
                self._head = data
                self._loop.call_soon(self._flush)
                return
        self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def _flush(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if not self._transport.is_closing():  # the connection went: nobody to tell
                self._transport.write(head)
