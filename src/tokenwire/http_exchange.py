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
  goes at the end of that step (``call_soon``), so nothing waits longer than the step. Then
  the writer steps out of the way: the cycle writes to the transport itself again. The bytes
  on the wire are the same, in fewer writes.

Both hold the request's cycle weakly, so that serving a request makes no cycle of references
(scope → exchange → cycle → scope) and reference counting alone frees it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

HTTP_EXTENSION = "tokenwire.http"
"""The key of :class:`HttpExchange` in an HTTP scope's ``extensions``."""

LARGE_BODY = 16384  # bytes: a body at least this long is written beside the head, not copied

log = logging.getLogger("tokenwire.server")


class ConnectionWatch:
    """The requests of one connection that wait to hear it is lost (run by its protocol)."""

    __slots__ = ("lost", "watching")

    def __init__(self) -> None:
        self.lost = False
        self.watching: list[HttpExchange] = []

    def connection_lost(self) -> None:
        self.lost = True
        watching, self.watching = self.watching, []
        for exchange in watching:
            exchange._connection_lost()


class HttpExchange:
    """What the app may do on a request besides ASGI: ``scope["extensions"]["tokenwire.http"]``."""

    __slots__ = ("_callback", "_cycle", "_watch")

    def __init__(self, watch: ConnectionWatch, cycle: weakref.ref[RequestResponseCycle]) -> None:
        self._watch = watch
        self._cycle = cycle
        self._callback: Callable[[], None] | None = None

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (no arguments, from the event loop) if the connection is lost
        before this request's response is complete; if it already is, in the loop's next
        step (never from within this call: the caller's block may end before it waits, and
        must not be left with a cancel pending). One callback per request at a time
        (:meth:`discard` it first).

        Registering resumes reading the socket, as ASGI's ``receive`` does (uvicorn pauses it
        while a pipelined request waits), so that the client's hang-up is seen.
        """
        if self._callback is not None:
            raise RuntimeError("this request already has a connection-lost callback")
        cycle = self._cycle()
        if cycle is None or cycle.response_complete:
            return
        self._callback = callback
        if self._watch.lost:  # the protocol has told its requests already
            asyncio.get_running_loop().call_soon(self._connection_lost)
            return
        flow = cycle.flow
        if flow.read_paused:
            flow.resume_reading()
        self._watch.watching.append(self)

    def discard(self) -> None:
        """Call off the callback (nothing happens if it ran or none is registered)."""
        if self._callback is not None:
            self._callback = None
            if self in self._watch.watching:  # not if the connection was lost already
                self._watch.watching.remove(self)

    def _connection_lost(self) -> None:
        callback, self._callback = self._callback, None
        cycle = self._cycle()
        if callback is None or cycle is None or cycle.response_complete:
            return  # a complete response's client has nothing left to miss
        try:
            callback()
        except Exception:  # the protocol's other requests must still hear of it
            log.exception("a connection-lost callback failed")


class ResponseWriter:
    """The transport as one response's uvicorn cycle sees it (``cycle.transport``) until the
    head is written: the head waits for the first body part, or for the end of the
    event-loop step, and goes with it; then the cycle writes to the transport itself again.

    The head is the first write once the cycle's response has started (before that, only
    ``100 Continue`` is written, and it goes at once). A ``HEAD`` answer has no body to wait
    for: its cycle gets no writer.
    """

    __slots__ = ("_cycle", "_head", "_loop", "_transport")

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        cycle: weakref.ref[RequestResponseCycle],
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._cycle = cycle
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:  # the first body part: both in one write, and out of the way
            self._head = None
            self._unhook()
            if len(data) < LARGE_BODY:
                self._transport.write(head + data)
            else:
                self._transport.writelines((head, data))
            return
        cycle = self._cycle()
        if cycle is not None and not cycle.response_started:
            self._transport.write(data)  # 100 Continue
            return
        self._head = data
        self._loop.call_soon(self._flush)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def _flush(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._unhook()
            if not self._transport.is_closing():  # the connection went: nobody to tell
                self._transport.write(head)

    def _unhook(self) -> None:
        cycle = self._cycle()
        if cycle is not None:
            cycle.transport = self._transport
