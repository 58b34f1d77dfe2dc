"""Hostile input on every route: odd digits, huge numbers and deep JSON are 4xx naming the field.

Each case here was a 500 (``ValueError`` from ``int``, ``RecursionError`` from a JSON decoder)
before ``tokenwire.wire.untrusted`` took over the parsing.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tokenwire.api.webhooks import signature_header
from tokenwire.testing import GatewayServer

SECRET = "whsec_hostile"
DEEP = 10_000


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """One gateway with the webhook secret set."""
    env = {"TOKENWIRE_WEBHOOK_SECRET": SECRET}
    with GatewayServer(tmp_path_factory.mktemp("hostile"), env=env) as server:
        yield server


def raw_request(
    gw: GatewayServer,
    method: str,
    path: str,
    headers: dict[str, bytes | str],
    body: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    """Send headers as given (bytes pass through as latin-1), return status and JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def assert_400(status: int, body: dict[str, Any], param: str | None) -> None:
    assert status == 400, body
    error = body["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, error


@pytest.mark.parametrize(
    ("query", "header", "param"),
    [
        ("?starting_after=%C2%B2", None, "starting_after"),
        ("?starting_after=%D9%A1", None, "starting_after"),  # ARABIC-INDIC DIGIT ONE
        ("?starting_after=" + "9" * 5000, None, "starting_after"),
        ("?starting_after=-1", None, "starting_after"),
        ("", b"\xb2", "Last-Event-ID"),
        ("", b"9" * 5000, "Last-Event-ID"),
    ],
    ids=["superscript", "arabic-digit", "5000-digits", "negative", "header-latin1", "header-long"],
)
def test_resume_cursor_must_be_ascii_digits(
    gw: GatewayServer, query: str, header: bytes | None, param: str
) -> None:
    """A resume cursor that is not a short run of ASCII digits is a 400 naming where it came from."""
    headers: dict[str, bytes | str] = {"Authorization": f"Bearer {gw.api_key}"}
    if header is not None:
        headers["Last-Event-ID"] = header
    status, body = raw_request(gw, "GET", "/v1/chat/completions/abc/stream" + query, headers)
    assert_400(status, body, param)


@pytest.mark.parametrize(
    "timestamp",
    [b"\xb2", "²".encode(), b"9" * 5000, b"\xd9\xa1"],
    ids=["latin1-superscript", "utf8-superscript", "5000-digits", "utf8-arabic-digit"],
)
def test_webhook_timestamp_must_be_ascii_digits(gw: GatewayServer, timestamp: bytes) -> None:
    """The unauthenticated webhook's ``t=`` must be ASCII digits: anything else is a 400 invalid_signature."""
    headers: dict[str, bytes | str] = {"Tokenwire-Signature": b"t=" + timestamp + b",v1=00"}
    status, body = raw_request(gw, "POST", "/v1/billing/webhook", headers, b"{}")
    assert_400(status, body, "Tokenwire-Signature")
    assert body["error"]["code"] == "invalid_signature"


@pytest.mark.parametrize(
    "limit", ["9" * 5000, "\u0661\u0660", "²"], ids=["5000-digits", "arabic-ten", "superscript"]
)
def test_usage_limit_must_be_ascii_digits(gw: GatewayServer, limit: str) -> None:
    """``/v1/usage?limit=`` takes 1-1000 in ASCII digits; 5000 nines or Arabic-Indic digits are a 400."""
    response = requests.get(
        gw.base_url + "/v1/usage",
        params={"limit": limit},
        headers={"Authorization": f"Bearer {gw.api_key}"},
        timeout=10,
    )
    assert_400(response.status_code, response.json(), "limit")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_object(field: str, depth: int = DEEP, **fields: Any) -> bytes:
    prefix = json.dumps(fields)[:-1] + ", " if fields else "{"
    return f'{prefix}"{field}": {nested(depth)}}}'.encode()


CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}


ROUTES = [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/admin/keys", {"name": "deep"}),
    ("PATCH", "/v1/admin/keys/{key_id}", {}),
    ("POST", "/v1/admin/keys/{key_id}/topup", {"amount_usd": "1"}),
]


@pytest.mark.parametrize(
    ("method", "path", "fields"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES]
)
@pytest.mark.parametrize(("depth", "param"), [(150, "deep_field"), (DEEP, None)])
def test_deep_json_is_400_on_every_route(
    gw: GatewayServer,
    method: str,
    path: str,
    fields: dict[str, Any],
    depth: int,
    param: str | None,
) -> None:
    """JSON nested 150 deep is a 400 json_too_deep naming the top-level field; 10,000 deep (past msgspec's own limit) a 400 too."""
    body = deep_object("deep_field", depth, **fields)
    response = requests.request(
        method,
        gw.base_url + path.format(key_id=gw.api_key_id),
        data=body,
        headers={"Authorization": f"Bearer {gw.admin_key}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert_400(response.status_code, response.json(), param)
    assert response.json()["error"]["code"] == "json_too_deep"


@pytest.mark.parametrize(("depth", "param"), [(150, "data"), (DEEP, None)])
def test_deep_json_in_a_signed_webhook_is_400(
    gw: GatewayServer, depth: int, param: str | None
) -> None:
    """A correctly signed webhook whose ``data`` nests 150 or 10,000 deep is a 400, not a 500."""
    body = deep_object("data", depth, id="evt_1", type="payment.succeeded")
    headers = {"Tokenwire-Signature": signature_header(SECRET, body, int(time.time()))}
    response = requests.post(
        gw.base_url + "/v1/billing/webhook", data=body, headers=headers, timeout=10
    )
    assert_400(response.status_code, response.json(), param)
    assert response.json()["error"]["code"] == "json_too_deep"


def test_bare_deep_array_is_400(gw: GatewayServer) -> None:
    """A chat body that is nothing but 10,000 nested arrays is a 400."""
    response = requests.post(
        gw.base_url + "/v1/chat/completions",
        data=nested(DEEP),
        headers={"Authorization": f"Bearer {gw.api_key}"},
        timeout=10,
    )
    assert_400(response.status_code, response.json(), None)


def test_nesting_up_to_the_limit_is_accepted(gw: GatewayServer) -> None:
    """A chat body whose deepest value sits at the limit (100 levels) still streams."""
    body = deep_object("vendor_extension", 99, **CHAT)
    response = requests.post(
        gw.base_url + "/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {gw.api_key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "stop"
