"""The ``bare`` scenario's pass-through (``tokenwire.bench.passthrough``): it relays the
upstream's reply byte for byte with its status, and answers 502 when the upstream is down, so
that the ``bare`` row measures a real pass-through and fails loudly rather than silently."""

from __future__ import annotations

import re
import socket

import requests

from tokenwire.bench.passthrough import PassThrough
from tokenwire.testing import ServerThread, SimUpstreamServer

COMPLETION_ID = re.compile(rb'"id":"chatcmpl-[^"]*"')


def same_but_ids(content: bytes) -> bytes:
    """The reply with its completion id blanked (each request gets a new one)."""
    return COMPLETION_ID.sub(b'"id":""', content)


BODY = {
    "model": "sim",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "max_tokens": 4,
}


def test_relays_the_upstream_stream_byte_for_byte() -> None:
    """Two identical requests, one direct and one through the pass-through, get the same
    status, content type and bytes but the completion id (the simulator's reply is fixed)."""
    with (
        SimUpstreamServer(reply=["one", " two", " three", " four"]) as sim,
        ServerThread(PassThrough(sim.base_url)) as bare,
    ):
        direct = requests.post(sim.base_url + "/v1/chat/completions", json=BODY, timeout=10)
        relayed = requests.post(bare.base_url + "/v1/chat/completions", json=BODY, timeout=10)
        assert relayed.status_code == direct.status_code == 200
        assert relayed.headers["content-type"] == direct.headers["content-type"]
        assert same_but_ids(relayed.content) == same_but_ids(direct.content)
        assert COMPLETION_ID.search(relayed.content)
        assert relayed.content.rstrip().endswith(b"data: [DONE]")
        # The upstream connection went back to the pool: a second request works too.
        again = requests.post(bare.base_url + "/v1/chat/completions", json=BODY, timeout=10)
        assert same_but_ids(again.content) == same_but_ids(direct.content)


def test_an_upstream_error_keeps_its_status() -> None:
    """A request the upstream refuses (no messages) reaches the client with the upstream's
    4xx status, not a 200 or a 502."""
    with (
        SimUpstreamServer() as sim,
        ServerThread(PassThrough(sim.base_url)) as bare,
    ):
        direct = requests.post(sim.base_url + "/v1/chat/completions", json={}, timeout=10)
        relayed = requests.post(bare.base_url + "/v1/chat/completions", json={}, timeout=10)
    assert 400 <= direct.status_code < 500
    assert relayed.status_code == direct.status_code
    assert relayed.content == direct.content


def test_a_closed_upstream_is_a_502_and_get_is_ok() -> None:
    """With nothing listening upstream a POST gets 502 naming the failure; GET answers ok
    (bench's readiness poll)."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        with ServerThread(PassThrough(f"http://127.0.0.1:{port}")) as bare:
            failed = requests.post(bare.base_url + "/v1/chat/completions", json=BODY, timeout=10)
            ready = requests.get(bare.base_url + "/", timeout=10)
    assert failed.status_code == 502
    assert b"upstream failed" in failed.content
    assert ready.status_code == 200
    assert ready.content == b"ok"
