"""A plain ``requests`` SSE loop (``stream=True`` / ``iter_lines``) and ``GET /v1/models``."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tokenwire.providers.sim import plan
from tokenwire.testing import GatewayServer
from tokenwire.wire.schema import decode_chat_request

SLOW_SIM = """
[providers.sim]
kind = "sim"
ttft_ms = 0.0
itl_ms = 50.0
"""
TOKENS = 10
ITL_S = 0.050


@pytest.fixture(scope="module")
def slow_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """A gateway whose ``sim`` waits 50 ms between tokens."""
    with GatewayServer(tmp_path_factory.mktemp("slow"), overrides=SLOW_SIM) as server:
        yield server


def read_sse(response: requests.Response) -> list[tuple[float, str]]:
    """``(arrival time, data)`` for every ``data:`` line, up to and including ``[DONE]``."""
    received: list[tuple[float, str]] = []
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        received.append((time.monotonic(), data))
        if data == "[DONE]":
            break
    return received


def test_tokens_arrive_incrementally(slow_gateway: GatewayServer) -> None:
    """The first content line arrives >= 300 ms before [DONE] (10 tokens 50 ms apart)."""
    body: dict[str, Any] = {
        "model": "sim",
        "messages": [{"role": "user", "content": "count slowly"}],
        "max_tokens": TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sim = plan(decode_chat_request(json.dumps(body).encode()))
    with requests.post(
        slow_gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {slow_gateway.api_key}"},
        json=body,
        stream=True,
        timeout=10,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = read_sse(response)

    assert received[-1][1] == "[DONE]"
    done_at = received[-1][0]
    chunks = [(at, json.loads(data)) for at, data in received[:-1]]
    content = [
        (at, c) for at, c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    assert [c["choices"][0]["delta"]["content"] for _, c in content] == list(sim.tokens)
    assert len(content) == TOKENS
    assert {c["id"] for _, c in chunks} == {chunks[0][1]["id"]}
    assert chunks[-1][1]["choices"] == []
    assert chunks[-1][1]["usage"]["completion_tokens"] == TOKENS
    assert chunks[-2][1]["choices"][0]["finish_reason"] == "length"

    first_at, last_at = content[0][0], content[-1][0]
    # 9 gaps of 50 ms (450 ms) separate the first and the last token; demand 300 ms.
    assert done_at - first_at >= 0.300
    assert last_at - first_at >= 0.300
    # the arrivals are spread out, not bunched at the end
    arrivals = [at for at, _ in content]
    assert sum(1 for a, b in itertools.pairwise(arrivals) if b - a >= ITL_S / 2) >= 5


def test_sse_event_ids_increase(slow_gateway: GatewayServer) -> None:
    """Each chunk event has an ``id:`` line, increasing by one; [DONE] has none."""
    with requests.post(
        slow_gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {slow_gateway.api_key}"},
        json={
            "model": "sim",
            "messages": [{"role": "user", "content": "ids"}],
            "max_tokens": 3,
            "stream": True,
        },
        stream=True,
        timeout=10,
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    ids = [int(line[len("id: ") :]) for line in lines if line.startswith("id: ")]
    data_lines = [line for line in lines if line.startswith("data: ")]
    assert len(ids) == len(data_lines) - 1  # every chunk but [DONE]
    assert ids == list(range(ids[0], ids[0] + len(ids)))


def test_models_with_valid_key(gateway: GatewayServer) -> None:
    """GET /v1/models with the valid key answers 200 with an OpenAI list including sim."""
    response = requests.get(
        gateway.base_url + "/v1/models",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert payload["object"] == "list"
    ids = [m["id"] for m in payload["data"]]
    assert "sim" in ids
    assert all(m["object"] == "model" for m in payload["data"])


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Authorization": "Bearer tw-wrong-key"}, "invalid_api_key"),
        ({}, "missing_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_authorization_header"),
    ],
)
def test_models_with_wrong_key(gateway: GatewayServer, headers: dict[str, str], code: str) -> None:
    """GET /v1/models without a valid key answers 401 with an OpenAI error body."""
    response = requests.get(gateway.base_url + "/v1/models", headers=headers, timeout=10)
    assert response.status_code == 401
    payload = response.json()
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["type"] == "authentication_error"
    assert error["param"] is None
    assert error["code"] == code
