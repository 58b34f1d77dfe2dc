"""``/v1/ws/chat`` in envelope mode, over real sockets against live gateways
(docs/websocket-protocol.md): twenty multiplexed requests each get their own text, increasing
sequence numbers and a done; a request_id may be reused once done; cancel ends a request with a
``cancelled`` done and frees its generation; closing the socket cancels what is running.
"""

from __future__ import annotations

import itertools
import json
import time

from tests.api.conftest import (
    await_until,
    bearer,
    chat,
    check_envelope_request,
    content_of,
    create,
    expected,
    read_envelopes,
    recv_json,
    still_open,
    usage_of,
    ws_url,
)
from websockets.asyncio.client import connect

from tokenwire.testing import GatewayServer


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
