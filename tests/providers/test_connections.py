"""The upstream HTTP/1.1 client (providers/connections.py) against a raw asyncio server.

The server is a few lines of asyncio that read each request and answer with exactly the bytes
a test scripts, so keep-alive, chunked and close-delimited bodies, a reply cut short, a
malformed one, silence and slow readers are all under the test's control.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme

from tokenwire.providers.connections import (
    ConnectFailed,
    ReadTimeout,
    ReplyBroken,
    UpstreamPool,
    UpstreamResponse,
)
from tokenwire.testing import eventually

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]
"""Answers one request (its body given); returns whether to keep the connection for another."""

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


END = b"0\r\n\r\n"


@dataclass
class RawServer:
    """A loopback server that answers every request with ``script``; counts connections."""

    script: Script
    port: int = 0
    connections: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.script(reader, writer, body):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.closed.set()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script, tls: ssl.SSLContext | None = None) -> RawServer:
        raw = RawServer(script)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        raw.port = server.sockets[0].getsockname()[1]
        return raw

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def pool(**options: float) -> UpstreamPool:
    settings = {"connect_timeout_s": 5.0, "idle_timeout_s": 30.0, "max_connections": 0.0}
    settings.update(options)
    return UpstreamPool(
        connect_timeout_s=settings["connect_timeout_s"],
        idle_timeout_s=settings["idle_timeout_s"],
        max_connections=int(settings["max_connections"]),
        keepalive_timeout_s=settings.get("keepalive_timeout_s", 4.0),
    )


async def sse_reply(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
    writer.write(SSE_HEAD + chunk(b"data: " + body + b"\n\n") + chunk(b"data: [DONE]\n\n") + END)
    await writer.drain()
    return True


async def read_all(response: object) -> bytes:
    assert isinstance(response, UpstreamResponse)
    parts = []
    while data := await response.readany():
        parts.append(data)
    return b"".join(parts)


async def test_replies_stream_and_the_connection_is_reused(serve: Callable[..., Any]) -> None:
    """Three requests in a row: each reply's chunked body arrives whole, the request carries
    its body, Host and Content-Length, and one keep-alive connection serves all three."""
    server = await serve(sse_reply)
    upstream = pool()
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    for n in range(3):
        response = await upstream.post(url, b'{"n":%d}' % n, {"authorization": "Bearer k"})
        assert response.status == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert await read_all(response) == b'data: {"n":%d}\n\ndata: [DONE]\n\n' % n
        response.release()
    assert server.connections == 1
    request = server.requests[0].decode()
    assert request.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{server.port}\r\n" in request
    assert "authorization: Bearer k\r\n" in request and "content-length: 7\r\n" in request
    await upstream.aclose()


async def test_a_reply_released_before_its_end_is_read_through_and_pooled(
    serve: Callable[..., Any],
) -> None:
    """A reader that stops at ``[DONE]`` releases the reply before the chunked terminator has
    come; the terminator, sent only afterwards, is read in the background and the next
    request goes over the same connection."""
    release_done = asyncio.Event()

    async def split(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, _b: bytes) -> bool:
        writer.write(SSE_HEAD + chunk(b"data: [DONE]\n\n"))
        await writer.drain()
        await release_done.wait()
        release_done.clear()
        writer.write(END)
        await writer.drain()
        return True

    server = await serve(split)
    upstream = pool()
    url = f"http://127.0.0.1:{server.port}/"
    for _ in range(2):
        response = await upstream.post(url, b"{}", {})
        assert await response.readany() == b"data: [DONE]\n\n"
        response.release()
        release_done.set()
        assert await eventually(lambda: upstream.idle_connections == 1)  # terminator read
    assert server.connections == 1
    await upstream.aclose()


async def test_connection_close_and_close_delimited_bodies(serve: Callable[..., Any]) -> None:
    """A reply with ``Connection: close`` and no length ends with the connection: its body is
    read to the end, and the next request opens a new connection."""

    async def until_close(
        _r: asyncio.StreamReader, writer: asyncio.StreamWriter, _b: bytes
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it, then EOF")
        await writer.drain()
        return False

    server = await serve(until_close)
    upstream = pool()
    for _ in range(2):
        response = await upstream.post(f"http://127.0.0.1:{server.port}/", b"", {})
        assert await read_all(response) == b"all of it, then EOF"
        response.release()
    assert server.connections == 2
    await upstream.aclose()


async def test_informational_replies_are_skipped(serve: Callable[..., Any]) -> None:
    """A ``103 Early Hints`` before the reply is not taken for the reply."""

    async def hints(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, _b: bytes) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\ncontent-length: 4\r\n\r\nslow"
        )
        await writer.drain()
        return True

    server = await serve(hints)
    upstream = pool()
    response = await upstream.post(f"http://127.0.0.1:{server.port}/", b"", {})
    assert response.status == 429 and response.headers == {
        "retry-after": "3",
        "content-length": "4",
    }
    assert await response.read(65536) == b"slow"
    response.release()
    await upstream.aclose()


async def test_a_stale_pooled_connection_is_not_used_and_idle_ones_are_swept(
    serve: Callable[..., Any],
) -> None:
    """A pooled connection idle past ``keepalive_timeout_s`` is closed instead of reused, and
    the sweep closes idle connections nobody asks for."""
    server = await serve(sse_reply)
    upstream = pool(keepalive_timeout_s=0.05)
    url = f"http://127.0.0.1:{server.port}/"
    response = await upstream.post(url, b"{}", {})
    await read_all(response)
    response.release()
    assert upstream.idle_connections == 1
    await asyncio.wait_for(server.closed.wait(), 5)  # the sweep closed it
    assert upstream.open_connections == 0
    response = await upstream.post(url, b"{}", {})
    await read_all(response)
    response.release()
    assert server.connections == 2
    await upstream.aclose()


async def test_max_connections_makes_requests_wait_their_turn(serve: Callable[..., Any]) -> None:
    """With ``max_connections=1`` a second request waits until the first reply is released,
    then takes over its connection: never two open at once."""
    go_on = asyncio.Event()

    async def held(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(SSE_HEAD + chunk(body))
        await writer.drain()
        await go_on.wait()
        writer.write(END)
        await writer.drain()
        return True

    server = await serve(held)
    upstream = pool(max_connections=1)
    url = f"http://127.0.0.1:{server.port}/"
    first = await upstream.post(url, b"1", {})
    second = asyncio.create_task(upstream.post(url, b"2", {}))
    assert await eventually(lambda: upstream.waiting_requests == 1)
    assert not second.done() and upstream.open_connections == 1
    go_on.set()
    assert await read_all(first) == b"1"
    first.release()
    reply = await asyncio.wait_for(second, 5)
    assert await read_all(reply) == b"2"
    reply.release()
    assert server.connections == 1
    await upstream.aclose()


async def test_nothing_listening_is_a_connect_failure(unused_tcp_port: int) -> None:
    """A refused connection is :class:`ConnectFailed`: the request was provably not sent."""
    upstream = pool()
    with pytest.raises(ConnectFailed, match="ConnectionRefusedError"):
        await upstream.post(f"http://127.0.0.1:{unused_tcp_port}/", b"{}", {})
    assert upstream.open_connections == 0


async def test_replies_cut_short_or_malformed_are_broken(serve: Callable[..., Any]) -> None:
    """A connection closed mid-body, or bytes that are not HTTP, fail the read with
    :class:`ReplyBroken`, and the connection is not pooled."""

    async def cut(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, _b: bytes) -> bool:
        writer.write(SSE_HEAD + chunk(b"data: one\n\n"))
        await writer.drain()
        return False

    async def garbage(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, _b: bytes) -> bool:
        writer.write(SSE_HEAD + b"zz\r\nnot a chunk size\r\n")
        await writer.drain()
        return True

    for script in (cut, garbage):
        server = await serve(script)
        upstream = pool()
        response = await upstream.post(f"http://127.0.0.1:{server.port}/", b"{}", {})
        with pytest.raises(ReplyBroken):
            while await response.readany():
                pass
        response.release()
        assert upstream.idle_connections == 0
        await upstream.aclose()


async def test_silence_is_a_read_timeout(serve: Callable[..., Any]) -> None:
    """Headers, then nothing for ``idle_timeout_s``: the waiting read fails with
    :class:`ReadTimeout` (a ``TimeoutError``) and the connection is closed."""
    hold = asyncio.Event()

    async def silent(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, _b: bytes) -> bool:
        writer.write(SSE_HEAD)
        await writer.drain()
        await hold.wait()
        return False

    server = await serve(silent)
    upstream = pool(idle_timeout_s=0.1)
    response = await upstream.post(f"http://127.0.0.1:{server.port}/", b"{}", {})
    with pytest.raises(ReadTimeout):
        await response.readany()
    assert upstream.open_connections == 0
    hold.set()


async def test_a_cancelled_request_closes_its_connection(serve: Callable[..., Any]) -> None:
    """A request cancelled while it waits for the reply's headers drops its connection (the
    upstream sees the close), and nothing is pooled."""
    arrived = asyncio.Event()

    async def never(reader: asyncio.StreamReader, _w: asyncio.StreamWriter, _b: bytes) -> bool:
        arrived.set()
        await reader.read()  # until the client closes
        return False

    server = await serve(never)
    upstream = pool()
    task = asyncio.create_task(upstream.post(f"http://127.0.0.1:{server.port}/", b"{}", {}))
    await asyncio.wait_for(arrived.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server.closed.wait(), 5)
    assert upstream.open_connections == 0 and upstream.idle_connections == 0


async def test_a_slow_reader_pauses_the_socket_and_loses_nothing(
    serve: Callable[..., Any],
) -> None:
    """Four MiB sent at once while the reader reads nothing: reading from the socket pauses
    (the buffer stays bounded), and everything arrives, in order, once it reads."""
    payload = bytes(range(256)) * 16384  # 4 MiB

    async def flood(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, _b: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload))
        writer.write(payload)
        await writer.drain()
        return True

    server = await serve(flood)
    upstream = pool()
    response = await upstream.post(f"http://127.0.0.1:{server.port}/", b"{}", {})
    assert await eventually(lambda: response.reading_paused)  # written while nobody reads
    assert response.buffered_bytes <= 1024 * 1024
    assert await read_all(response) == payload
    response.release()
    assert upstream.idle_connections == 1
    await upstream.aclose()


async def test_https_upstreams_are_verified(serve: Callable[..., Any]) -> None:
    """``https`` URLs go over TLS with the certificate checked against ``tls``; a certificate
    the pool does not trust is a connect failure (nothing sent)."""
    authority = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_tls)
    server = await serve(sse_reply, server_tls)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    upstream = UpstreamPool(connect_timeout_s=5, idle_timeout_s=30, max_connections=0, tls=trusting)
    response = await upstream.post(f"https://127.0.0.1:{server.port}/", b"{}", {})
    assert await read_all(response) == b"data: {}\n\ndata: [DONE]\n\n"
    response.release()
    await upstream.aclose()
    with pytest.raises(ConnectFailed):
        await pool().post(f"https://127.0.0.1:{server.port}/", b"{}", {})


async def test_a_header_with_a_line_break_is_refused(serve: Callable[..., Any]) -> None:
    """A provider header value carrying CR/LF (an injected header) is refused before anything
    is sent."""
    server = await serve(sse_reply)
    upstream = pool()
    with pytest.raises(ValueError, match="line break"):
        await upstream.post(f"http://127.0.0.1:{server.port}/", b"{}", {"x": "a\r\nevil: 1"})
    assert server.connections == 0


async def test_a_waiter_cancelled_as_it_is_woken_passes_its_turn_on(
    serve: Callable[..., Any],
) -> None:
    """At ``max_connections``, a waiting request cancelled just as a connection comes free
    does not take the wake-up with it: the next waiting request gets the connection."""
    server = await serve(sse_reply)
    upstream = pool(max_connections=1)
    url = f"http://127.0.0.1:{server.port}/"
    first = await upstream.post(url, b"{}", {})
    second = asyncio.create_task(upstream.post(url, b"{}", {}))
    third = asyncio.create_task(upstream.post(url, b"{}", {}))
    assert await eventually(lambda: upstream.waiting_requests == 2)
    await read_all(first)
    first.release()  # wakes the second...
    second.cancel()  # ...which is cancelled before it runs
    reply = await asyncio.wait_for(third, 5)
    assert await read_all(reply) == b"data: {}\n\ndata: [DONE]\n\n"
    reply.release()
    assert second.cancelled() and server.connections == 1
    await upstream.aclose()
