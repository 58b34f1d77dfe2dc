"""tokenwire's HTTP protocol against uvicorn's own, on a transport that records each write.

One recorded write is one system call on a real socket. The guarded protocol
(``GuardedHttpProtocol``) writes a response's head with its first body part, the same bytes as
uvicorn's protocol in fewer writes, and gives each request an ``HttpExchange``
(``scope["extensions"]["tokenwire.http"]``) through which ``cancel_on_disconnect`` learns of a
lost connection without a task; under uvicorn's own protocol it watches ``receive`` instead.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.responses import PlainTextResponse
from starlette.types import Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from tokenwire.api.disconnect import Disconnect, cancel_on_disconnect
from tokenwire.api.errors import error_response, json_response
from tokenwire.errors import RateLimited
from tokenwire.http_exchange import HTTP_EXTENSION, HttpExchange
from tokenwire.protocols import ConnectionGuard, GuardedHttpProtocol

App = Callable[[Scope, Receive, Send], Awaitable[None]]

NO_GUARDS = ConnectionGuard(
    header_timeout_s=0, http_send_timeout_s=0, ws_send_timeout_s=0, max_connections=0
)
PROTOCOLS: dict[str, Callable[..., HttpToolsProtocol]] = {
    "guarded": functools.partial(GuardedHttpProtocol, guard=NO_GUARDS),
    "uvicorn": HttpToolsProtocol,
}
GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
POST = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"


class RecordingTransport(asyncio.Transport):
    """A transport that keeps each write apart (on a socket: one system call each)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.writes.append(b"".join(list_of_data))  # one writev

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0


class Connection:
    """One connection to ``app`` through the protocol named ``kind``."""

    def __init__(self, kind: str, app: App) -> None:
        config = Config(
            app=app, interface="asgi3", log_config=None, proxy_headers=False, lifespan="off"
        )
        self.state = ServerState()
        self.transport = RecordingTransport()
        self.protocol = PROTOCOLS[kind](config=config, server_state=self.state, app_state={})
        self.protocol.connection_made(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def lose(self) -> None:
        """The client is gone (a reset): what the event loop tells the protocol."""
        self.transport.closing = True
        self.protocol.connection_lost(ConnectionResetError())

    async def served(self) -> None:
        """Wait for the requests' tasks, then for what they scheduled to run."""
        await within(asyncio.gather(*self.state.tasks))
        await loop_turn()


async def within(awaitable: Awaitable[object]) -> None:
    """Await what the test waits for; a hang fails the test after 5 s instead of hanging."""
    await asyncio.wait_for(awaitable, 5.0)


async def loop_turn() -> None:
    """Let the callbacks scheduled so far (``call_soon``) run: await a future one resolves."""
    loop = asyncio.get_running_loop()
    turned: asyncio.Future[None] = loop.create_future()
    loop.call_soon(turned.set_result, None)
    await turned


async def answer(kind: str, app: App, request: bytes = GET) -> list[bytes]:
    connection = Connection(kind, app)
    connection.send(request)
    await connection.served()
    return connection.transport.writes


async def json_answer(scope: Scope, receive: Receive, send: Send) -> None:
    await json_response({"id": "chatcmpl-1", "choices": []}, headers={"x-stream-id": "s"})(
        scope, receive, send
    )


async def error_answer(scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(RateLimited("slow down", retry_after_s=3))(scope, receive, send)


async def failing_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("a bug before the response")  # uvicorn answers its own 500


@pytest.mark.parametrize("app", [json_answer, error_answer, failing_app])
async def test_a_json_or_error_answer_is_one_write_of_the_same_bytes(app: App) -> None:
    """A JSON answer, an error, uvicorn's own 500: the guarded protocol writes uvicorn's bytes
    exactly, head and body in one write instead of two."""
    uvicorn_writes = await answer("uvicorn", app)
    guarded_writes = await answer("guarded", app)
    assert len(uvicorn_writes) == 2
    assert guarded_writes == [b"".join(uvicorn_writes)]


async def test_the_head_waits_for_the_body_within_the_step_only() -> None:
    """The head is held while the app runs on, then goes alone when the step ends without a
    body; the body follows in its own write."""
    writes_seen: list[int] = []
    body_due: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    head_sent = asyncio.Event()

    async def slow_body(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        writes_seen.append(len(connection.transport.writes))
        head_sent.set()
        await body_due
        await send({"type": "http.response.body", "body": b"late", "more_body": False})

    connection = Connection("guarded", slow_body)
    connection.send(GET)
    await within(head_sent.wait())
    assert writes_seen == [0]  # held during the app's step
    assert len(connection.transport.writes) == 1  # and written when the step ended
    assert connection.transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert connection.transport.writes[0].endswith(b"\r\n\r\n")
    body_due.set_result(None)
    await connection.served()
    assert connection.transport.writes[1:] == [b"4\r\nlate\r\n0\r\n\r\n"]


async def test_a_head_answer_and_a_100_continue_go_at_once() -> None:
    """A HEAD answer has no body to wait for, and ``100 Continue`` precedes any response:
    both are written during the step that makes them."""
    writes_seen: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST":
            await receive()  # sends 100 Continue
            writes_seen.append(len(connection.transport.writes))
        await PlainTextResponse("hello")(scope, receive, send)
        writes_seen.append(len(connection.transport.writes))

    connection = Connection("guarded", app)
    connection.send(b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n")
    await connection.served()
    assert writes_seen == [1]
    assert connection.transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")

    writes_seen.clear()
    connection = Connection("guarded", app)
    connection.send(
        b"POST /x HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    await loop_turn()
    assert connection.transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    connection.send(b"{}")
    await connection.served()
    assert writes_seen == [1, 2]  # 100 Continue, then the answer in one write
    assert connection.transport.writes[1].endswith(b"\r\n\r\nhello")


class Guarded:
    """An app whose request waits in ``cancel_on_disconnect`` for ``release``; it notes what
    it saw (``receive`` calls, a cancellation, ``Disconnect.happened``)."""

    def __init__(self, *, respond_first: bool = False, gate: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.release: asyncio.Future[None] = loop.create_future()
        self.gate: asyncio.Future[None] | None = loop.create_future() if gate else None
        self.entered = asyncio.Event()
        self.respond_first = respond_first
        self.receive_calls = 0
        self.cancelled = False
        self.disconnect: Disconnect | None = None
        self.exchange: object = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted_receive() -> Message:
            self.receive_calls += 1
            return await receive()

        self.exchange = scope.get("extensions", {}).get(HTTP_EXTENSION)
        await receive()  # the request body, as the endpoints read it
        self.receive_calls = 0
        if self.gate is not None:
            await self.gate
        async with cancel_on_disconnect(scope, counted_receive) as disconnect:
            self.disconnect = disconnect
            if self.respond_first:
                await PlainTextResponse("done")(scope, receive, send)
            self.entered.set()
            try:
                await self.release
            except asyncio.CancelledError:
                self.cancelled = True
                raise

    @property
    def happened(self) -> bool:
        assert self.disconnect is not None
        return self.disconnect.happened


@pytest.mark.parametrize("kind", ["guarded", "uvicorn"])
async def test_a_lost_connection_cancels_the_guarded_block(kind: str) -> None:
    """A client gone while the block waits cancels it and the handler carries on: through the
    HttpExchange without calling receive (no watcher task) on the guarded protocol, through a
    task reading receive on uvicorn's."""
    app = Guarded()
    connection = Connection(kind, app)
    connection.send(POST)
    await within(app.entered.wait())
    connection.lose()
    await connection.served()
    assert app.cancelled and app.happened
    if kind == "guarded":
        assert isinstance(app.exchange, HttpExchange)
        assert app.receive_calls == 0
    else:
        assert app.exchange is None
        assert app.receive_calls >= 1


async def test_a_connection_lost_before_the_block_cancels_it_at_once() -> None:
    """Entering the block after the client left cancels it at its first wait."""
    app = Guarded(gate=True)
    connection = Connection("guarded", app)
    connection.send(POST)
    await loop_turn()
    connection.lose()
    assert app.gate is not None
    app.gate.set_result(None)
    await connection.served()
    assert app.cancelled and app.happened


async def test_a_block_that_never_waits_after_the_client_left_leaves_no_cancel_behind() -> None:
    """Entering the block after the client left, a block that ends without waiting (a stream
    that had already ended) is not cancelled, and no cancellation is left pending on the
    request's task: it can await after the block as any handler may."""
    after: list[str] = []
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await gate
        async with cancel_on_disconnect(scope, receive) as disconnect:
            pass  # nothing to wait for
        try:
            await loop_turn()
            after.append("awaited")
        except asyncio.CancelledError:
            after.append("cancelled")
            raise
        after.append(f"happened={disconnect.happened}")

    connection = Connection("guarded", app)
    connection.send(POST)
    await loop_turn()
    connection.lose()
    gate.set_result(None)
    await connection.served()
    assert after == ["awaited", "happened=False"]


async def test_a_lost_connection_after_the_response_is_complete_cancels_nothing() -> None:
    """The block wrote the whole response: a client that leaves afterwards misses nothing,
    so the block is not cancelled."""
    app = Guarded(respond_first=True)
    connection = Connection("guarded", app)
    connection.send(POST)
    await within(app.entered.wait())
    connection.lose()
    await loop_turn()
    app.release.set_result(None)
    await connection.served()
    assert not app.cancelled and not app.happened
    assert connection.transport.writes[0].endswith(b"\r\n\r\ndone")


async def test_a_block_that_ended_leaves_no_callback_behind() -> None:
    """Once the block has exited, losing the connection does not touch the handler's task."""
    exited = asyncio.Event()
    release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    cancelled: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        async with cancel_on_disconnect(scope, receive):
            pass
        exited.set()
        try:
            await release
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        await PlainTextResponse("late")(scope, receive, send)

    connection = Connection("guarded", app)
    connection.send(POST)
    await within(exited.wait())
    connection.lose()
    await loop_turn()
    assert cancelled == [] and not release.done()
    release.set_result(None)
    await connection.served()


async def test_entering_the_block_resumes_reading_paused_for_a_pipelined_request() -> None:
    """uvicorn stops reading while a pipelined request waits; watching for the client's
    hang-up resumes it (as receive() does), or a hang-up would go unseen."""
    app = Guarded()
    connection = Connection("guarded", app)
    connection.send(POST + GET)  # the GET waits behind the POST
    assert not connection.transport.reading
    await within(app.entered.wait())
    assert connection.transport.reading
    connection.lose()
    await connection.served()
    assert app.cancelled and app.happened


async def test_a_request_has_one_lost_callback_at_a_time() -> None:
    """A second callback while one is registered is a bug (RuntimeError); after discard()
    another may be registered, and only that one runs when the connection is lost."""
    ran: list[str] = []
    exchanges: list[HttpExchange] = []
    registered = asyncio.Event()
    release: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        exchange = scope["extensions"][HTTP_EXTENSION]
        exchanges.append(exchange)
        exchange.on_lost(lambda: ran.append("first"))
        with pytest.raises(RuntimeError):
            exchange.on_lost(lambda: ran.append("second"))
        exchange.discard()
        exchange.on_lost(lambda: ran.append("third"))
        registered.set()
        await release

    connection = Connection("guarded", app)
    connection.send(GET)
    await within(registered.wait())
    connection.lose()
    assert ran == ["third"]
    release.set_result(None)
    await connection.served()


@pytest.mark.parametrize("kind", ["guarded", "uvicorn"])
async def test_a_served_request_is_freed_without_the_garbage_collector(kind: str) -> None:
    """The exchange and the writer hold the request's cycle weakly: once the next request
    has replaced it, reference counting alone frees it (no cycle left to the collector)."""

    async def guarded_json(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        async with cancel_on_disconnect(scope, receive):
            await loop_turn()
        await json_answer(scope, receive, send)

    connection = Connection(kind, guarded_json)
    gc.disable()
    try:
        connection.send(POST)
        await connection.served()
        first = weakref.ref(connection.protocol.cycle)
        connection.send(POST)
        await connection.served()
        assert first() is None
    finally:
        gc.enable()
