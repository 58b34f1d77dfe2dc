"""``/healthz`` tells the truth: a blocked event loop, wedged generations and a Redis outage
make it 503 naming the failing check; and a WebSocket upgrade during a Redis outage is answered
cleanly (a close code with a reason, never an HTTP 500).

The Redis tests start a ``redis-server`` of their own (the ``private_redis`` fixture) and kill
it; the shared Redis on 6379 is never touched.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tokenwire.testing import FAST_SIM, GatewayServer
from tokenwire.testing_services import PrivateRedis


def healthz(gateway: GatewayServer) -> tuple[int, dict[str, Any]]:
    response = requests.get(gateway.base_url + "/healthz", timeout=30)
    return response.status_code, response.json()


def poll(
    probe: Callable[[], tuple[int, dict[str, Any]]],
    done: Callable[[tuple[int, dict[str, Any]]], bool],
    deadline_s: float,
) -> tuple[int, dict[str, Any]]:
    """Call ``probe`` until ``done`` holds for its result or the deadline passes."""
    end = time.monotonic() + deadline_s
    result = probe()
    while not done(result) and time.monotonic() < end:
        threading.Event().wait(0.05)
        result = probe()
    return result


def test_healthy_gateway_reports_each_check(gateway: GatewayServer) -> None:
    """A healthy gateway: 200, status ok, and the event loop, generations and database checks."""
    status, body = healthz(gateway)
    assert status == 200, body
    assert body["status"] == "ok" and body["failing"] == []
    assert set(body["checks"]) == {"event_loop", "generations", "database"}
    assert all(check["ok"] for check in body["checks"].values())
    assert isinstance(body["live_generations"], int)


# -- a blocked event loop ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lag_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """The loop counts as stuck past 0.3 s of lag."""
    overrides = FAST_SIM + "\n[server]\nhealth_max_loop_lag_s = 0.3\n"
    with GatewayServer(tmp_path_factory.mktemp("lag"), overrides=overrides) as gateway:
        yield gateway


def raw_healthz(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """Read one ``Connection: close`` HTTP response to /healthz from ``sock``."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_a_blocked_event_loop_is_not_live(lag_gateway: GatewayServer) -> None:
    """A probe that arrives while the gateway's loop is blocked past health_max_loop_lag_s gets 503 naming event_loop; then 200 again."""
    gateway = lag_gateway
    assert healthz(gateway)[0] == 200
    blocking, sent = threading.Event(), threading.Event()

    def wedge() -> None:  # the fault: synchronous work on the event loop
        blocking.set()
        sent.wait(10)  # the probe is in the socket, waiting for the loop...
        time.sleep(0.6)  # ...which stays blocked for twice the allowed lag

    gateway.loop_of_server().call_soon_threadsafe(wedge)
    assert blocking.wait(10)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        sent.set()
        status, body = raw_healthz(sock)
    assert status == 503, body
    assert body["status"] == "unhealthy" and "event_loop" in body["failing"]
    assert body["checks"]["event_loop"]["ok"] is False
    assert body["checks"]["database"]["ok"] is True
    status, body = poll(lambda: healthz(gateway), lambda r: r[0] == 200, 10.0)
    assert status == 200, body


# -- wedged generations --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stall_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """``hang`` is a model whose first token takes 10 minutes; no progress for 0.5 s is a stall."""
    overrides = (
        FAST_SIM
        + """
[providers.hang]
kind = "sim"
ttft_ms = 600000.0

[[models]]
id = "hang"
provider = "hang"

[server]
health_stall_s = 0.5
"""
    )
    with GatewayServer(tmp_path_factory.mktemp("stall"), overrides=overrides) as gateway:
        yield gateway


async def test_generations_that_stop_moving_make_healthz_fail(
    stall_gateway: GatewayServer,
) -> None:
    """With a live generation that has not moved for health_stall_s, /healthz is 503 naming generations; once it ends, 200."""
    gateway = stall_gateway
    body = {"model": "hang", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    hung = asyncio.create_task(
        asyncio.to_thread(
            requests.post,
            gateway.base_url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {gateway.api_key}"},
            json=body,
            timeout=120,
        )
    )
    try:
        live = gateway.state.completions.live
        assert await asyncio.to_thread(
            lambda: poll(lambda: (len(live), {}), lambda r: r[0] == 1, 10.0)[0] == 1
        )
        status, health = await asyncio.to_thread(
            poll, lambda: healthz(gateway), lambda r: r[0] == 503, 10.0
        )
        assert status == 503, health
        assert health["failing"] == ["generations"]
        assert health["checks"]["generations"]["live"] == 1
        assert health["checks"]["generations"]["silent_s"] >= 0.5
        end_all(gateway)  # the wedged request ends (as an operator's cancel would end it)
        status, health = await asyncio.to_thread(
            poll, lambda: healthz(gateway), lambda r: r[0] == 200, 10.0
        )
        assert status == 200, health
    finally:
        end_all(gateway)
        await hung


def end_all(gateway: GatewayServer) -> None:
    """Cancel every live generation (on the gateway's loop)."""
    for generation in list(gateway.state.completions.live.values()):
        gateway.loop_of_server().call_soon_threadsafe(generation.cancel, "shutdown")


# -- a Redis outage ------------------------------------------------------------------------------


@pytest.fixture
def redis_gateway(
    tmp_path: Path, private_redis: PrivateRedis
) -> Iterator[tuple[GatewayServer, PrivateRedis]]:
    """Limits and resumable streams in the private Redis."""
    url = private_redis.url
    overrides = (
        FAST_SIM
        + f"""
[limits]
backend = "redis"
redis_url = "{url}"
redis_prefix = "tw-health-{secrets.token_hex(4)}:"

[server]
stream_backend = "redis"
health_timeout_s = 1.0
"""
    )
    with GatewayServer(tmp_path / "gw", overrides=overrides) as gateway:
        yield gateway, private_redis


def ws_url(gateway: GatewayServer) -> str:
    return "ws" + gateway.base_url.removeprefix("http") + "/v1/ws/chat"


async def ws_close(gateway: GatewayServer, headers: dict[str, str], first: str | None) -> Any:
    """Connect (sending ``first`` if given) and return the close frame the server sends."""
    try:
        async with connect(ws_url(gateway), additional_headers=headers) as ws:
            if first is not None:
                await ws.send(first)
            async with asyncio.timeout(10):
                await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd
    pytest.fail("the socket stayed open")


async def test_redis_outage_makes_healthz_fail_and_websockets_answer_cleanly(
    redis_gateway: tuple[GatewayServer, PrivateRedis],
) -> None:
    """With Redis killed: /healthz is 503 naming redis; WebSocket upgrades get close codes with reasons or in-band errors, never a 500."""
    gateway, redis_server = redis_gateway
    status, body = await asyncio.to_thread(healthz, gateway)
    assert status == 200, body
    assert body["checks"]["redis"] == {"ok": True, "used_for": ["limits", "streams", "tickets"]}

    redis_server.kill()

    status, body = await asyncio.to_thread(healthz, gateway)
    assert status == 503, body
    assert body["failing"] == ["redis"]
    assert body["checks"]["redis"]["ok"] is False and body["checks"]["redis"]["error"]
    assert body["checks"]["database"]["ok"] is True
    ready = await asyncio.to_thread(requests.get, gateway.base_url + "/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["status"] == "not_ready", ready.text
    assert ready.json()["failing"] == ["redis"]
    # tickets live in Redis too: minting one is a 503 naming the store, with Retry-After
    ticket = await asyncio.to_thread(
        requests.post,
        gateway.base_url + "/v1/ws/tickets",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        timeout=30,
    )
    assert ticket.status_code == 503, ticket.text
    assert ticket.json()["error"]["code"] == "ticket_store_unavailable"
    assert ticket.headers["retry-after"] == "1"

    # a valid key opens the socket; its request gets an error message (503), not a crash
    request = json.dumps({"model": "sim", "messages": [{"role": "user", "content": "hi"}]})
    async with connect(
        ws_url(gateway), additional_headers={"Authorization": f"Bearer {gateway.api_key}"}
    ) as ws:
        await ws.send(request)
        async with asyncio.timeout(10):
            reply = json.loads(await ws.recv())
        assert reply["error"]["code"] == "rate_limiter_unavailable", reply
    # a bad key cannot be checked against the throttle: 1013 with the reason, on both paths
    bad = "tw-not-a-real-key-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
    closed = await ws_close(gateway, {"Authorization": f"Bearer {bad}"}, None)
    assert closed is not None and closed.code == 1013 and "unavailable" in closed.reason
    auth = json.dumps({"type": "auth", "api_key": bad})
    closed = await ws_close(gateway, {}, auth)
    assert closed is not None and closed.code == 1013 and "unavailable" in closed.reason
    # and HTTP answers 503 in OpenAI's shape
    response = await asyncio.to_thread(
        requests.post,
        gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        data=request,
        timeout=30,
    )
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "rate_limiter_unavailable"
