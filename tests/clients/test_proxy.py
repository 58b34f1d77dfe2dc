"""Model ``proxied-sim``: the gateway in front of ``tokenwire sim-upstream`` over real HTTP.

Checks that what the client gets is exactly what the upstream produced (text, finish reason,
usage), and that a client going away cancels the upstream request promptly.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tokenwire.providers.sim import SimPlan, plan
from tokenwire.testing import GatewayServer, SimUpstreamServer
from tokenwire.wire.schema import decode_chat_request

MESSAGES: list[dict[str, Any]] = [
    # 6 words: the sim counts 4 + 6 = 10 prompt tokens; the gateway's own estimate would be
    # 4 + 39 // 4 = 13, so usage equal to the sim's can only come from the upstream.
    {"role": "user", "content": "Tell me about streaming gateways please"},
]
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]
CANCEL_DEADLINE_S = 1.0


def proxy_config(upstream_url: str) -> str:
    """``proxied-sim`` served by ``upstream_url`` (the same shape as conftest's proxy config)."""
    return f"""
[providers.sim]
kind = "sim"
ttft_ms = 0.0
itl_ms = 1.0

[providers.upstream]
kind = "openai"
base_url = "{upstream_url}/v1"
first_token_timeout_s = 10.0
idle_timeout_s = 10.0

[[models]]
id = "proxied-sim"
provider = "upstream"
upstream_model = "sim"
"""


def expected(body: dict[str, Any]) -> SimPlan:
    """What the simulator produces for this request (the model name does not matter)."""
    return plan(decode_chat_request(json.dumps(body).encode()))


def body_for(**extra: Any) -> dict[str, Any]:
    """A ``proxied-sim`` request with ``MESSAGES`` and the given extra fields."""
    return {"model": "proxied-sim", "messages": MESSAGES, **extra}


def upstream_completion(upstream: SimUpstreamServer, body: dict[str, Any]) -> dict[str, Any]:
    """Ask the sim-upstream directly (model ``sim``, non-streamed) for the same request."""
    direct = {**body, "model": "sim", "stream": False}
    direct.pop("stream_options", None)
    response = requests.post(upstream.base_url + "/v1/chat/completions", json=direct, timeout=10)
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def stats(upstream: SimUpstreamServer) -> dict[str, int]:
    """The sim-upstream's stream counters."""
    response = requests.get(upstream.base_url + "/sim/stats", timeout=5)
    assert response.status_code == 200
    result: dict[str, int] = response.json()
    return result


def wait_for_stats(
    upstream: SimUpstreamServer, condition: Callable[[dict[str, int]], bool], timeout: float
) -> tuple[bool, dict[str, int], float]:
    """Poll ``/sim/stats`` until ``condition`` holds or ``timeout`` passes.

    Returns whether it held, the last counters, and the seconds it took.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        current = stats(upstream)
        if condition(current):
            return True, current, time.monotonic() - start
        if time.monotonic() >= deadline:
            return False, current, time.monotonic() - start


def sdk_client(gateway: GatewayServer) -> openai.OpenAI:
    """A sync SDK client for ``gateway``, without retries."""
    return openai.OpenAI(
        base_url=gateway.base_url + "/v1", api_key=gateway.api_key, max_retries=0, timeout=15
    )


@pytest.fixture
def client(proxy_gateway: GatewayServer) -> Iterator[openai.OpenAI]:
    """An SDK client for the session's proxy gateway."""
    with sdk_client(proxy_gateway) as sdk:
        yield sdk


# -- what the client gets is what the upstream produced --------------------------------------


def test_proxy_non_streaming_matches_upstream(
    client: openai.OpenAI, sim_upstream: SimUpstreamServer
) -> None:
    """Non-streamed proxied-sim: the upstream's exact text, finish reason and usage."""
    body = body_for()
    completion = client.chat.completions.create(**body)
    upstream = upstream_completion(sim_upstream, body)
    sim = expected(body)
    choice = completion.choices[0]
    assert choice.message.content == sim.text
    assert choice.message.content == upstream["choices"][0]["message"]["content"]
    assert choice.finish_reason == "stop" == upstream["choices"][0]["finish_reason"]
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == upstream["usage"]
    assert completion.usage.prompt_tokens == sim.prompt_tokens == 10
    assert completion.usage.completion_tokens == sim.completion_tokens
    assert completion.model == "proxied-sim"
    assert completion.id.startswith("chatcmpl-")


@pytest.mark.parametrize("include_usage", [True, False])
def test_proxy_streaming_matches_upstream(
    client: openai.OpenAI, sim_upstream: SimUpstreamServer, include_usage: bool
) -> None:
    """Streamed proxied-sim: the upstream's tokens in order, one id, usage only when asked."""
    body = body_for(seed=21, stream=True, stream_options={"include_usage": include_usage})
    before = stats(sim_upstream)
    with client.chat.completions.create(**body) as stream:
        chunks = list(stream)
    upstream = upstream_completion(sim_upstream, body)
    sim = expected(body)
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.model for c in chunks} == {"proxied-sim"}
    contents = [c.choices[0].delta.content for c in chunks if c.choices]
    assert [t for t in contents if t] == list(sim.tokens)
    assert "".join(t or "" for t in contents) == upstream["choices"][0]["message"]["content"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["stop"]
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1
        assert usage_chunks[0] is chunks[-1]
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.model_dump(exclude_none=True) == upstream["usage"]
        assert chunks[-1].usage.prompt_tokens == sim.prompt_tokens
    else:
        # the gateway asks the upstream for usage regardless, but must not pass it on
        assert usage_chunks == []
        assert all(c.choices for c in chunks)
    # the gateway streamed from the upstream, and that stream completed normally
    held, after, _ = wait_for_stats(
        sim_upstream,
        lambda s: s["completed_streams"] >= before["completed_streams"] + 1,
        timeout=5,
    )
    assert held, after
    assert after["cancelled_streams"] == before["cancelled_streams"]


def test_proxy_streaming_max_tokens(client: openai.OpenAI) -> None:
    """max_tokens reaches the upstream: exactly that many tokens, finish 'length'."""
    body = body_for(max_tokens=6, stream=True, stream_options={"include_usage": True})
    with client.chat.completions.create(**body) as stream:
        chunks = list(stream)
    sim = expected(body)
    contents = [c.choices[0].delta.content for c in chunks if c.choices]
    assert [t for t in contents if t] == list(sim.tokens)
    assert len(sim.tokens) == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == sim.prompt_tokens


def test_proxy_stop_sequence(client: openai.OpenAI, sim_upstream: SimUpstreamServer) -> None:
    """A stop sequence reaches the upstream and cuts the text there, finish 'stop'."""
    full = expected(body_for(seed=8))
    stop = full.tokens[4]
    body = body_for(seed=8, stop=stop)
    completion = client.chat.completions.create(**body)
    text = completion.choices[0].message.content
    assert text == full.text[: full.text.find(stop)]
    assert text == expected(body).text
    assert text == upstream_completion(sim_upstream, body)["choices"][0]["message"]["content"]
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_proxy_tool_call(client: openai.OpenAI, stream: bool) -> None:
    """A forced tool call comes through the proxy and the SDK assembles it."""
    body = body_for(tools=TOOLS, tool_choice="required")
    sim = expected(body)
    assert sim.tool_call is not None
    if stream:
        with client.chat.completions.stream(**body) as helper:
            completion: Any = helper.get_final_completion()
    else:
        completion = client.chat.completions.create(**body)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id == sim.tool_call[0]
    assert call.function.name == "lookup"
    assert call.function.arguments == "".join(sim.tool_call[2])
    assert set(json.loads(call.function.arguments)) == {"query"}


def test_proxy_invalid_request_rejected_by_gateway(
    client: openai.OpenAI, sim_upstream: SimUpstreamServer
) -> None:
    """An invalid request is rejected by the gateway with 400 before reaching the upstream."""
    before = stats(sim_upstream)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body_for(temperature=9, stream=True))
    assert info.value.status_code == 400
    assert info.value.param == "temperature"
    assert stats(sim_upstream) == before


# -- a client going away cancels the upstream ------------------------------------------------


@pytest.fixture
def streaming_pair(tmp_path: Path) -> Iterator[tuple[GatewayServer, SimUpstreamServer]]:
    """A fresh sim-upstream (0 ms TTFT, 50 ms between tokens) and a gateway in front of it."""
    with (
        SimUpstreamServer(ttft_ms=0, itl_ms=50) as upstream,
        GatewayServer(tmp_path, overrides=proxy_config(upstream.base_url)) as gateway,
    ):
        yield gateway, upstream


@pytest.fixture
def late_pair(tmp_path: Path) -> Iterator[tuple[GatewayServer, SimUpstreamServer]]:
    """A fresh sim-upstream that waits 2 s before its first token, and a gateway in front."""
    with (
        SimUpstreamServer(ttft_ms=2000, itl_ms=50) as upstream,
        GatewayServer(tmp_path, overrides=proxy_config(upstream.base_url)) as gateway,
    ):
        yield gateway, upstream


def send_raw_request(gateway: GatewayServer, body: dict[str, Any]) -> socket.socket:
    """Open a socket to the gateway and send a chat-completions request on it."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{gateway.port}\r\n"
        f"Authorization: Bearer {gateway.api_key}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Read from ``sock`` until ``marker`` has arrived (the socket timeout bounds each read)."""
    received = b""
    while marker not in received:
        data = sock.recv(65536)
        assert data, f"connection closed before {marker!r}; got {received!r}"
        received += data
    return received


def kill(sock: socket.socket, *, reset: bool) -> None:
    """Close the client socket: a FIN, or with ``reset`` an abortive RST (SO_LINGER 0)."""
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def assert_upstream_cancelled(upstream: SimUpstreamServer, before: dict[str, int]) -> None:
    """Within 1 s the upstream counts one more cancelled stream and is back to its active count."""
    held, after, took = wait_for_stats(
        upstream,
        lambda s: (
            s["cancelled_streams"] >= before["cancelled_streams"] + 1
            and s["active_streams"] == before["active_streams"]
        ),
        timeout=CANCEL_DEADLINE_S,
    )
    assert held, f"upstream not cancelled within {CANCEL_DEADLINE_S} s: {before} -> {after}"
    assert took <= CANCEL_DEADLINE_S
    assert after["cancelled_streams"] == before["cancelled_streams"] + 1
    assert after["completed_streams"] == before["completed_streams"]


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_client_killed_mid_stream_cancels_upstream(
    streaming_pair: tuple[GatewayServer, SimUpstreamServer], reset: bool
) -> None:
    """Closing the socket after the first content chunk cancels the upstream within 1 s."""
    gateway, upstream = streaming_pair
    before = stats(upstream)
    sock = send_raw_request(
        gateway, body_for(max_tokens=200, stream=True, stream_options={"include_usage": True})
    )
    try:
        head = read_until(sock, b'"content"')
    except BaseException:
        sock.close()
        raise
    assert head.startswith(b"HTTP/1.1 200")
    during = stats(upstream)
    assert during["active_streams"] == before["active_streams"] + 1  # still generating
    kill(sock, reset=reset)
    assert_upstream_cancelled(upstream, before)


def test_sdk_stream_close_cancels_upstream(
    streaming_pair: tuple[GatewayServer, SimUpstreamServer],
) -> None:
    """Closing an openai SDK stream after the first token cancels the upstream within 1 s."""
    gateway, upstream = streaming_pair
    before = stats(upstream)
    with sdk_client(gateway) as sdk:
        stream = sdk.chat.completions.create(**body_for(max_tokens=200, stream=True))
        first_text = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first_text = chunk.choices[0].delta.content
                break
        assert first_text == expected(body_for(max_tokens=200)).tokens[0]
        assert stats(upstream)["active_streams"] == before["active_streams"] + 1
        stream.close()
        assert_upstream_cancelled(upstream, before)


def test_client_gone_before_first_token_cancels_upstream(
    late_pair: tuple[GatewayServer, SimUpstreamServer],
) -> None:
    """A client that disconnects before the first token gets the upstream cancelled within 1 s."""
    gateway, upstream = late_pair
    before = stats(upstream)
    sock = send_raw_request(gateway, body_for(stream=True))
    held, during, _ = wait_for_stats(
        upstream, lambda s: s["active_streams"] == before["active_streams"] + 1, timeout=5
    )
    if not held:
        sock.close()
    assert held, f"the upstream never saw the request: {during}"
    assert during["completed_streams"] == before["completed_streams"]  # no token yet
    kill(sock, reset=False)
    assert_upstream_cancelled(upstream, before)


def test_client_gone_during_json_completion_cancels_upstream(
    streaming_pair: tuple[GatewayServer, SimUpstreamServer],
) -> None:
    """A client that drops a non-streamed request mid-generation gets the upstream cancelled."""
    gateway, upstream = streaming_pair
    before = stats(upstream)
    sock = send_raw_request(gateway, body_for(max_tokens=60))  # 3 s of generation
    held, during, _ = wait_for_stats(
        upstream, lambda s: s["active_streams"] == before["active_streams"] + 1, timeout=5
    )
    if not held:
        sock.close()
    assert held, f"the upstream never saw the request: {during}"
    kill(sock, reset=False)
    assert_upstream_cancelled(upstream, before)
