"""The throttle of failed authentications end to end, with the in-process and the Redis limiter:
after five bad keys from one address a sixth gets 429 ``too_many_failed_authentications`` over
HTTP and a 1013 close over WebSocket, a valid key from that address is still served on both, and
after the window a bad key is a 401 again.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from tests.accounting.conftest import (
    BACKENDS,
    SHORT_WINDOW_S,
    bearer,
    chat,
    check_openai_error,
    limiter_backend,
    overrides,
    poll,
    recv_json,
    sse,
    ws_url,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tokenwire.testing import GatewayServer


@pytest.fixture(params=BACKENDS)
def auth_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GatewayServer]:
    """A gateway of its own: the test blocks its client address."""
    with limiter_backend(request.param) as backend:
        extra = backend + "\nauth_failures_per_window = 5"
        with GatewayServer(tmp_path / "auth", overrides=overrides(SHORT_WINDOW_S, extra)) as gw:
            yield gw


async def test_failed_authentications_block_the_address_but_never_a_valid_key(
    auth_gateway: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """Five bad keys from one address: a sixth bad key gets 429 too_many_failed_authentications (HTTP and WS), a good key is still served; after the window a bad key is a 401 again."""
    gw = auth_gateway
    body = chat("auth", max_tokens=2)
    assert (await sse(http, gw, gw.api_key, body)).status == 200
    for i in range(5):
        bad = await sse(http, gw, f"tw-not-a-real-key-{i:02d}-xxxxxxxxxxxxxxxxxxxxxxxxxxxx", body)
        assert bad.status == 401, bad
        check_openai_error(bad.error, type_="authentication_error", code="invalid_api_key")
    wrong = "tw-not-a-real-key-99-xxxxxxxxxxxxxxxxxxxxxxxxxxxx"
    blocked = await sse(http, gw, wrong, body)
    blocked_at = time.monotonic()
    assert blocked.status == 429, blocked
    check_openai_error(
        blocked.error, type_="rate_limit_error", code="too_many_failed_authentications"
    )
    retry_after = int(blocked.headers["retry-after"])
    assert 1 <= retry_after <= math.ceil(SHORT_WINDOW_S)

    with pytest.raises(ConnectionClosed) as closed:
        async with connect(ws_url(gw), additional_headers=bearer(wrong)) as ws:
            await recv_json(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013, closed.value

    # the address is blocked, but a valid key is not refused, on either transport
    assert (await sse(http, gw, gw.api_key, body)).status == 200
    async with connect(ws_url(gw), additional_headers=bearer(gw.api_key)) as ws:
        await ws.send(json.dumps(body))
        assert (await recv_json(ws))["object"] == "chat.completion.chunk"

    served, served_at = await poll(
        lambda: sse(http, gw, wrong, body), lambda r: r.status != 429, SHORT_WINDOW_S + 3
    )
    assert served.status == 401, served
    assert served_at - blocked_at <= retry_after + 0.5
