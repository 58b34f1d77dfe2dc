"""``/v1/ws/chat`` over real sockets (the Python ``websockets`` client) against live gateways.

Covers docs/websocket-protocol.md: compatible and envelope modes, multiplexing, cancel, the
per-socket cap, the three ways to authenticate, the Origin check, every documented bad-input
result (close codes and error messages), flow control for a slow reader, and the idle timeout.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
import requests
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tokenwire.providers.sim import SimPlan, plan
from tokenwire.testing import FAST_SIM, GatewayServer
from tokenwire.wire.schema import decode_chat_request

SLOW_SIM = """
[providers.sim]
kind = "sim"
ttft_ms = 0.0
itl_ms = 20.0
"""
SSE_CHUNK_KEYS = {"id", "object", "created", "model", "choices"}
ENVELOPE_FIELDS = {"type", "request_id", "sequence_number"}


# -- helpers -----------------------------------------------------------------------------------


def ws_url(gateway: GatewayServer) -> str:
    return "ws" + gateway.base_url.removeprefix("http") + "/v1/ws/chat"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(content: str, **extra: Any) -> dict[str, Any]:
    """A chat-completions body for the ``sim`` model."""
    return {"model": "sim", "messages": [{"role": "user", "content": content}], **extra}


def create(request_id: str, body: dict[str, Any]) -> str:
    return json.dumps({"type": "chat.completion.create", "request_id": request_id, "body": body})


def expected(body: dict[str, Any]) -> SimPlan:
    """What the simulator emits for this body (which the socket always streams)."""
    return plan(decode_chat_request(json.dumps({**body, "stream": True}).encode()))


def usage_of(sim: SimPlan) -> dict[str, int]:
    return {
        "prompt_tokens": sim.prompt_tokens,
        "completion_tokens": sim.completion_tokens,
        "total_tokens": sim.prompt_tokens + sim.completion_tokens,
    }


def content_of(chunks: list[dict[str, Any]]) -> str:
    """The concatenated ``delta.content`` of chat.completion.chunk objects."""
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def await_until(predicate: Callable[[], bool], deadline_s: float) -> bool:
    """Poll an observable condition until it holds or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def recv_text(ws: ClientConnection, within: float = 10.0) -> str:
    async with asyncio.timeout(within):
        message = await ws.recv()
    assert isinstance(message, str), f"expected a text message, got {message!r}"
    return message


async def recv_json(ws: ClientConnection, within: float = 10.0) -> Any:
    return json.loads(await recv_text(ws, within))


async def read_compatible(ws: ClientConnection) -> list[dict[str, Any]]:
    """The messages of one compatible-mode response, parsed, up to (not including) [DONE]."""
    messages: list[dict[str, Any]] = []
    while (text := await recv_text(ws)) != "[DONE]":
        messages.append(json.loads(text))
    return messages


async def read_until_closed(
    ws: ClientConnection, within: float = 10.0
) -> tuple[int, str, list[str]]:
    """Read until the server closes: its close code, reason, and what arrived before."""
    received: list[str] = []
    try:
        async with asyncio.timeout(within):
            while True:
                message = await ws.recv()
                received.append(message if isinstance(message, str) else repr(message))
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, f"the connection dropped without a close frame: {exc!r}"
        return exc.rcvd.code, exc.rcvd.reason, received
    except TimeoutError:
        pytest.fail(f"the server did not close the socket within {within} s")


async def next_reply(ws: ClientConnection, types: set[str]) -> dict[str, Any]:
    """The next message whose type is in ``types``, skipping chunks and dones of running requests."""
    while True:
        message = await recv_json(ws)
        assert isinstance(message, dict)
        if message.get("type") in types:
            return message
        assert message.get("type") in {"chat.completion.chunk", "chat.completion.done"}, message


async def still_open(ws: ClientConnection) -> None:
    """The socket answers a ping: it stayed open."""
    await ws.send(json.dumps({"type": "ping"}))
    assert await next_reply(ws, {"pong"}) == {"type": "pong"}


async def read_envelopes(ws: ClientConnection, ids: set[str]) -> list[dict[str, Any]]:
    """Every message in arrival order until each of ``ids`` has ended (done or error)."""
    running = set(ids)
    messages: list[dict[str, Any]] = []
    while running:
        message = await recv_json(ws)
        assert message["request_id"] in ids, message
        messages.append(message)
        if message["type"] in {"chat.completion.done", "error"}:
            running.remove(message["request_id"])
    return messages


def check_envelope_request(
    messages: list[dict[str, Any]], request_id: str, body: dict[str, Any]
) -> dict[str, Any]:
    """One request's envelope messages: its exact text, increasing numbers, a correct done."""
    mine = [m for m in messages if m["request_id"] == request_id]
    chunks, done = mine[:-1], mine[-1]
    sim = expected(body)
    assert done["type"] == "chat.completion.done", done
    assert chunks, f"{request_id}: no chunks before done"
    assert all(c["type"] == "chat.completion.chunk" for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(set(c) >= SSE_CHUNK_KEYS | ENVELOPE_FIELDS for c in chunks)
    assert content_of(chunks) == sim.text
    numbers = [c["sequence_number"] for c in chunks]
    assert numbers == sorted(set(numbers)), f"{request_id}: numbers not increasing: {numbers}"
    assert numbers[0] >= 1
    assert {c["id"] for c in chunks} == {done["stream_id"]}
    assert done["stream_id"].startswith("chatcmpl-")
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finish if f is not None] == [sim.finish_reason]
    assert done["finish_reason"] == sim.finish_reason
    assert done["usage"] == usage_of(sim)
    # the log: one event per token, then Finish and Usage
    assert done["sequence_number"] == sim.completion_tokens + 2
    assert numbers[-1] <= done["sequence_number"]
    return done


@pytest.fixture(scope="module")
def gateway_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str, str], GatewayServer]]:
    """Starts gateways with extra TOML, once per name for the module; stops them at the end."""
    started: dict[str, GatewayServer] = {}

    def start(name: str, overrides: str) -> GatewayServer:
        if name not in started:
            server = GatewayServer(tmp_path_factory.mktemp(name), overrides=overrides)
            server.start()
            started[name] = server
        return started[name]

    yield start
    for server in started.values():
        server.stop()


@pytest.fixture
def slow_gateway(gateway_factory: Callable[[str, str], GatewayServer]) -> GatewayServer:
    """20 ms between tokens: a 500-token request streams for 10 s."""
    return gateway_factory("slow", SLOW_SIM)


# -- compatible mode ---------------------------------------------------------------------------


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


# -- envelope mode -----------------------------------------------------------------------------


async def test_envelope_twenty_concurrent_requests(gateway: GatewayServer) -> None:
    """20 multiplexed requests each get exactly their own text, increasing numbers and a done."""
    bodies = {
        f"req-{i}": chat(
            f"prompt number {i}",
            max_tokens=40 + i,
            **({"stream_options": {"include_usage": True}} if i % 2 else {}),
        )
        for i in range(20)
    }
    async with connect(ws_url(gateway), additional_headers=bearer(gateway.api_key)) as ws:
        for request_id, body in bodies.items():
            await ws.send(create(request_id, body))
        messages = await read_envelopes(ws, set(bodies))
        await still_open(ws)
    assert len({expected(b).text for b in bodies.values()}) == 20
    dones = [check_envelope_request(messages, rid, body) for rid, body in bodies.items()]
    assert len({d["stream_id"] for d in dones}) == 20
    for rid, body in bodies.items():
        usage_chunks = [
            m
            for m in messages
            if m["request_id"] == rid and m["type"] == "chat.completion.chunk" and "usage" in m
        ]
        if body.get("stream_options"):
            assert all(m["usage"] is None for m in usage_chunks[:-1])
            assert usage_chunks[-1]["usage"] == usage_of(expected(body))
            assert usage_chunks[-1]["choices"] == []
        else:
            assert usage_chunks == []
    # they really ran at once: the arrival order interleaves requests
    order = [m["request_id"] for m in messages]
    runs = sum(1 for a, b in itertools.pairwise(order) if a != b) + 1
    assert runs > len(bodies)


async def test_envelope_request_ids_can_be_reused_after_done(gateway: GatewayServer) -> None:
    """Once a request is done, its request_id may start a new request on the same socket."""
    first, second = chat("first use", max_tokens=3), chat("second use", max_tokens=5)
    async with connect(ws_url(gateway), additional_headers=bearer(gateway.api_key)) as ws:
        await ws.send(create("same", first))
        check_envelope_request(await read_envelopes(ws, {"same"}), "same", first)
        await ws.send(create("same", second))
        check_envelope_request(await read_envelopes(ws, {"same"}), "same", second)


async def test_cancel_ends_with_cancelled_done_and_frees_the_generation(
    slow_gateway: GatewayServer,
) -> None:
    """Cancel after the first chunk: a prompt 'cancelled' done with partial usage; generation gone."""
    body = chat("a long answer please", max_tokens=500)
    sim = expected(body)
    async with connect(ws_url(slow_gateway), additional_headers=bearer(slow_gateway.api_key)) as ws:
        await ws.send(create("long", body))
        first = await recv_json(ws)
        assert first["type"] == "chat.completion.chunk"
        generation = slow_gateway.state.completions.live[first["id"]]
        cancelled_at = time.monotonic()
        await ws.send(json.dumps({"type": "chat.completion.cancel", "request_id": "long"}))
        rest = await read_envelopes(ws, {"long"})
        took = time.monotonic() - cancelled_at
        done = rest[-1]
        assert done["type"] == "chat.completion.done"
        assert done["finish_reason"] == "cancelled"
        assert done["stream_id"] == first["id"]
        tokens = done["usage"]["completion_tokens"]
        assert 1 <= tokens < 500
        assert done["usage"]["total_tokens"] == tokens + done["usage"]["prompt_tokens"]
        chunks = [first, *rest[:-1]]
        assert content_of(chunks) == "".join(sim.tokens[:tokens])
        assert chunks[-1]["choices"][0]["finish_reason"] == "cancelled"
        assert took < 2.0, f"cancel took {took:.2f} s; the full stream takes 10 s"
        assert await await_until(
            lambda: first["id"] not in slow_gateway.state.completions.live, 5.0
        )
        assert generation.cancel_cause == "client_cancelled"
        # the socket goes on serving
        short = chat("after the cancel", max_tokens=2)
        await ws.send(create("next", short))
        check_envelope_request(await read_envelopes(ws, {"next"}), "next", short)


async def test_closing_the_socket_cancels_running_requests(slow_gateway: GatewayServer) -> None:
    """A client that goes away mid-stream leaves no live generation behind."""
    async with connect(ws_url(slow_gateway), additional_headers=bearer(slow_gateway.api_key)) as ws:
        await ws.send(create("a", chat("going away", max_tokens=500)))
        await ws.send(create("b", chat("me too", max_tokens=500)))
        seen: set[str] = set()
        while len(seen) < 2:
            seen.add((await recv_json(ws))["id"])
        assert seen <= set(slow_gateway.state.completions.live)
    assert await await_until(lambda: not seen & set(slow_gateway.state.completions.live), 5.0)


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


# -- authentication and Origin -----------------------------------------------------------------

AUTH_OVERRIDES = (
    FAST_SIM
    + """
[server]
ws_auth_timeout_s = 0.3
ws_allowed_origins = ["https://app.example"]
"""
)


@pytest.fixture
def auth_gateway(gateway_factory: Callable[[str, str], GatewayServer]) -> GatewayServer:
    """Authentication within 0.3 s; https://app.example is an allowed Origin."""
    return gateway_factory("auth", AUTH_OVERRIDES)


async def compatible_works(ws: ClientConnection, content: str) -> None:
    """A compatible-mode request on ``ws`` streams the sim's text."""
    body = chat(content, max_tokens=3)
    await ws.send(json.dumps(body))
    assert content_of(await read_compatible(ws)) == expected(body).text


async def test_header_auth(auth_gateway: GatewayServer) -> None:
    """Authorization: Bearer on the upgrade authenticates; no subprotocol is needed."""
    async with connect(ws_url(auth_gateway), additional_headers=bearer(auth_gateway.api_key)) as ws:
        assert ws.subprotocol is None
        await compatible_works(ws, "header auth")


@pytest.mark.parametrize(
    "authorization",
    ["Bearer tw-wrong-key", "Bearer ", "Basic dXNlcjpwYXNz", "tw-no-scheme"],
    ids=["wrong-key", "empty-token", "basic-scheme", "no-scheme"],
)
async def test_bad_authorization_header_closes_3000(
    auth_gateway: GatewayServer, authorization: str
) -> None:
    """A wrong or malformed Authorization header: the upgrade is accepted, then closed with 3000."""
    async with connect(
        ws_url(auth_gateway), additional_headers={"Authorization": authorization}
    ) as ws:
        code, reason, received = await read_until_closed(ws)
    assert (code, received) == (3000, [])
    assert reason
    assert len(reason.encode()) <= 123


async def test_ticket_flow(auth_gateway: GatewayServer) -> None:
    """A ticket from POST /v1/ws/tickets authenticates once; the server echoes tokenwire.v1."""

    def issue() -> requests.Response:
        return requests.post(
            auth_gateway.base_url + "/v1/ws/tickets",
            headers=bearer(auth_gateway.api_key),
            timeout=10,
        )

    response = await asyncio.to_thread(issue)
    assert response.status_code == 201
    ticket = response.json()
    assert ticket["subprotocols"] == ["tokenwire.v1", "tokenwire.ticket." + ticket["ticket"]]
    assert ticket["expires_at"] > time.time()
    async with connect(ws_url(auth_gateway), subprotocols=ticket["subprotocols"]) as ws:
        assert ws.subprotocol == "tokenwire.v1"
        await compatible_works(ws, "ticket auth")
    async with connect(ws_url(auth_gateway), subprotocols=ticket["subprotocols"]) as ws:
        code, reason, received = await read_until_closed(ws)
    assert (code, received) == (3000, [])
    assert "ticket" in reason


async def test_unknown_ticket_closes_3000(auth_gateway: GatewayServer) -> None:
    """A ticket the server never issued closes the socket with 3000."""
    offered = ["tokenwire.v1", "tokenwire.ticket.not-a-real-ticket"]
    async with connect(ws_url(auth_gateway), subprotocols=offered) as ws:
        code, _, received = await read_until_closed(ws)
    assert (code, received) == (3000, [])


async def test_ticket_endpoint_needs_a_key(auth_gateway: GatewayServer) -> None:
    """POST /v1/ws/tickets without a Bearer key is a 401."""
    response = await asyncio.to_thread(
        requests.post, auth_gateway.base_url + "/v1/ws/tickets", timeout=10
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


async def test_auth_message_then_requests_work(auth_gateway: GatewayServer) -> None:
    """An auth message first gets auth.ok; then envelope and compatible requests work."""
    async with connect(ws_url(auth_gateway)) as ws:
        await ws.send(json.dumps({"type": "auth", "api_key": auth_gateway.api_key}))
        assert await recv_json(ws) == {"type": "auth.ok"}
        body = chat("after the auth message", max_tokens=4)
        await ws.send(create("r1", body))
        check_envelope_request(await read_envelopes(ws, {"r1"}), "r1", body)
        await compatible_works(ws, "compatible after auth")


async def test_auth_message_with_a_bad_key_closes_3000(auth_gateway: GatewayServer) -> None:
    """An auth message with a wrong key closes the socket with 3000."""
    async with connect(ws_url(auth_gateway)) as ws:
        await ws.send(json.dumps({"type": "auth", "api_key": "tw-wrong"}))
        code, _, received = await read_until_closed(ws)
    assert (code, received) == (3000, [])


async def test_request_before_auth_closes_3000(auth_gateway: GatewayServer) -> None:
    """A chat request before authenticating closes the socket with 3000, and runs nothing."""
    async with connect(ws_url(auth_gateway)) as ws:
        await ws.send(json.dumps(chat("sneaky")))
        code, reason, received = await read_until_closed(ws)
    assert (code, received) == (3000, [])
    assert "auth" in reason


async def test_no_auth_in_time_closes_3000(auth_gateway: GatewayServer) -> None:
    """Without authentication within ws_auth_timeout_s (0.3 s) the socket closes with 3000."""
    started = time.monotonic()
    async with connect(ws_url(auth_gateway)) as ws:
        code, reason, received = await read_until_closed(ws, within=5.0)
    took = time.monotonic() - started
    assert (code, received) == (3000, [])
    assert "time" in reason
    assert 0.25 <= took < 5.0


async def test_foreign_origin_closes_1008(auth_gateway: GatewayServer) -> None:
    """An Origin that is neither the gateway's own nor allowed closes with 1008, even with a key."""
    headers = {**bearer(auth_gateway.api_key), "Origin": "http://evil.example"}
    async with connect(ws_url(auth_gateway), additional_headers=headers) as ws:
        code, reason, received = await read_until_closed(ws)
    assert (code, received) == (1008, [])
    assert "origin" in reason


@pytest.mark.parametrize("origin", ["https://app.example", "own"], ids=["listed", "same-origin"])
async def test_allowed_origins_are_accepted(auth_gateway: GatewayServer, origin: str) -> None:
    """An Origin listed in ws_allowed_origins, or the gateway's own, is accepted."""
    origin = auth_gateway.base_url if origin == "own" else origin
    headers = {**bearer(auth_gateway.api_key), "Origin": origin}
    async with connect(ws_url(auth_gateway), additional_headers=headers) as ws:
        await compatible_works(ws, f"from {origin}")


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
