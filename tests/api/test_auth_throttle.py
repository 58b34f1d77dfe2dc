"""The failed-authentication throttle: per client address, never against a valid key.

The address is the TCP peer; ``X-Forwarded-For`` counts only when that peer is one of
``server.trusted_proxies``, so a client cannot spoof its way past the throttle, nor lock
another address out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tokenwire.config import ConfigError, load_settings
from tokenwire.testing import FAST_SIM, GatewayServer

LIMIT = "\n[limits]\nauth_failures_per_window = 3\n"
BODY = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def bad_key(i: int) -> str:
    return f"tw-not-a-real-key-{i:04d}-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"


def post(gw: GatewayServer, key: str, forwarded_for: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    return requests.post(
        gw.base_url + "/v1/chat/completions", headers=headers, json=BODY, timeout=10
    )


def code_of(response: requests.Response) -> Any:
    return response.json()["error"]["code"]


def ws_url(gw: GatewayServer) -> str:
    return "ws" + gw.base_url.removeprefix("http") + "/v1/ws/chat"


async def ws_auth_message(gw: GatewayServer, key: str, forwarded_for: str) -> str | int:
    """Authenticate with an ``auth`` message: ``"auth.ok"``, or the close code."""
    headers = {"X-Forwarded-For": forwarded_for}
    try:
        async with connect(ws_url(gw), additional_headers=headers) as ws:
            await ws.send(json.dumps({"type": "auth", "api_key": key}))
            reply = json.loads(await ws.recv())
            return str(reply["type"])
    except ConnectionClosed as exc:
        assert exc.rcvd is not None
        return exc.rcvd.code


async def ws_header(gw: GatewayServer, key: str, forwarded_for: str) -> str | int:
    """Authenticate with the upgrade's header and run one request: ``"chunk"``, or the close code."""
    headers = {"Authorization": f"Bearer {key}", "X-Forwarded-For": forwarded_for}
    try:
        async with connect(ws_url(gw), additional_headers=headers) as ws:
            await ws.send(json.dumps(BODY))
            return "chunk" if json.loads(await ws.recv())["object"] else "?"
    except ConnectionClosed as exc:
        assert exc.rcvd is not None
        return exc.rcvd.code


@pytest.fixture(scope="module")
def direct_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """No trusted proxies (the default): forwarding headers are ignored."""
    with GatewayServer(tmp_path_factory.mktemp("direct"), overrides=FAST_SIM + LIMIT) as gw:
        yield gw


@pytest.fixture(scope="module")
def proxied_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """Behind trusted proxies on loopback and in 10.0.0.0/8."""
    overrides = FAST_SIM + LIMIT + '\n[server]\ntrusted_proxies = ["127.0.0.1", "10.0.0.0/8"]\n'
    with GatewayServer(tmp_path_factory.mktemp("proxied"), overrides=overrides) as gw:
        yield gw


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    direct_gateway: GatewayServer,
) -> None:
    """Bad keys under a fresh X-Forwarded-For each still count against the real peer: the 4th is a 429, on HTTP and WebSocket; a valid key is served."""
    gw = direct_gateway
    for i in range(3):
        refused = post(gw, bad_key(i), forwarded_for=f"198.51.100.{i}")
        assert refused.status_code == 401, refused.text
    blocked = post(gw, bad_key(3), forwarded_for="198.51.100.99")
    assert blocked.status_code == 429, blocked.text
    assert code_of(blocked) == "too_many_failed_authentications"
    assert await ws_auth_message(gw, bad_key(4), "198.51.100.98") == 1013
    assert await ws_header(gw, bad_key(5), "198.51.100.97") == 1013
    # the address is blocked; a valid key is still served, whatever header it sends
    assert post(gw, gw.api_key, forwarded_for="198.51.100.96").status_code == 200
    assert post(gw, gw.api_key).status_code == 200
    assert await ws_auth_message(gw, gw.api_key, "198.51.100.95") == "auth.ok"
    assert await ws_header(gw, gw.api_key, "198.51.100.94") == "chunk"


async def test_a_trusted_proxy_names_the_client(proxied_gateway: GatewayServer) -> None:
    """Behind a trusted proxy each forwarded client is throttled on its own; the proxy and other clients are not blocked, valid keys never."""
    gw = proxied_gateway
    attacker = "203.0.113.7"
    for i in range(3):
        assert post(gw, bad_key(i), forwarded_for=attacker).status_code == 401
    blocked = post(gw, bad_key(3), forwarded_for=attacker)
    assert blocked.status_code == 429 and code_of(blocked) == "too_many_failed_authentications"
    # the rightmost address that is not a trusted proxy is the client
    relayed = post(gw, bad_key(4), forwarded_for=f"{attacker}, 10.1.2.3")
    assert relayed.status_code == 429
    assert await ws_auth_message(gw, bad_key(5), attacker) == 1013
    assert await ws_header(gw, bad_key(6), attacker) == 1013
    # another client behind the same proxy, and the proxy itself, are not blocked
    assert post(gw, bad_key(7), forwarded_for="203.0.113.8").status_code == 401
    assert post(gw, bad_key(8)).status_code == 401
    # the blocked client's valid key is served
    assert post(gw, gw.api_key, forwarded_for=attacker).status_code == 200
    assert await ws_auth_message(gw, gw.api_key, attacker) == "auth.ok"
    assert await ws_header(gw, gw.api_key, attacker) == "chunk"


def test_trusted_proxies_must_be_addresses_or_networks(tmp_path: Path) -> None:
    """A trusted_proxies entry that is not an IP address or network stops start-up, naming it."""
    good = '[server]\ntrusted_proxies = ["127.0.0.1", "::1", "10.0.0.0/8", "fd00::/8"]\n'
    assert load_settings(data_dir=tmp_path, env={}, overrides=good).server.trusted_proxies
    with pytest.raises(ConfigError, match=r"proxy\.example"):
        load_settings(
            data_dir=tmp_path, env={}, overrides='[server]\ntrusted_proxies = ["proxy.example"]\n'
        )
