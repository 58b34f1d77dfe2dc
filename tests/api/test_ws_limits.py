"""What ``/v1/ws/chat`` does about clients that break its rules or limits, over real sockets
against live gateways (docs/websocket-protocol.md): a request over the per-socket cap gets its
own 429; every documented bad input gets its result (a close code, or an error reply on a socket
that stays open) and leaves the gateway serving; a slow reader costs no memory and gets merged
chunks while one that reads nothing is dropped; a socket left idle closes with 1000.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
from tests.api.conftest import (
    await_until,
    bearer,
    chat,
    check_envelope_request,
    compatible_works,
    content_of,
    create,
    expected,
    next_reply,
    read_compatible,
    read_envelopes,
    read_until_closed,
    recv_json,
    recv_text,
    still_open,
    usage_of,
    ws_url,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tokenwire.testing import FAST_SIM, GatewayServer

# -- the per-socket cap ------------------------------------------------------------------------


@pytest.fixture
def cap_gateway(gateway_factory: Callable[[str, str], GatewayServer]) -> GatewayServer:
    """At most 2 requests at once per socket; the default sim (20 ms a token)."""
    return gateway_factory("cap", "[server]\nws_max_concurrent_requests = 2\n")


async def test_third_concurrent_request_over_the_cap_gets_429(cap_gateway: GatewayServer) -> None:
    """With a cap of 2, the third concurrent create gets its own 429; the others complete."""
    gateway = cap_gateway
    bodies = {f"c{i}": chat(f"capped {i}", max_tokens=10) for i in range(3)}
    async with connect(ws_url(gateway), additional_headers=bearer(gateway.api_key)) as ws:
        for request_id, body in bodies.items():
            await ws.send(create(request_id, body))
        messages = await read_envelopes(ws, set(bodies))
        errors = [m for m in messages if m["type"] == "error"]
        assert [e["request_id"] for e in errors] == ["c2"]
        error = errors[0]["error"]
        assert error["code"] == "too_many_concurrent_requests"
        assert error["status"] == 429
        assert error["type"] == "rate_limit_error"
        assert isinstance(error["retry_after_ms"], int)
        assert error["retry_after_ms"] > 0
        assert "2" in error["message"]
        assert not [m for m in messages if m["request_id"] == "c2" and m["type"] != "error"]
        for request_id in ("c0", "c1"):
            check_envelope_request(messages, request_id, bodies[request_id])
        await still_open(ws)
        # capacity is free again once they are done
        await ws.send(create("c2", bodies["c2"]))
        check_envelope_request(await read_envelopes(ws, {"c2"}), "c2", bodies["c2"])


# -- the bad-input battery ---------------------------------------------------------------------

STRICT_OVERRIDES = (
    FAST_SIM
    + """
[server]
ws_max_message_bytes = 1024
ws_messages_per_second = 20
"""
)


@dataclass(frozen=True)
class RawText:
    """A text frame whose payload is sent as these bytes, unchecked (may be invalid UTF-8)."""

    data: bytes


Frame = str | bytes | RawText


@dataclass(frozen=True)
class Closed:
    """The server closes with ``code``; with ``pongs``, only pongs (some, not all) arrive first."""

    code: int
    pongs: bool = False


@dataclass(frozen=True)
class ErrorReply:
    """An ``error`` message (exact status, code, param and request_id); the socket stays open."""

    status: int
    code: str | None
    param: str | None
    request_id: str | None = None
    type: str = "invalid_request_error"


@dataclass(frozen=True)
class CompatibleError:
    """Compatible mode: ``{"error": …}`` then ``[DONE]``; the socket stays open."""

    status: int
    code: str | None
    param: str | None


@dataclass(frozen=True)
class Case:
    name: str
    frames: tuple[Frame, ...]
    expect: Closed | ErrorReply | CompatibleError
    authenticated: bool = True


def _msg(**fields: Any) -> str:
    return json.dumps(fields)


PING = _msg(type="ping")
LONG = chat("keep running", max_tokens=2000)
BATTERY = [
    Case("binary frame", (b'{"type": "ping"}',), Closed(1003)),
    Case("invalid utf-8 text", (RawText(b'{"type": "ping", "x": "\xff\xfe"}'),), Closed(1007)),
    Case("not json", ("hello?",), Closed(1007)),
    Case("truncated json", ('{"type": "ping"',), Closed(1007)),
    Case("json array", ("[" + PING + "]",), Closed(1007)),
    Case("json string", ('"ping"',), Closed(1007)),
    Case("over ws_max_message_bytes", (_msg(type="ping", pad="x" * 2000),), Closed(1009)),
    Case("ping flood", (PING,) * 120, Closed(1008, pongs=True)),
    Case("ping before auth", (PING,), Closed(3000), authenticated=False),
    Case("chat before auth", (json.dumps(chat("x")),), Closed(3000), authenticated=False),
    Case(
        "create before auth",
        (create("r", chat("x")),),
        Closed(3000),
        authenticated=False,
    ),
    Case(
        "unknown type",
        (_msg(type="chat.completion.subscribe", request_id="u"),),
        ErrorReply(400, "unknown_message_type", "type"),
    ),
    Case(
        "missing request_id",
        (_msg(type="chat.completion.create", body=chat("x")),),
        ErrorReply(400, None, "request_id"),
    ),
    Case(
        "empty request_id",
        (_msg(type="chat.completion.create", request_id="", body=chat("x")),),
        ErrorReply(400, None, "request_id"),
    ),
    Case(
        "request_id over 128 characters",
        (_msg(type="chat.completion.create", request_id="r" * 129, body=chat("x")),),
        ErrorReply(400, None, "request_id"),
    ),
    Case(
        "body not an object",
        (_msg(type="chat.completion.create", request_id="b", body="hello"),),
        ErrorReply(400, None, "body", request_id="b"),
    ),
    Case(
        "duplicate request_id while running",
        (create("dup", LONG), create("dup", chat("again"))),
        ErrorReply(400, "duplicate_request_id", "request_id", "dup"),
    ),
    Case(
        "cancel unknown request_id",
        (_msg(type="chat.completion.cancel", request_id="ghost"),),
        ErrorReply(404, "unknown_request_id", "request_id", "ghost"),
    ),
    Case(
        "create with empty messages",
        (create("e", chat("x") | {"messages": []}),),
        ErrorReply(400, "invalid_value", "messages", "e"),
    ),
    Case(
        "create with an unknown role",
        (create("w", chat("x") | {"messages": [{"role": "wizard", "content": "x"}]}),),
        ErrorReply(400, "invalid_value", "messages[0].role", "w"),
    ),
    Case(
        "create with max_tokens -1",
        (create("m", chat("x", max_tokens=-1)),),
        ErrorReply(400, "invalid_value", "max_tokens", "m"),
    ),
    Case(
        "create with n=2",
        (create("n", chat("x", n=2)),),
        ErrorReply(400, "unsupported_value", "n", "n"),
    ),
    Case(
        "unknown model",
        (create("nm", chat("x") | {"model": "no-such-model"}),),
        ErrorReply(404, "model_not_found", "model", "nm"),
    ),
    Case(
        "model whose provider is not configured",
        (create("pu", chat("x") | {"model": "gpt-4.1"}),),
        ErrorReply(503, "provider_unavailable", None, "pu", type="api_error"),
    ),
    Case(
        "resume of an unknown stream",
        (
            _msg(
                type="chat.completion.resume",
                stream_id="chatcmpl-x",
                starting_after=3,
                request_id="rs",
            ),
        ),
        ErrorReply(404, "stream_not_found", "stream_id", "rs"),
    ),
    Case(
        "auth after header auth",
        (_msg(type="auth", api_key="tw-whatever"),),
        ErrorReply(400, "already_authenticated", None),
    ),
    Case(
        "compatible: empty messages",
        (json.dumps(chat("x") | {"messages": []}),),
        CompatibleError(400, "invalid_value", "messages"),
    ),
    Case(
        "compatible: unknown model",
        (json.dumps(chat("x") | {"model": "no-such-model"}),),
        CompatibleError(404, "model_not_found", "model"),
    ),
    Case(
        "compatible: temperature 3",
        (json.dumps(chat("x", temperature=3)),),
        CompatibleError(400, "invalid_value", "temperature"),
    ),
]


@pytest.fixture
def strict_gateway(gateway_factory: Callable[[str, str], GatewayServer]) -> GatewayServer:
    """Messages up to 1024 bytes, at most 20 per second (burst 40)."""
    return gateway_factory("strict", STRICT_OVERRIDES)


async def send_frame(ws: ClientConnection, frame: Frame) -> None:
    if isinstance(frame, RawText):
        await ws.send(frame.data, text=True)  # no UTF-8 check on the client side
    else:
        await ws.send(frame)


@pytest.mark.parametrize("case", BATTERY, ids=[c.name for c in BATTERY])
async def test_bad_input(strict_gateway: GatewayServer, case: Case) -> None:
    """Each bad input gets its documented result: a close code, or an error and an open socket."""
    headers = bearer(strict_gateway.api_key) if case.authenticated else {}
    async with connect(ws_url(strict_gateway), additional_headers=headers) as ws:
        try:
            for frame in case.frames:
                await send_frame(ws, frame)
        except ConnectionClosed:
            assert isinstance(case.expect, Closed), "the server closed on an error case"
        expect = case.expect
        if isinstance(expect, Closed):
            code, reason, received = await read_until_closed(ws)
            assert code == expect.code, (code, reason)
            assert len(reason.encode()) <= 123
            if expect.pongs:
                assert received, "no pong before the close"
                assert all(json.loads(m) == {"type": "pong"} for m in received)
                assert len(received) < len(case.frames)
            else:
                assert received == []
        elif isinstance(expect, ErrorReply):
            reply = await next_reply(ws, {"error"})
            assert reply.get("request_id") == expect.request_id
            assert ("request_id" in reply) == (expect.request_id is not None)
            error = reply["error"]
            assert error["status"] == expect.status
            assert error["code"] == expect.code
            assert error["param"] == expect.param
            assert error["type"] == expect.type
            assert error["message"]
            await still_open(ws)
        else:
            messages = [await recv_text(ws), await recv_text(ws)]
            error = json.loads(messages[0])
            assert set(error) == {"error"}
            assert error["error"]["status"] == expect.status
            assert error["error"]["code"] == expect.code
            assert error["error"]["param"] == expect.param
            assert messages[1] == "[DONE]"
            await still_open(ws)


async def test_a_fresh_socket_streams_after_the_battery(strict_gateway: GatewayServer) -> None:
    """After every bad input, the same gateway still streams, and no generation is left behind."""
    assert await await_until(lambda: not strict_gateway.state.completions.live, 5.0)
    body = chat("still alive after the battery", max_tokens=7)
    async with connect(
        ws_url(strict_gateway), additional_headers=bearer(strict_gateway.api_key)
    ) as ws:
        await compatible_works(ws, "still alive (compatible)")
        await ws.send(create("alive", body))
        check_envelope_request(await read_envelopes(ws, {"alive"}), "alive", body)


# -- flow control: a slow reader ---------------------------------------------------------------


@pytest.fixture
def reader_gateway(gateway_factory: Callable[[str, str], GatewayServer]) -> GatewayServer:
    """A gateway of its own for the slow-reader test: 0 ms to the first token, 1 ms between."""
    return gateway_factory("slowreader", FAST_SIM)


async def test_slow_reader_costs_no_memory_and_gets_merged_chunks(
    reader_gateway: GatewayServer,
) -> None:
    """A client that stops reading: memory stays flat, then all text arrives in fewer chunks."""
    gateway = reader_gateway
    body = chat("a thousand tokens for a slow reader", max_tokens=1000)
    sim = expected(body)
    request_id = "slow-reader-" + "r" * 116  # 128 characters: larger chunks fill buffers sooner
    # On loopback Linux sizes the gateway's kernel send buffer from the 64 KiB loopback MSS
    # (~4 MB), enough for the whole stream, so the gateway would never see backpressure. A
    # 536-byte MSS (the IPv4 default, as on a real path) and a small receive buffer keep the
    # kernel's share at a few hundred KB, as over a network.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
    process = psutil.Process()
    async with connect(
        ws_url(gateway), sock=sock, max_queue=4, additional_headers=bearer(gateway.api_key)
    ) as ws:
        await ws.send(create(request_id, body))
        first = await recv_json(ws)
        assert first["type"] == "chat.completion.chunk"
        gc.collect()
        rss_before = process.memory_info().rss
        # The client reads nothing until the generation has finished on the server...
        assert await await_until(lambda: first["id"] not in gateway.state.completions.live, 30.0)
        # ...and for a while after that (this is the slow client, not a synchronisation).
        await asyncio.sleep(0.5)
        gc.collect()
        grown = process.memory_info().rss - rss_before
        messages = [first, *await read_envelopes(ws, {request_id})]
    assert grown < 5 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"
    chunks, done = messages[:-1], messages[-1]
    assert done["type"] == "chat.completion.done"
    assert done["finish_reason"] == "length"
    assert done["usage"] == usage_of(sim)
    assert done["sequence_number"] == 1002
    assert content_of(chunks) == sim.text
    assert len(chunks) < 1000, f"{len(chunks)} chunk messages: nothing was merged"
    numbers = [c["sequence_number"] for c in chunks]
    assert numbers == sorted(set(numbers))
    text_numbers = [c["sequence_number"] for c in chunks if c["choices"][0]["delta"].get("content")]
    assert text_numbers[-1] == 1000  # a merged delta carries the number of its last token
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["sequence_number"] == 1001


@pytest.fixture
def stuck_gateway(gateway_factory: Callable[[str, str], GatewayServer]) -> GatewayServer:
    """A client that accepts nothing for 0.5 s is dropped."""
    return gateway_factory("stuck", FAST_SIM + "\n[server]\nws_send_timeout_s = 0.5\n")


async def test_client_that_reads_nothing_is_dropped_and_its_request_cancelled(
    stuck_gateway: GatewayServer,
) -> None:
    """Past ws_send_timeout_s with nothing accepted, the socket ends and the upstream stops."""
    gateway = stuck_gateway
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
    async with connect(
        ws_url(gateway), sock=sock, max_queue=1, additional_headers=bearer(gateway.api_key)
    ) as ws:
        await ws.send(create("flood-" + "x" * 120, chat("never read me", max_tokens=50000)))
        first = await recv_json(ws)
        # From here on the client reads nothing; the server must give up on it by itself.
        assert await await_until(lambda: first["id"] not in gateway.state.completions.live, 20.0)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    # 1013 when the close frame still fits in the socket's buffers, else the TCP close (1006).
    assert closed.value.rcvd is None or closed.value.rcvd.code == 1013


# -- the idle timeout --------------------------------------------------------------------------

IDLE_OVERRIDES = FAST_SIM + "\n[server]\nws_idle_timeout_s = 0.3\n"


@pytest.fixture
def idle_gateway(gateway_factory: Callable[[str, str], GatewayServer]) -> GatewayServer:
    """Sockets with no request and no message for 0.3 s are closed."""
    return gateway_factory("idle", IDLE_OVERRIDES)


async def test_idle_socket_closes_1000(idle_gateway: GatewayServer) -> None:
    """A socket with no request and no message for ws_idle_timeout_s closes with 1000."""
    started = time.monotonic()
    async with connect(ws_url(idle_gateway), additional_headers=bearer(idle_gateway.api_key)) as ws:
        code, reason, received = await read_until_closed(ws, within=5.0)
    took = time.monotonic() - started
    assert (code, received) == (1000, [])
    assert "idle" in reason
    assert 0.25 <= took < 5.0


async def test_idle_timeout_counts_from_the_end_of_the_last_request(
    idle_gateway: GatewayServer,
) -> None:
    """After an envelope request has finished, a socket left idle closes with 1000."""
    body = chat("then nothing", max_tokens=3)
    async with connect(ws_url(idle_gateway), additional_headers=bearer(idle_gateway.api_key)) as ws:
        await ws.send(create("only", body))
        check_envelope_request(await read_envelopes(ws, {"only"}), "only", body)
        code, reason, received = await read_until_closed(ws, within=5.0)
    assert (code, received) == (1000, [])
    assert "idle" in reason


async def test_a_long_compatible_request_is_not_idle(idle_gateway: GatewayServer) -> None:
    """A compatible-mode request that streams for longer than the idle timeout completes."""
    body = chat("a long compatible answer", max_tokens=600)  # >= 0.6 s at 1 ms a token
    async with connect(ws_url(idle_gateway), additional_headers=bearer(idle_gateway.api_key)) as ws:
        await ws.send(json.dumps(body))
        try:
            chunks = await read_compatible(ws)
        except ConnectionClosed as exc:
            pytest.fail(f"the socket closed mid-stream: {exc.rcvd}")
    assert content_of(chunks) == expected(body).text
