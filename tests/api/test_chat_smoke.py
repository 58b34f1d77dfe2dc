"""End-to-end smoke tests of POST /v1/chat/completions over real HTTP."""

from __future__ import annotations

import json

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


def test_local_model_streams_over_http(gateway: GatewayServer) -> None:
    """The real local model (SmolLM2 via llama.cpp) streams chunks, exact usage, then [DONE]."""
    response = requests.post(
        gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        json={
            "model": "local",
            "messages": [{"role": "user", "content": "Name a colour."}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 8,
            "seed": 1,
        },
        stream=True,
        timeout=120,
    )
    assert response.status_code == 200
    data = [
        line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")
    ]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.strip()
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    usage = chunks[-1]["usage"]
    assert finish in ("stop", "length")
    assert 0 < usage["completion_tokens"] <= 8
    assert usage["prompt_tokens"] > 5
    assert finish == "stop" or usage["completion_tokens"] == 8
