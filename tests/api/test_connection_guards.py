"""Connection guards against hostile clients (``tokenwire.protocols``), over real sockets.

Slow-header (slowloris) connections are closed after ``server.header_timeout_s`` while normal
clients are served; SSE streams and WebSockets whose client stops reading are aborted once
their writes have been blocked for the send timeout; connections over
``server.max_connections`` get a 503.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import requests
from websockets.asyncio.client import ClientConnection, connect

from tokenwire.testing import FAST_SIM, GatewayServer, sim_plan
from tokenwire.wire.sse import SSEParser

SLOW_CLIENTS = 300


async def until(predicate: Callable[[], bool], deadline_s: float) -> bool:
    """Poll an observable condition until it holds or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def open_connections(gateway: GatewayServer) -> int:
    """Connections the gateway's server holds open (HTTP and WebSocket)."""
    return len(gateway._server.server_state.connections)


@pytest.fixture(scope="module")
def header_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """Request headers must be complete within 1 s."""
    overrides = FAST_SIM + "\n[server]\nheader_timeout_s = 1.0\n"
    with GatewayServer(tmp_path_factory.mktemp("headers"), overrides=overrides) as gateway:
        yield gateway


async def slowloris(port: int, closed: list[float]) -> None:
    """Start a request and send one more header byte every 0.3 s until the server hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")

    async def trickle() -> None:
        while True:
            await asyncio.sleep(0.3)  # the slow client's pace, not a synchronisation
            writer.write(b"a")

    trickler = asyncio.create_task(trickle())
    try:
        data = await reader.read(65536)
        assert data == b"", f"the server answered an incomplete request: {data[:80]!r}"
    except ConnectionResetError:
        pass
    finally:
        closed.append(time.monotonic())
        trickler.cancel()
        writer.close()


async def test_slow_header_connections_are_closed_while_normal_clients_are_served(
    header_gateway: GatewayServer,
) -> None:
    """300 clients trickling header bytes (and 20 silent ones) are all closed after header_timeout_s; a normal client is served meanwhile."""
    gateway = header_gateway
    baseline = open_connections(gateway)
    closed: list[float] = []
    started = time.monotonic()
    slow = [asyncio.create_task(slowloris(gateway.port, closed)) for _ in range(SLOW_CLIENTS)]
    silent = [
        await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(20)
    ]  # connect and send nothing at all
    try:
        assert await until(lambda: open_connections(gateway) >= baseline + SLOW_CLIENTS, 20.0)
        response = await asyncio.to_thread(
            requests.get,
            gateway.base_url + "/v1/models",
            headers={"Authorization": f"Bearer {gateway.api_key}", "Connection": "close"},
            timeout=10,
        )
        assert response.status_code == 200
        done, pending = await asyncio.wait(slow, timeout=30.0)
        assert not pending, f"{len(pending)} slow-header connections still open after 30 s"
        for task in done:
            task.result()
        for reader, _writer in silent:
            async with asyncio.timeout(30.0):
                assert await reader.read(1) == b""
        assert await until(lambda: open_connections(gateway) <= baseline, 10.0)
    finally:
        for task in slow:
            task.cancel()
        for _reader, writer in silent:
            writer.close()
    # none was closed before it had its header_timeout_s
    assert min(closed) - started >= 0.9


async def test_keep_alive_connections_are_not_cut_by_the_header_timeout(
    header_gateway: GatewayServer,
) -> None:
    """A keep-alive connection that finished a request may stay idle past header_timeout_s and send the next one."""
    gateway = header_gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    request = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"
    try:
        for turn in range(2):
            if turn:
                await asyncio.sleep(1.5)  # the client idles longer than header_timeout_s
            writer.write(request)
            status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            headers = {}
            while (line := await reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            await reader.readexactly(int(headers["content-length"]))
    finally:
        writer.close()


async def test_streams_and_websockets_outlive_the_header_timeout(
    header_gateway: GatewayServer,
) -> None:
    """Once its headers are in, an SSE stream or a WebSocket may last longer than header_timeout_s."""
    gateway = header_gateway
    # about 1.5 s of tokens at 1 ms each, on both transports
    body = {"model": "sim", "max_tokens": 1500, "messages": [{"role": "user", "content": "long"}]}
    response = await asyncio.to_thread(
        requests.post,
        gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gateway.api_key}", "Connection": "close"},
        json={**body, "stream": True},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.text.endswith("data: [DONE]\n\n")
    ws_url = "ws" + gateway.base_url.removeprefix("http") + "/v1/ws/chat"
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    async with connect(ws_url, additional_headers=headers) as ws:
        await ws.send(json.dumps(body))
        started = time.monotonic()
        async with asyncio.timeout(30):
            while await ws.recv() != "[DONE]":
                pass
        assert time.monotonic() - started > 1.0  # the socket lived past the header timeout


@pytest.fixture
def capped_gateway(tmp_path: Path) -> Iterator[GatewayServer]:
    """At most 5 open connections."""
    overrides = FAST_SIM + "\n[server]\nmax_connections = 5\n"
    with GatewayServer(tmp_path / "capped", overrides=overrides) as gateway:
        yield gateway


async def test_connections_over_max_connections_get_503(capped_gateway: GatewayServer) -> None:
    """With 5 connections open, a sixth gets 503 at once; once they close, requests are served again."""
    gateway = capped_gateway
    held = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(5)]
    try:
        assert await until(lambda: open_connections(gateway) >= 5, 10.0)
        refused = await asyncio.to_thread(requests.get, gateway.base_url + "/healthz", timeout=10)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
    finally:
        for _reader, writer in held:
            writer.close()
    assert await until(lambda: open_connections(gateway) == 0, 10.0)
    served = await asyncio.to_thread(requests.get, gateway.base_url + "/healthz", timeout=10)
    assert served.status_code == 200


# -- clients that stop reading -------------------------------------------------------------------

STUCK_STREAMS = 200  # SSE streams, and as many WebSockets
TOKENS = 1000


@pytest.fixture(scope="module")
def stall_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """Writes blocked for 1 s abort the connection; accepted sockets get a small send buffer."""
    overrides = FAST_SIM + "\n[server]\nsse_send_timeout_s = 1.0\nws_send_timeout_s = 1.0\n"
    with GatewayServer(tmp_path_factory.mktemp("stall"), overrides=overrides) as gateway:
        # On loopback Linux autotunes a socket's send buffer to megabytes, enough for a whole
        # stream; a small one (inherited by accepted sockets) gives backpressure as a network would.
        for listening in gateway._server.servers[0].sockets:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        yield gateway


async def small_socket(port: int) -> socket.socket:
    """A connected socket with a small receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def stuck_sse(gateway: GatewayServer, content: str) -> socket.socket:
    """Start an SSE stream, read its first bytes, then read nothing more."""
    sock, _ = await start_sse(gateway, content)
    return sock


async def start_sse(gateway: GatewayServer, content: str) -> tuple[socket.socket, bytes]:
    """Start an SSE stream of ``TOKENS`` tokens on a small socket: it and its first bytes."""
    sock = await small_socket(gateway.port)
    body = json.dumps(
        {
            "model": "sim",
            "stream": True,
            "max_tokens": TOKENS,
            "messages": [{"role": "user", "content": content}],
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {gateway.api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, head + body)
    first = await loop.sock_recv(sock, 64)
    assert first.startswith(b"HTTP/1.1 200"), first
    return sock, first


def dechunk(body: bytes) -> bytes:
    """The payload of a complete chunked HTTP body."""
    out = bytearray()
    position = 0
    while True:
        end = body.index(b"\r\n", position)
        size = int(body[position:end], 16)
        position = end + 2
        if size == 0:
            return bytes(out)
        out += body[position : position + size]
        position += size + 2


@pytest.fixture
def backpressure_gateway(tmp_path: Path) -> Iterator[GatewayServer]:
    """Small socket send buffers (as ``stall_gateway``), an instant simulator, and send
    timeouts long enough for a client that pauses."""
    overrides = """
[providers.sim]
kind = "sim"
ttft_ms = 0.0
itl_ms = 0.0

[server]
sse_send_timeout_s = 30.0
"""
    with GatewayServer(tmp_path, overrides=overrides) as gateway:
        for listening in gateway._server.servers[0].sockets:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        yield gateway


async def test_an_sse_client_that_pauses_gets_every_event_once(
    backpressure_gateway: GatewayServer,
) -> None:
    """A client that reads nothing until its whole answer is generated, then reads on: the
    answer (~180 KB) cannot fit in the small socket buffers and the transport's, so the
    connection stops taking data while the log holds the rest; the client then gets every
    token once, in order, and ``[DONE]``."""
    gateway = backpressure_gateway
    sock, first = await start_sse(gateway, "pause")
    loop = asyncio.get_running_loop()
    assert await until(lambda: not gateway.state.completions.live, 30.0)  # all generated
    received = bytearray(first)
    async with asyncio.timeout(30):
        while not received.endswith(b"0\r\n\r\n"):
            data = await loop.sock_recv(sock, 65536)
            assert data, "the gateway closed the connection"
            received += data
    sock.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    events = SSEParser().feed(dechunk(body))
    assert events[-1].data == "[DONE]"
    ids = [int(event.id) for event in events[:-1] if event.id is not None]
    assert ids == sorted(set(ids)), "an event repeated or out of order"
    text = "".join(
        choice["delta"].get("content") or ""
        for event in events[:-1]
        for choice in json.loads(event.data)["choices"]
    )
    request = {
        "model": "sim",
        "max_tokens": TOKENS,
        "messages": [{"role": "user", "content": "pause"}],
    }
    assert text == sim_plan(request).text


async def stuck_ws(gateway: GatewayServer, content: str) -> ClientConnection:
    """Start an envelope request on a WebSocket, read one message, then read nothing more."""
    ws = await connect(
        "ws" + gateway.base_url.removeprefix("http") + "/v1/ws/chat",
        sock=await small_socket(gateway.port),
        max_queue=1,
        additional_headers={"Authorization": f"Bearer {gateway.api_key}"},
    )
    body = {
        "model": "sim",
        "max_tokens": TOKENS,
        "messages": [{"role": "user", "content": content}],
    }
    request_id = "stuck-" + "w" * 120  # large envelopes fill the buffers sooner
    await ws.send(
        json.dumps({"type": "chat.completion.create", "request_id": request_id, "body": body})
    )
    assert json.loads(await ws.recv())["type"] == "chat.completion.chunk"
    return ws


async def test_clients_that_stop_reading_are_closed_after_the_send_timeout(
    stall_gateway: GatewayServer,
) -> None:
    """200 SSE streams and 200 WebSockets whose clients read nothing: memory stays bounded, every generation ends, and each connection is aborted after its send timeout."""
    gateway = stall_gateway
    baseline = open_connections(gateway)
    process = psutil.Process()
    gc.collect()
    rss_before = process.memory_info().rss
    sockets: list[socket.socket] = []
    sockets_ws: list[ClientConnection] = []
    try:
        sockets = list(
            await asyncio.gather(*(stuck_sse(gateway, f"sse {i}") for i in range(STUCK_STREAMS)))
        )
        sockets_ws = list(
            await asyncio.gather(*(stuck_ws(gateway, f"ws {i}") for i in range(STUCK_STREAMS)))
        )
        live = gateway.state.completions.live
        # The generations run to their end although nobody reads (their logs are bounded)...
        assert await until(lambda: not live, 120.0), f"{len(live)} generations still live"
        # ...and the connections blocked on a full window are aborted after the send timeout.
        assert await until(lambda: open_connections(gateway) <= baseline, 30.0), (
            f"{open_connections(gateway) - baseline} stuck connections still open"
        )
        grown = process.memory_info().rss - rss_before
    finally:
        for sock in sockets:
            sock.close()
        for ws in sockets_ws:
            ws.transport.abort()
    # 400 streams of 1,000 events plus a 64 KiB write buffer each, with room to spare
    assert grown < 300 * 1024 * 1024, f"RSS grew by {grown / 1e6:.0f} MB"
