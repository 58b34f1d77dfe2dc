"""Bad input to POST /v1/chat/completions gets a 4xx OpenAI error body, and the server lives on."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import requests

from tokenwire.testing import GatewayServer

MSG = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "sim", "messages": MSG, **fields}).encode()


# (case id, raw body, expected status, expected param or None, expected code or None)
CASES: list[tuple[str, bytes, int, str | None, str | None]] = [
    ("empty body", b"", 400, None, None),
    ("not json", b"hello", 400, None, "invalid_json"),
    ("truncated json", b'{"model": "sim", "messages": [', 400, None, "invalid_json"),
    ("json array", b"[1, 2]", 400, None, None),
    ("json string", b'"sim"', 400, None, None),
    ("invalid utf-8", b'{"model": "sim\xff\xfe", "messages": []}', 400, None, None),
    ("missing model", json.dumps({"messages": MSG}).encode(), 400, "model", None),
    ("missing messages", json.dumps({"model": "sim"}).encode(), 400, "messages", None),
    ("model not a string", json.dumps({"model": 5, "messages": MSG}).encode(), 400, "model", None),
    ("empty model", json.dumps({"model": "", "messages": MSG}).encode(), 400, "model", None),
    ("empty messages", body(messages=[]), 400, "messages", None),
    ("messages not a list", body(messages="hi"), 400, "messages", None),
    ("message not an object", body(messages=["hi"]), 400, "messages[0]", None),
    (
        "unknown role",
        body(messages=[{"role": "wizard", "content": "x"}]),
        400,
        "messages[0].role",
        None,
    ),
    ("missing role", body(messages=[{"content": "x"}]), 400, "messages[0].role", None),
    (
        "content wrong type",
        body(messages=[{"role": "user", "content": 42}]),
        400,
        "messages[0].content",
        None,
    ),
    (
        "unknown content part",
        body(messages=[{"role": "user", "content": [{"type": "video", "x": 1}]}]),
        400,
        "messages[0].content[0].type",
        None,
    ),
    (
        "tool message without id",
        body(messages=[{"role": "tool", "content": "x"}]),
        400,
        "messages[0].tool_call_id",
        None,
    ),
    ("negative max_tokens", body(max_tokens=-1), 400, "max_tokens", None),
    ("zero max_tokens", body(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens as string", body(max_tokens="10"), 400, "max_tokens", None),
    (
        "max_completion_tokens float",
        body(max_completion_tokens=1.5),
        400,
        "max_completion_tokens",
        None,
    ),
    ("temperature too high", body(temperature=3), 400, "temperature", None),
    ("top_p negative", body(top_p=-0.1), 400, "top_p", None),
    ("n greater than one", body(n=2), 400, "n", "unsupported_value"),
    ("stream not a bool", body(stream="yes"), 400, "stream", None),
    ("too many stop sequences", body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("empty stop sequence", body(stop=[""]), 400, "stop[0]", None),
    ("empty stop string", body(stop=""), 400, "stop", None),
    ("max_tokens beyond every model", body(max_tokens=2**40), 400, "max_tokens", None),
    (
        "response_format json_schema not an object",
        body(response_format={"type": "json_schema", "json_schema": "x"}),
        400,
        "response_format.json_schema",
        None,
    ),
    (
        "tool without a function name",
        body(tools=[{"type": "function", "function": {}}]),
        400,
        "tools[0].function.name",
        None,
    ),
    (
        "stream_options without stream",
        body(stream_options={"include_usage": True}),
        400,
        "stream_options",
        None,
    ),
    ("tools not a list", body(tools={"type": "function"}), 400, "tools", None),
    ("seed not an int", body(seed="abc"), 400, "seed", None),
    ("unknown model", body(model="no-such-model"), 404, "model", "model_not_found"),
    (
        "nested depth bomb",
        b'{"model": "sim", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        400,
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("raw", "status", "param", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_request_gets_openai_error(
    gateway: GatewayServer, raw: bytes, status: int, param: str | None, code: str | None
) -> None:
    """Each malformed body gets its 4xx status and an OpenAI error naming the field."""
    response = requests.post(
        gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gateway.api_key}", "Content-Type": "application/json"},
        data=raw,
        timeout=10,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_huge_body_gets_413(gateway: GatewayServer) -> None:
    """A body over the configured limit (1 MiB by default) gets 413."""
    huge = body(messages=[{"role": "user", "content": "x" * (2 * 1024 * 1024)}])
    response = requests.post(
        gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        data=huge,
        timeout=10,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_huge_chunked_body_without_length_gets_413(gateway: GatewayServer) -> None:
    """A chunked body with no Content-Length is cut off at the limit too."""

    def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 65536

    response = requests.post(
        gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        data=chunks(),
        timeout=10,
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_api_key"),
        ("Bearer tw-not-a-real-key", "invalid_api_key"),
        ("Basic dXNlcjpwYXNz", "invalid_authorization_header"),
        ("Bearer ", "invalid_authorization_header"),
    ],
)
def test_bad_credentials_get_401(gateway: GatewayServer, header: str | None, code: str) -> None:
    """Missing, unknown or malformed credentials get 401 with an OpenAI error body."""
    headers = {} if header is None else {"Authorization": header}
    response = requests.post(
        gateway.base_url + "/v1/chat/completions", headers=headers, data=body(), timeout=10
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.json()["error"]["code"] == code


def test_unknown_route_and_method_get_json_errors(gateway: GatewayServer) -> None:
    """Unknown paths get 404 and wrong methods 405, both as OpenAI error bodies."""
    missing = requests.get(gateway.base_url + "/v1/nope", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = requests.get(gateway.base_url + "/v1/chat/completions", timeout=10)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_unconfigured_provider_names_the_variable(gateway: GatewayServer) -> None:
    """gpt-4.1 without OPENAI_API_KEY gets a 503 that says which variable to set."""
    response = requests.post(
        gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        data=body(model="gpt-4.1"),
        timeout=10,
    )
    assert response.status_code == 503
    assert "OPENAI_API_KEY" in response.json()["error"]["message"]


def test_server_keeps_serving_after_the_battery(gateway: GatewayServer) -> None:
    """After garbage on a raw socket and the battery above, a normal request still works."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as raw:
        raw.sendall(b"\x16\x03\x01garbage that is not http\r\n\r\n")
        raw.recv(1024)
    response = requests.post(
        gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        data=body(),
        timeout=10,
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] == "stop"
