"""``POST /v1/chat/completions/{id}/cancel`` and the opt-in ``cost_micro`` in usage.

A resumable stream survives its connection (it waits for its client to come back), so a
client that wants it stopped says so: the cancel stops the generation at once, only for the
key that made it. A request with ``X-Tokenwire-Include-Cost: true`` (WebSocket:
``include_cost``) gets its charge in the final usage; others get OpenAI's usage unchanged.
"""

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
    with GatewayServer(Path(tmp_path_factory.mktemp("cancel")), overrides=OVERRIDES) as server:
        yield server


def post(gw: GatewayServer, path: str, key: str, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
    return requests.post(gw.base_url + path, headers=headers, timeout=30, **kwargs)


def events(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The JSON events of an SSE response, as they arrive."""
    for line in response.iter_lines():
        if line.startswith(b"data: {"):
            yield json.loads(line[6:])


def test_cancel_stops_a_resumable_stream_for_its_key_only(gw: GatewayServer) -> None:
    """After two chunks, another key's cancel is a 404 and changes nothing; the owner's is a 204 and the stream ends at once with finish_reason cancelled; the ledger row says cancelled; a second cancel is a 204 too."""
    _, other = gw.create_key("other")
    body = {
        "model": "slow-sim",
        "max_tokens": 500,
        "stream": True,
        "messages": [{"role": "user", "content": "cancel me"}],
        "stream_options": {"include_usage": True},
    }
    with post(
        gw,
        "/v1/chat/completions",
        gw.api_key,
        json=body,
        headers={"X-Tokenwire-Resumable": "true"},
        stream=True,
    ) as response:
        stream_id = response.headers["x-stream-id"]
        reader = events(response)
        next(reader), next(reader)
        assert post(gw, f"/v1/chat/completions/{stream_id}/cancel", other).status_code == 404
        cancel = post(gw, f"/v1/chat/completions/{stream_id}/cancel", gw.api_key)
        assert cancel.status_code == 204
        rest = list(reader)
    finishes = [c["choices"][0]["finish_reason"] for c in rest if c["choices"]]
    assert finishes[-1] == "cancelled"
    assert rest[-1]["usage"]["completion_tokens"] < 100
    assert "cost_micro" not in rest[-1]["usage"]  # not asked for
    rows = gw.usage_rows(gw.api_key, including=[stream_id])
    (row,) = [r for r in rows if r["completion_id"] == stream_id]
    assert row["status"] == "cancelled"
    again = post(gw, f"/v1/chat/completions/{stream_id}/cancel", gw.api_key)
    assert again.status_code == 204
    unknown = post(gw, "/v1/chat/completions/chatcmpl-nope/cancel", gw.api_key)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "stream_not_found"


@pytest.mark.parametrize("stream", [True, False])
def test_the_charge_is_in_the_usage_only_when_asked(gw: GatewayServer, stream: bool) -> None:
    """With X-Tokenwire-Include-Cost the final usage (streamed or JSON) carries cost_micro, equal to the ledger row's; the JSON answer names its stream id."""
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
