"""``/v1/responses`` over HTTP beyond the SDK: refusals naming the field, stored responses per
key, ``store: false``, delete, resume by ``sequence_number``, idempotency and limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tokenwire.testing import GatewayServer

MESSAGE = {"role": "user", "content": "hello"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    with GatewayServer(tmp_path_factory.mktemp("responses")) as server:
        yield server


def post(gw: GatewayServer, body: dict[str, Any], key: str | None = None, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {key or gw.api_key}", **kw.pop("headers", {})}
    return requests.post(
        gw.base_url + "/v1/responses", json=body, headers=headers, timeout=20, **kw
    )


def call(gw: GatewayServer, method: str, path: str, key: str | None = None, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {key or gw.api_key}", **kw.pop("headers", {})}
    return requests.request(method, gw.base_url + path, headers=headers, timeout=20, **kw)


def other_key(gw: GatewayServer) -> str:
    """A second API key, made with the admin API."""
    made = call(gw, "POST", "/v1/admin/keys", gw.admin_key, json={"name": "other"})
    assert made.status_code == 201
    key: str = made.json()["key"]
    return key


def sse_events(response: Any) -> list[dict[str, Any]]:
    """The JSON events of a Responses SSE stream."""
    return [
        json.loads(line[6:])
        for line in response.iter_lines(decode_unicode=True)
        if line.startswith("data: ")
    ]


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"background": True}, "background", "unsupported_parameter"),
        ({"conversation": "conv_1"}, "conversation", "unsupported_parameter"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_parameter"),
        ({"include": ["reasoning.encrypted_content"]}, "include", "unsupported_parameter"),
        ({"truncation": "auto"}, "truncation", "unsupported_parameter"),
        ({"text": {"verbosity": "low"}}, "text.verbosity", "unsupported_parameter"),
        ({"reasoning": {"summary": "auto"}}, "reasoning.summary", "unsupported_parameter"),
        ({"frobnicate": 1}, "frobnicate", "invalid_value"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "invalid_value"),
        ({"tools": [{"name": "f"}]}, "tools[0].type", "invalid_value"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "unsupported_value"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].image_url",
            "unsupported_value",
        ),
        (
            {"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
            "unsupported_value",
        ),
        ({"input": []}, "input", "invalid_value"),
        ({"input": None}, "input", "missing_required_parameter"),
        ({"max_output_tokens": 10**6}, "max_output_tokens", "invalid_value"),
        ({"metadata": {"k": "v" * 513}}, "metadata[...]", "invalid_value"),
    ],
)
def test_refusals_name_the_field(
    gw: GatewayServer, extra: dict[str, Any], param: str, code: str
) -> None:
    """What the gateway does not take is a 400 naming the field, never a 500."""
    response = post(gw, {"model": "sim", "input": "hi", **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_stored_responses_belong_to_their_key(gw: GatewayServer) -> None:
    """Another key cannot read, delete or continue a response: the same 404 as no response."""
    created = post(gw, {"model": "sim", "input": "mine"}).json()
    stranger = other_key(gw)
    assert call(gw, "GET", f"/v1/responses/{created['id']}", stranger).status_code == 404
    assert call(gw, "DELETE", f"/v1/responses/{created['id']}", stranger).status_code == 404
    chained = post(
        gw, {"model": "sim", "input": "x", "previous_response_id": created["id"]}, stranger
    )
    assert chained.status_code == 404
    assert chained.json()["error"]["code"] == "previous_response_not_found"
    assert chained.json()["error"]["param"] == "previous_response_id"
    assert call(gw, "GET", f"/v1/responses/{created['id']}").json() == created


def test_store_false_keeps_nothing(gw: GatewayServer) -> None:
    """``store: false``: the response is answered, then neither readable nor continuable."""
    created = post(gw, {"model": "sim", "input": "forget me", "store": False}).json()
    assert created["status"] == "completed" and created["store"] is False
    assert call(gw, "GET", f"/v1/responses/{created['id']}").status_code == 404
    chained = post(gw, {"model": "sim", "input": "x", "previous_response_id": created["id"]})
    assert chained.status_code == 404


def test_delete_then_gone(gw: GatewayServer) -> None:
    """DELETE answers response.deleted once; then GET and a second DELETE are 404."""
    created = post(gw, {"model": "sim", "input": "short-lived"}).json()
    deleted = call(gw, "DELETE", f"/v1/responses/{created['id']}")
    assert deleted.json() == {"id": created["id"], "object": "response.deleted", "deleted": True}
    assert call(gw, "GET", f"/v1/responses/{created['id']}").status_code == 404
    assert call(gw, "DELETE", f"/v1/responses/{created['id']}").status_code == 404


def test_resume_replays_the_events_after_a_sequence_number(gw: GatewayServer) -> None:
    """A resumable stream read again with starting_after=N gives the same events after N."""
    body = {"model": "sim", "input": "resume me", "stream": True}
    with post(gw, body, headers={"X-Tokenwire-Resumable": "true"}, stream=True) as response:
        assert response.status_code == 200
        original = sse_events(response)
    response_id = original[0]["response"]["id"]
    path = f"/v1/responses/{response_id}?stream=true&starting_after=5"
    with call(gw, "GET", path, stream=True) as again:
        assert again.status_code == 200
        replayed = sse_events(again)
    assert replayed == original[6:]
    with call(gw, "GET", f"/v1/responses/{response_id}?stream=true", stream=True) as whole:
        assert sse_events(whole) == original
    bad = call(gw, "GET", f"/v1/responses/{response_id}?stream=true&starting_after=x")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "starting_after"


def test_idempotency_key_answers_the_first_response(gw: GatewayServer) -> None:
    """A retried create with the same Idempotency-Key and body is the same response."""
    body = {"model": "sim", "input": "only once"}
    headers = {"Idempotency-Key": "retry-me-1"}
    first = post(gw, body, headers=headers).json()
    second = post(gw, body, headers=headers).json()
    assert first["id"] == second["id"] and first["output"] == second["output"]
    conflict = post(gw, {**body, "input": "another"}, headers=headers)
    assert conflict.status_code == 409


def test_every_event_is_named_and_numbered(gw: GatewayServer) -> None:
    """Over SSE each event's ``event:`` is its type and its ``id:`` its sequence_number."""
    with post(gw, {"model": "sim", "input": "names", "stream": True}, stream=True) as response:
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    ids = [int(line[4:]) for line in lines if line.startswith("id: ")]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert names == [event["type"] for event in data]
    assert ids == [event["sequence_number"] for event in data] == list(range(len(data)))
    assert "[DONE]" not in "\n".join(lines)
