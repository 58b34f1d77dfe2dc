"""What the ``/v1/ws/chat`` test modules (``test_ws_*.py``) share: helpers that build requests,
read compatible-mode answers, envelope messages and close frames and check them against what the
simulator emits, and ``gateway_factory``, which starts a gateway per configuration and test
module (``slow_gateway``: 20 ms between tokens).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tokenwire.providers.sim import SimPlan, plan
from tokenwire.testing import GatewayServer
from tokenwire.wire.schema import decode_chat_request

SLOW_SIM = """
[providers.sim]
kind = "sim"
ttft_ms = 0.0
itl_ms = 20.0
"""
SSE_CHUNK_KEYS = {"id", "object", "created", "model", "choices"}
ENVELOPE_FIELDS = {"type", "request_id", "sequence_number"}


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


async def compatible_works(ws: ClientConnection, content: str) -> None:
    """A compatible-mode request on ``ws`` streams the sim's text."""
    body = chat(content, max_tokens=3)
    await ws.send(json.dumps(body))
    assert content_of(await read_compatible(ws)) == expected(body).text


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
