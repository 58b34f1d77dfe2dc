"""``/v1/ws/chat`` in compatible mode, over real sockets (the Python ``websockets`` client) against
live gateways (docs/websocket-protocol.md): a plain chat body gets exactly the SSE chunks and
then ``[DONE]``, requests follow one another or are pipelined on one socket, ``[DONE]`` follows
the client's pong rather than a fixed grace, a client that closes after the finish gets no
``[DONE]``, and ``stream: false`` still streams.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
import requests
from tests.api.conftest import (
    SSE_CHUNK_KEYS,
    bearer,
    chat,
    content_of,
    expected,
    read_compatible,
    still_open,
    usage_of,
    ws_url,
)
from websockets.asyncio.client import connect

from tokenwire.testing import FAST_SIM, GatewayServer


async def test_compatible_mode_chunks_then_done(gateway: GatewayServer) -> None:
    """A plain body gets SSE's exact chunks (role first, finish, usage), the sim's text, [DONE]."""
    body = chat("compatible please", stream=True, stream_options={"include_usage": True})
    sim = expected(body)
    async with connect(ws_url(gateway), additional_headers=bearer(gateway.api_key)) as ws:
        await ws.send(json.dumps(body))
        chunks = await read_compatible(ws)
        await still_open(ws)
    assert all(set(c) == SSE_CHUNK_KEYS | {"usage"} for c in chunks), chunks[0]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert content_of(chunks) == sim.text
    assert all(c["choices"][0]["delta"]["content"] for c in chunks[:-2])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == usage_of(sim)
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_compatible_chunks_equal_the_sse_chunks(slow_gateway: GatewayServer) -> None:
    """Apart from id and created, the WebSocket chunks are exactly the SSE data lines."""
    gateway = slow_gateway  # 20 ms between tokens: one chunk per token on both transports
    body = chat("same on both transports", stream=True, max_tokens=6)

    def sse() -> list[dict[str, Any]]:
        response = requests.post(
            gateway.base_url + "/v1/chat/completions",
            headers=bearer(gateway.api_key),
            json=body,
            stream=True,
            timeout=10,
        )
        lines = response.iter_lines(decode_unicode=True)
        return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]

    async with connect(ws_url(gateway), additional_headers=bearer(gateway.api_key)) as ws:
        await ws.send(json.dumps(body))
        over_ws = await read_compatible(ws)
    over_sse = await asyncio.to_thread(sse)

    def strip(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in c.items() if k not in {"id", "created"}} for c in chunks]

    assert len(over_ws) == 7  # 6 tokens and the finish chunk, nothing else
    assert strip(over_ws) == strip(over_sse)


async def test_compatible_requests_one_after_another(gateway: GatewayServer) -> None:
    """Several requests on one socket: each answer is complete and ends with [DONE], in order."""
    bodies = [chat(f"question {i}", max_tokens=3 + i) for i in range(3)]
    async with connect(ws_url(gateway), additional_headers=bearer(gateway.api_key)) as ws:
        for body in bodies:  # one at a time
            await ws.send(json.dumps(body))
            chunks = await read_compatible(ws)
            assert content_of(chunks) == expected(body).text
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        for body in bodies:  # pipelined: sent at once, answered one after another
            await ws.send(json.dumps(body))
        answers = [await read_compatible(ws) for _ in bodies]
    for body, chunks in zip(bodies, answers, strict=True):
        assert content_of(chunks) == expected(body).text
        assert len({c["id"] for c in chunks}) == 1
    assert len({chunks[0]["id"] for chunks in answers}) == len(bodies)


@pytest.fixture
def long_grace_gateway(gateway_factory: Callable[[str, str], GatewayServer]) -> GatewayServer:
    """ws_done_grace_ms of 10 minutes: a [DONE] that waited for it would never come."""
    return gateway_factory("long-grace", FAST_SIM + "\n[server]\nws_done_grace_ms = 600000\n")


async def test_compatible_done_follows_the_pong_without_a_fixed_grace(
    long_grace_gateway: GatewayServer,
) -> None:
    """A client that reads on gets [DONE] once it has answered the server's ping (websockets
    answers pings itself): requests in sequence do not wait ws_done_grace_ms."""
    gateway = long_grace_gateway
    async with connect(ws_url(gateway), additional_headers=bearer(gateway.api_key)) as ws:
        for i in range(3):
            body = chat(f"sequential {i}", max_tokens=4)
            await ws.send(json.dumps(body))
            chunks = await read_compatible(ws)  # fails after 10 s without [DONE]
            assert content_of(chunks) == expected(body).text


class RawWebSocket:
    """A minimal RFC 6455 client over a TCP socket that shows every frame the server sends
    and never answers a ping (as a client that has started to close)."""

    def __init__(self, port: int, key: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(
            (
                "GET /v1/ws/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n"
            ).encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buffer += data
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def frame(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload)."""
        first, second = self._read(2)
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(self._read(2), "big")
        elif size == 127:
            size = int.from_bytes(self._read(8), "big")
        return first & 0x0F, self._read(size)

    def send(self, opcode: int, payload: bytes) -> None:
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 126
        self.sock.sendall(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)


def test_compatible_client_closing_after_the_finish_gets_no_done(
    long_grace_gateway: GatewayServer,
) -> None:
    """A client that closes as soon as it sees the finish reason (and so answers no ping) is
    never sent [DONE]: after its close, the server sends only its own close frame."""
    gateway = long_grace_gateway
    client = RawWebSocket(gateway.port, gateway.api_key)
    try:
        client.send(0x1, json.dumps(chat("close early", max_tokens=3)).encode())
        while True:
            opcode, payload = client.frame()
            assert opcode == 0x1, (opcode, payload)
            if json.loads(payload)["choices"][0]["finish_reason"] is not None:
                break
        client.send(0x8, (1000).to_bytes(2, "big"))
        after = [client.frame()]
        while after[-1][0] != 0x8:  # up to the server's close reply
            after.append(client.frame())
        # at most the ping the server sent after the last chunk (unless it saw the close
        # first), never a text frame
        assert {opcode for opcode, _ in after[:-1]} <= {0x9}, after
    finally:
        client.sock.close()


async def test_compatible_mode_streams_even_with_stream_false(gateway: GatewayServer) -> None:
    """A body with stream false still streams chunks and [DONE] over the socket."""
    body = chat("no stream?", stream=False, max_tokens=4)
    async with connect(ws_url(gateway), additional_headers=bearer(gateway.api_key)) as ws:
        await ws.send(json.dumps(body))
        chunks = await read_compatible(ws)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert content_of(chunks) == expected(body).text
