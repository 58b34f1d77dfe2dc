"""The opt-in ``cost_micro`` in usage: a chat-completions request with
``X-Tokenwire-Include-Cost: true`` (WebSocket: ``include_cost``, tested through the Python
client) gets its charge in its final usage; others get OpenAI's usage unchanged."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tokenwire.testing import FAST_SIM, GatewayServer, paced_sim, priced_model

OVERRIDES = FAST_SIM + paced_sim("slow", itl_ms=40.0) + priced_model("slow-sim", "slow")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    with GatewayServer(Path(tmp_path_factory.mktemp("cost")), overrides=OVERRIDES) as server:
        yield server


def post(gw: GatewayServer, path: str, key: str, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
    return requests.post(gw.base_url + path, headers=headers, timeout=30, **kwargs)


def events(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The JSON events of an SSE response, as they arrive."""
    for line in response.iter_lines():
        if line.startswith(b"data: {"):
            yield json.loads(line[6:])


@pytest.mark.parametrize("stream", [True, False])
def test_the_charge_is_in_the_usage_only_when_asked(gw: GatewayServer, stream: bool) -> None:
    """With X-Tokenwire-Include-Cost the final usage (streamed or JSON) carries cost_micro, equal to the ledger row's; without it, no cost_micro; the JSON answer names its stream id."""
    body: dict[str, Any] = {
        "model": "slow-sim",
        "max_tokens": 3,
        "stream": stream,
        "messages": [{"role": "user", "content": "what does it cost"}],
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    response = post(
        gw,
        "/v1/chat/completions",
        gw.api_key,
        json=body,
        headers={"X-Tokenwire-Include-Cost": "true"},
        stream=stream,
    )
    assert response.status_code == 200
    usage = list(events(response))[-1]["usage"] if stream else response.json()["usage"]
    completion_id = response.headers["x-stream-id"]
    rows = gw.usage_rows(gw.api_key, including=[completion_id])
    (row,) = [r for r in rows if r["completion_id"] == completion_id]
    assert usage["cost_micro"] == row["cost_micro"] == 3 * usage["prompt_tokens"] + 15 * 3
    plain = post(gw, "/v1/chat/completions", gw.api_key, json=body, stream=stream)
    plain_usage = list(events(plain))[-1]["usage"] if stream else plain.json()["usage"]
    assert set(plain_usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
