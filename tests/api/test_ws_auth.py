"""Authentication and the Origin check of ``/v1/ws/chat``, over real sockets against live gateways
(docs/websocket-protocol.md): the three ways to authenticate (an Authorization header, a ticket
from ``POST /v1/ws/tickets`` as a subprotocol, an ``auth`` message), each refused with close
code 3000 when wrong, late or missing, and a foreign Origin closed with 1008 while listed and
same-origin ones are accepted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest
import requests
from tests.api.conftest import (
    bearer,
    chat,
    check_envelope_request,
    compatible_works,
    create,
    read_envelopes,
    read_until_closed,
    recv_json,
    ws_url,
)
from websockets.asyncio.client import connect

from tokenwire.testing import FAST_SIM, GatewayServer

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
