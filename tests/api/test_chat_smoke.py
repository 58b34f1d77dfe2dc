"""End-to-end smoke tests of POST /v1/chat/completions over real HTTP."""

from __future__ import annotations

import requests

from tokenwire.testing import GatewayServer


def test_streaming_sim_ends_with_done(gateway: GatewayServer) -> None:
    """A streamed sim completion yields data: chunks, role first, finish last, then [DONE]."""
    response = requests.post(
        gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        json={"model": "sim", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        stream=True,
        timeout=10,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    data = [
        line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")
    ]
    assert data[-1] == "[DONE]"
    assert '"role":"assistant"' in data[0]
    assert '"finish_reason":"stop"' in data[-2]
