"""A client that goes away cancels the upstream request, for JSON and SSE alike, whether the
gateway learns of it from its own HTTP protocol (``tokenwire.http``) or, under uvicorn's plain
protocol, from a task watching ``receive``."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from tokenwire.testing import GatewayServer, SimUpstreamServer


def proxied(upstream: SimUpstreamServer) -> str:
    return f"""
[providers.upstream]
kind = "openai"
base_url = "{upstream.base_url}/v1"

[[models]]
id = "proxied-sim"
provider = "upstream"
upstream_model = "sim"
"""


@pytest.fixture(scope="module", params=["tokenwire-protocol", "plain-uvicorn"])
def pair(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[GatewayServer, SimUpstreamServer]]:
    """A slow upstream behind a gateway served by tokenwire's protocols or uvicorn's own."""
    with SimUpstreamServer(ttft_ms=3000, itl_ms=50) as upstream:  # noqa: SIM117 - gateway needs its URL
        with GatewayServer(
            tmp_path_factory.mktemp("disc"),
            overrides=proxied(upstream),
            plain_uvicorn=request.param == "plain-uvicorn",
        ) as gateway:
            yield gateway, upstream


def stats(upstream: SimUpstreamServer) -> dict[str, int]:
    result: dict[str, int] = requests.get(upstream.base_url + "/sim/stats", timeout=5).json()
    return result


def wait_for(predicate: object, deadline_s: float) -> bool:
    """Poll an observable condition until it holds or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return bool(predicate())  # type: ignore[operator]


@pytest.mark.parametrize("stream", [False, True])
def test_hanging_up_before_first_token_cancels_upstream(
    pair: tuple[GatewayServer, SimUpstreamServer], stream: bool
) -> None:
    """Closing the socket while the gateway waits for the first token closes the upstream within 1 s."""
    gateway, upstream = pair
    before = stats(upstream)
    body = json.dumps(
        {
            "model": "proxied-sim",
            "stream": stream,
            "max_tokens": 40,
            "messages": [{"role": "user", "content": "x"}],
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {gateway.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(head + body)
        assert wait_for(lambda: stats(upstream)["active_streams"] > before["active_streams"], 5)
    closed_at = time.monotonic()
    assert wait_for(lambda: stats(upstream)["cancelled_streams"] > before["cancelled_streams"], 1.0)
    assert time.monotonic() - closed_at < 1.0
    assert wait_for(lambda: gateway.state.completions.live == {}, 1.0)
