"""The WebSocket connection every WebSocket API of the gateway runs on: :class:`WSSession`.

Each socket is one session: a reader loop (parses client messages), one writer task (the only
one that sends, fed by a bounded queue), and one task per running request that reads its
generation's log. When the writer falls behind, request tasks block on the queue while the
log keeps the events; their next batch is merged into fewer chunks, so a slow client costs no
memory beyond the generation itself. A client that accepts nothing for ``ws_send_timeout_s`` is
closed with 1013.

Requests queued on a *lane* run one after another (compatible-mode chat, Responses per
stream); others run concurrently, up to ``ws_max_concurrent_requests`` in all.

When the process drains (tokenwire.drain), a session refuses new requests (503
``server_shutting_down``), tells an envelope-mode client with ``session.closing``, and closes
(1001, or 1012 for a restart) as soon as it runs no request.

The protocols: chat completions (``api/ws.py``) and Responses (``api/responses_ws.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from tokenwire.accounting.keys import KeyRecord
from tokenwire.api.auth import authenticate_token, client_address
from tokenwire.api.ws_accept import close_code
from tokenwire.config import ServerConfig
from tokenwire.drain import DrainNotice, refusal
from tokenwire.errors import AuthenticationError, GatewayError, RateLimited, unexpected
from tokenwire.state import AppState
from tokenwire.streams.source import StreamSource
from tokenwire.wire import ws as proto
from tokenwire.wire.chunks import error_json
from tokenwire.wire.frames import FrameLoop

if TYPE_CHECKING:
    from tokenwire.protocols import FastWebSocket

log = logging.getLogger("tokenwire.ws")


class _Lane:
    """Requests that answer one after another: their queue, and the task serving it."""

    __slots__ = ("busy", "queue", "task")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | GatewayError] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.busy = False


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Ping:
    """A ping for the writer to send once the messages queued before it are written."""

    answered: asyncio.Future[bool]  # True: the pong came; False: the client closed first


_Outgoing = bytes | _Close | Ping


class _RateBucket:
    """A token bucket for client messages (``rate`` per second, burst twice that)."""

    __slots__ = ("_at", "_capacity", "_rate", "_tokens")

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._capacity = 2 * rate
        self._tokens = self._capacity
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class WSSession:
    """One WebSocket connection: reader, single writer, request tasks; what every WebSocket
    API of the gateway shares. A subclass is one protocol: it parses and dispatches the
    client's messages and serves the requests queued on lanes (the hooks at the end).

    The reader runs in the connection's own task (an idle socket holds one task, not two);
    slots, because ten thousand idle sockets hold ten thousand of these.
    """

    __slots__ = (
        "_auth_deadline",
        "_bucket",
        "_client_closed",
        "_closed_event",
        "_closing",
        "_config",
        "_drain",
        "_draining_notice_task",
        "_envelope",
        "_fast",
        "_key",
        "_lanes",
        "_mode",
        "_out",
        "_reader_task",
        "_receive_timeout",
        "_requests",
        "_state",
        "_writer_gone",
        "_writer_task",
        "_writing",
        "_ws",
    )

    def __init__(
        self, websocket: WebSocket, state: AppState, key: KeyRecord | None, *, envelope: bool
    ) -> None:
        self._ws = websocket
        self._state = state
        self._config: ServerConfig = state.settings.server
        self._key = key
        # uvicorn under `tokenwire serve`: batched writes and pings the app can await
        self._fast: FastWebSocket | None = websocket.scope.get("extensions", {}).get("tokenwire.ws")
        # The writer and its queue are made with the first message to send (memory per socket).
        self._out: asyncio.Queue[_Outgoing] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._reader_task: asyncio.Task[Any] | None = None  # the connection's task, while reading
        self._writer_gone = False
        self._writing = False  # the writer holds messages taken from the queue, unwritten
        self._requests: dict[str, tuple[asyncio.Task[None], StreamSource]] = {}
        # Made with the first compatible request: most sockets never need them (memory).
        self._lanes: dict[str | None, _Lane] | None = None  # made with the first queued request
        self._client_closed = False
        self._closed_event: asyncio.Event | None = None  # made only when someone waits for it
        self._closing = False
        self._bucket = _RateBucket(self._config.ws_messages_per_second)
        self._auth_deadline: float | None = None
        self._receive_timeout: asyncio.Timeout | None = None
        # Drain: the notice once the process drains; whether the client speaks envelope mode
        # (the tokenwire.v1 subprotocol, or a typed message), which gets session.closing.
        self._drain: DrainNotice | None = None
        self._envelope = envelope
        self._draining_notice_task: asyncio.Task[None] | None = None
        self._mode = "pending"  # until the first request: "compatible" or "envelope" (metrics)

    # -- the connection ----------------------------------------------------------------------

    async def run(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._reader_task = task
        self._state.drain.join(self)
        self._state.metrics.websocket_mode(None, self._mode)
        try:
            # The reader ends on a close, a violation or a timeout; a writer that ends (the
            # client accepts nothing for ws_send_timeout_s, or the transport is gone) cancels it.
            await self._reader()
        except asyncio.CancelledError:
            if not self._writer_gone:
                raise  # not ours (server shutdown): clean up below, then propagate
            task.uncancel()
        except Exception as exc:  # logged, like any unexpected failure of a connection
            log.error("WebSocket reader failed", exc_info=exc)
        finally:
            self._state.metrics.websocket_mode(self._mode, None)  # first: the rest awaits
            self._mode = "closed"  # counted under no mode any more
            self._state.drain.leave(self)
            self._reader_task = None  # a writer ending from now on cancels nothing
            self._mark_client_closed()
            tasks = self._tasks()
            for request_task in tasks:
                request_task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer = self._writer_task
            if writer is not None and not writer.done():
                self._close_soon(proto.CLOSE_NORMAL, "")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await asyncio.shield(writer)
                writer.cancel()

    def _set_mode(self, mode: str) -> None:
        """The socket's first request decides the mode it is counted under."""
        if self._mode == "pending":
            self._state.metrics.websocket_mode(self._mode, mode)
            self._mode = mode

    def _queue(self) -> asyncio.Queue[_Outgoing]:
        """The writer's queue, starting the writer on first use."""
        if self._out is None:
            self._out = asyncio.Queue(maxsize=64)
            self._writer_task = asyncio.get_running_loop().create_task(self._writer(self._out))
            self._writer_task.add_done_callback(self._writer_ended)
        return self._out

    def _mark_client_closed(self) -> None:
        self._client_closed = True
        if self._closed_event is not None:
            self._closed_event.set()

    def _writer_ended(self, _task: asyncio.Task[None]) -> None:
        if self._reader_task is not None:
            self._writer_gone = True
            self._reader_task.cancel()  # nothing more can be sent: end the session

    def _close_soon(self, code: int, reason: str) -> None:
        """Queue a close frame behind what is already queued; stop reading."""
        if self._closing:
            return
        self._closing = True
        out = self._queue()
        with contextlib.suppress(asyncio.QueueFull):
            out.put_nowait(_Close(code, reason))
            return
        # The queue is full because the client reads nothing: drop what is pending.
        while not out.empty():
            out.get_nowait()
        out.put_nowait(_Close(code, reason))

    async def _writer(self, out: asyncio.Queue[_Outgoing]) -> None:
        """Write what the queue holds, in order: every message queued since the last wake-up
        in one batch (one system call with :class:`FastWebSocket`)."""
        try:
            while True:
                batch = [await out.get()]
                while not out.empty():
                    batch.append(out.get_nowait())
                self._writing = True
                texts: list[bytes] = []
                for item in batch:
                    if isinstance(item, bytes):
                        texts.append(item)
                        continue
                    if texts and not await self._write(texts):
                        return
                    texts = []
                    if isinstance(item, Ping):
                        self._ping(item.answered)
                        continue
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self._config.ws_send_timeout_s):
                            await self._ws.close(item.code, item.reason)
                    return
                if texts and not await self._write(texts):
                    return
                self._writing = False
        except (OSError, RuntimeError, WebSocketDisconnect):
            self._mark_client_closed()  # the transport is gone

    async def _write(self, texts: list[bytes]) -> bool:
        """Send text messages; False when the session must end (client gone or too slow)."""
        fast = self._fast
        if fast is not None:
            if not fast.writable.is_set():
                # A client that reads nothing for ws_send_timeout_s is aborted by the
                # connection's stall guard, which sets `writable` (and write_texts fails).
                await fast.writable.wait()
            if fast.write_texts(texts):
                return True
            self._mark_client_closed()
            return False
        timeout = self._config.ws_send_timeout_s
        for text in texts:
            try:
                async with asyncio.timeout(timeout):
                    await self._ws.send({"type": "websocket.send", "text": text.decode()})
            except TimeoutError:
                self._closing = True
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await self._ws.close(proto.CLOSE_TRY_AGAIN_LATER, "client too slow")
                return False
        return True

    def _ping(self, answered: asyncio.Future[bool]) -> None:
        if self._fast is None:
            answered.set_result(not self._client_closed)
            return
        self._fast.ping().add_done_callback(partial(_pass_on, answered))

    async def _send_all(self, messages: list[bytes]) -> None:
        """:meth:`_send` each message; with :class:`FastWebSocket` and nothing waiting ahead,
        all of them in one write."""
        if len(messages) > 1 and self._can_write_now():
            assert self._fast is not None
            if not self._fast.write_texts(messages):
                self._mark_client_closed()
            return
        for message in messages:
            await self._send(message)

    def _can_write_now(self) -> bool:
        """Whether a message may be written by the calling task now: nothing waits ahead of
        it (in the queue or in the writer's hands) and the transport takes more."""
        return (
            self._fast is not None
            and not self._closing
            and not self._writing
            and (self._out is None or self._out.empty())
            and self._fast.writable.is_set()
        )

    async def _send(self, message: bytes | Ping) -> None:
        """Send a message after those sent before it (by any task of this session).

        With :class:`FastWebSocket`, while nothing waits in the queue or in the writer's
        hands and the transport takes more, the message is written at once by the calling
        task (a synchronous write, so frames never interleave); otherwise it joins the
        queue behind the others and the writer sends it when the client takes more.
        """
        if self._closing:
            return
        if self._can_write_now():
            assert self._fast is not None
            if isinstance(message, Ping):
                self._ping(message.answered)
            elif not self._fast.write_texts([message]):
                self._mark_client_closed()  # the reader sees the disconnect and ends it all
            return
        out = self._queue()
        if out.full():
            await out.put(message)
        else:
            out.put_nowait(message)

    def _receive_deadline(self) -> float | None:
        """When the reader stops waiting: auth deadline, idle deadline, or never (busy)."""
        if self._key is None:
            return self._auth_deadline
        if self._active():
            return None
        return asyncio.get_running_loop().time() + self._config.ws_idle_timeout_s

    def _rearm_idle(self) -> None:
        """A request ended: restart the idle clock of a reader that waits with none (or, while
        draining, close the socket once no request runs)."""
        self._close_if_drained()
        if self._receive_timeout is not None and not self._active():
            self._receive_timeout.reschedule(self._receive_deadline())

    # -- drain -------------------------------------------------------------------------------

    def drain(self, notice: DrainNotice) -> None:
        """The process drains: refuse new requests, tell an envelope client, close when idle."""
        if self._drain is not None:
            return
        self._drain = notice
        if self._key is not None and self._envelope:
            loop = asyncio.get_running_loop()
            self._draining_notice_task = loop.create_task(self._send_closing(notice))
        else:
            self._close_if_drained()

    async def _send_closing(self, notice: DrainNotice) -> None:
        drain_ms = int(notice.remaining_s() * 1000)
        await self._send(proto.closing_message(notice.reason, notice.close_code, drain_ms))
        self._draining_notice_task = None
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        """Close with the drain's code once no request runs (after ``session.closing``)."""
        notice = self._drain
        if notice is not None and self._draining_notice_task is None and not self._active():
            self._close_soon(notice.close_code, notice.close_reason)

    async def _reader(self) -> None:
        max_bytes = self._config.ws_max_message_bytes
        self._auth_deadline = asyncio.get_running_loop().time() + self._config.ws_auth_timeout_s
        while not self._closing:
            try:
                async with asyncio.timeout_at(self._receive_deadline()) as timeout:
                    self._receive_timeout = timeout
                    message = await self._ws.receive()
            except TimeoutError:
                if self._key is None:
                    self._close_soon(proto.CLOSE_UNAUTHORIZED, "no authentication in time")
                else:
                    self._close_soon(proto.CLOSE_NORMAL, "idle timeout")
                return
            finally:
                self._receive_timeout = None
            if message["type"] == "websocket.disconnect":
                return
            if not self._bucket.take():
                self._close_soon(proto.CLOSE_POLICY, "message rate limit exceeded")
                return
            text = message.get("text")
            if text is None:
                self._close_soon(proto.CLOSE_UNSUPPORTED_DATA, "binary messages are not accepted")
                return
            try:
                parsed = self._parse(text, max_bytes)
                self._envelope = self._envelope or self._speaks_envelope(parsed)
                if self._key is None:
                    await self._authenticate(parsed)
                    continue
                await self._dispatch(parsed)
            except proto.ProtocolViolation as exc:
                self._close_soon(exc.code, exc.reason)
                return
            except proto.RequestFailed as exc:
                await self._report(exc.error, exc.request_id, compatible=False)
            except Exception as exc:  # noqa: BLE001 - logged; fails this message, not the socket
                await self._report(as_gateway_error(exc, "a message"), None, compatible=False)

    async def _authenticate(self, message: object) -> None:
        if not isinstance(message, proto.AuthMessage):
            raise proto.ProtocolViolation(
                proto.CLOSE_UNAUTHORIZED, "authenticate first: send {type: auth, api_key}"
            )
        client = client_address(self._ws)
        try:
            self._key = await authenticate_token(self._state, message.api_key, client)
        except AuthenticationError:
            raise proto.ProtocolViolation(proto.CLOSE_UNAUTHORIZED, "invalid API key") from None
        except GatewayError as exc:  # throttled, or the throttle's store (Redis) is down
            raise proto.ProtocolViolation(close_code(exc), exc.message[:120]) from None
        await self._send(b'{"type":"auth.ok"}')

    # -- requests ----------------------------------------------------------------------------

    def _tasks(self) -> list[asyncio.Task[None]]:
        """The tasks serving requests and the drain notice (cancelled when the socket ends)."""
        tasks = [request_task for request_task, _ in self._requests.values()]
        tasks.extend(lane.task for lane in (self._lanes or {}).values() if lane.task is not None)
        if self._draining_notice_task is not None:
            tasks.append(self._draining_notice_task)
        return tasks

    def _active(self) -> int:
        queued = sum(lane.queue.qsize() + lane.busy for lane in (self._lanes or {}).values())
        return len(self._requests) + queued

    def _check_capacity(self, request_id: str | None) -> None:
        if self._drain is not None:
            raise proto.RequestFailed(refusal(), request_id)
        cap = self._config.ws_max_concurrent_requests
        if self._active() >= cap:
            self._state.metrics.limit_refused("socket_requests")
            error = RateLimited(
                f"At most {cap} requests may run at once on one socket.",
                retry_after_s=1.0,
                code="too_many_concurrent_requests",
            )
            raise proto.RequestFailed(error, request_id)

    def _request_done(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._rearm_idle()

    async def _live_key(self) -> KeyRecord:
        """The socket's key as it stands now: one revoked (or expired) since the socket was
        authenticated fails this request and closes the socket with 3000."""
        assert self._key is not None
        key = await self._state.keys.current(self._key)
        if key is None:
            raise AuthenticationError("This API key was revoked or has expired.")
        self._key = key
        return key

    async def _report(self, error: GatewayError, request_id: str | None, compatible: bool) -> None:
        """Send one request's error; a key found revoked then closes the socket (3000)."""
        if compatible:
            await self._send(error_json(error))
        else:
            await self._send(proto.error_message(error, request_id))
        if isinstance(error, AuthenticationError):
            self._close_soon(proto.CLOSE_UNAUTHORIZED, "API key revoked or expired")

    # -- serving requests --------------------------------------------------------------------

    async def _stream(self, source: StreamSource, frames: FrameLoop, after: int) -> None:
        """Send a stream's frames, in every mode: the log read after ``after``, then the end."""
        # aclosing: a task cancelled (or failing) while it hands frames to the writer
        # detaches its reader at once, not whenever the iterator happens to be collected.
        async with contextlib.aclosing(source.read(after=after)) as batches:
            async for batch in batches:
                await self._send_all(frames.frames(batch))
        await self._send_all(frames.end())

    # -- requests served one after another, per lane ------------------------------------------

    def _enqueue(self, lane: str | None, item: dict[str, Any] | GatewayError) -> None:
        """Queue a request (or the error that refused it) on a lane that answers in order; a
        lane's worker starts with its first item and ends when it has nothing left."""
        lanes = self._lanes
        if lanes is None:
            lanes = self._lanes = {}
        entry = lanes.get(lane)
        if entry is None:
            entry = lanes[lane] = _Lane()
            entry.task = asyncio.get_running_loop().create_task(self._lane_worker(lane, entry))
        entry.queue.put_nowait(item)

    async def _lane_worker(self, lane: str | None, entry: _Lane) -> None:
        try:
            while True:
                item = entry.queue.get_nowait()
                entry.busy = True
                try:
                    await self._serve_queued(lane, item)
                except Exception as exc:  # noqa: BLE001 - logged, in order; the next one runs
                    await self._queued_failed(lane, as_gateway_error(exc, "a queued request"))
                finally:
                    entry.busy = False
                    self._rearm_idle()
        except asyncio.QueueEmpty:
            pass
        finally:
            if self._lanes is not None and self._lanes.get(lane) is entry:
                del self._lanes[lane]

    # -- the protocol: what a subclass defines ------------------------------------------------

    def _parse(self, text: str, max_bytes: int) -> object:
        """One client message, typed (a ``ProtocolViolation`` closes the socket)."""
        raise NotImplementedError

    def _speaks_envelope(self, message: object) -> bool:
        """Whether a client sending ``message`` speaks envelope mode (gets ``session.closing``)."""
        raise NotImplementedError

    async def _dispatch(self, message: object) -> None:
        """Act on one message of an authenticated client (a ``RequestFailed`` is reported)."""
        raise NotImplementedError

    async def _serve_queued(self, lane: str | None, item: dict[str, Any] | GatewayError) -> None:
        """Serve one request queued on ``lane`` (:meth:`_enqueue`); raise what fails it."""
        raise NotImplementedError

    async def _queued_failed(self, lane: str | None, error: GatewayError) -> None:
        """Report a queued request's failure, in its turn."""
        raise NotImplementedError


def _pass_on(answered: asyncio.Future[bool], pong: asyncio.Future[bool]) -> None:
    if not answered.done():
        answered.set_result(pong.result())


def as_gateway_error(exc: Exception, what: str) -> GatewayError:
    """``exc`` as the error to report: itself, or a logged ``InternalError`` for a bug."""
    if isinstance(exc, GatewayError):
        return exc
    return unexpected(exc, log, f"WebSocket request {what}")
