"""The admin API over real HTTP on SQLite and PostgreSQL: key CRUD, limits, credits, rotation.

Every refused request is checked to have changed nothing: the key record and its balance are
read back after each one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tokenwire.testing import FAST_SIM, GatewayServer

GRANT = "1.50"  # accounting.free_grant_usd in these tests
GRANT_MICRO = 1_500_000
OVERRIDES = FAST_SIM + f'\n[accounting]\nfree_grant_usd = "{GRANT}"\n'


@pytest.fixture
def gw(database_url: str, tmp_path: Path) -> Iterator[GatewayServer]:
    """A gateway with a free grant, on SQLite or PostgreSQL."""
    with GatewayServer(tmp_path / "gw", overrides=OVERRIDES, database_url=database_url) as server:
        yield server


@pytest.fixture(scope="module")
def sqlite_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """One SQLite gateway for the tests that do not depend on the database."""
    with GatewayServer(tmp_path_factory.mktemp("admin"), overrides=OVERRIDES) as server:
        yield server


def call(
    gw: GatewayServer, method: str, path: str, key: str | None = None, **kwargs: Any
) -> requests.Response:
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return requests.request(method, gw.base_url + path, headers=headers, timeout=10, **kwargs)


def admin(gw: GatewayServer, method: str, path: str, **kwargs: Any) -> requests.Response:
    return call(gw, method, path, gw.admin_key, **kwargs)


def create(gw: GatewayServer, **body: Any) -> dict[str, Any]:
    response = admin(gw, "POST", "/v1/admin/keys", json={"name": "k", **body})
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def get(gw: GatewayServer, key_id: str) -> dict[str, Any]:
    response = admin(gw, "GET", f"/v1/admin/keys/{key_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def models_status(gw: GatewayServer, key: str) -> int:
    return call(gw, "GET", "/v1/models", key).status_code


def assert_error(response: requests.Response, status: int, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error


def test_create_get_list_update_revoke(gw: GatewayServer) -> None:
    """A created key carries its limits, models and grant + credits; PATCH changes and clears; revoke ends it."""
    created = create(
        gw,
        name="team-a",
        rpm=60,
        tpm=100_000,
        max_concurrent_streams=4,
        credits_usd="12.50",
        models=["sim", "gpt-4.1", "sim"],
    )
    key = created.pop("key")
    assert key.startswith("tw-") and created["prefix"] == key[:10]
    assert created["object"] == "api_key" and created["id"].startswith("key_")
    assert (created["name"], created["admin"], created["status"]) == ("team-a", False, "active")
    assert (created["rpm"], created["tpm"], created["max_concurrent_streams"]) == (60, 100_000, 4)
    assert created["models"] == ["sim", "gpt-4.1"]
    assert created["balance_micro"] == GRANT_MICRO + 12_500_000
    assert created["balance_usd"] == "14.000000"
    assert models_status(gw, key) == 200

    assert get(gw, created["id"]) == created
    listed = admin(gw, "GET", "/v1/admin/keys").json()
    assert listed["object"] == "list"
    assert sorted(k["name"] for k in listed["data"]) == ["admin", "team-a", "test"]
    assert all("key" not in k for k in listed["data"])

    patched = admin(
        gw,
        "PATCH",
        f"/v1/admin/keys/{created['id']}",
        json={"name": "team-b", "rpm": None, "tpm": 5000, "models": None},
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert (body["name"], body["rpm"], body["tpm"], body["models"]) == ("team-b", None, 5000, None)
    assert body["max_concurrent_streams"] == 4  # absent: unchanged
    assert body["balance_micro"] == created["balance_micro"]
    assert get(gw, created["id"]) == body

    expiry = admin(
        gw, "PATCH", f"/v1/admin/keys/{created['id']}", json={"expires_at": "2999-01-01T00:00:00Z"}
    )
    assert expiry.json()["expires_at"] == 32472144000
    cleared = admin(gw, "PATCH", f"/v1/admin/keys/{created['id']}", json={"expires_at": None})
    assert cleared.json()["expires_at"] is None

    revoked = admin(gw, "POST", f"/v1/admin/keys/{created['id']}/revoke")
    assert revoked.status_code == 200
    assert revoked.json()["status"] == "revoked" and revoked.json()["revoked_at"] is not None
    assert models_status(gw, key) == 401
    again = admin(gw, "POST", f"/v1/admin/keys/{created['id']}/revoke")
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]


def test_create_admin_key_and_defaults(sqlite_gw: GatewayServer) -> None:
    """A minimal body gives an unlimited key with just the free grant; admin: true makes an admin key that works."""
    gw = sqlite_gw
    plain = create(gw, name="minimal")
    assert (plain["rpm"], plain["tpm"], plain["max_concurrent_streams"]) == (None, None, None)
    assert plain["models"] is None and plain["expires_at"] is None
    assert plain["balance_micro"] == GRANT_MICRO and plain["admin"] is False
    boss = create(gw, name="second-admin", admin=True, credits_usd=2)
    assert boss["admin"] is True and boss["balance_micro"] == GRANT_MICRO + 2_000_000
    assert call(gw, "GET", "/v1/admin/keys", boss["key"]).status_code == 200
    assert call(gw, "GET", "/v1/admin/keys", plain["key"]).status_code == 403


def test_secret_digests_are_never_returned(sqlite_gw: GatewayServer) -> None:
    """No admin response contains a key's HMAC digest or a plaintext other than the one just issued."""
    gw = sqlite_gw
    created = create(gw, name="digest-check")
    digest = gw.state.keys.digest(created["key"])
    bodies = [
        admin(gw, "GET", "/v1/admin/keys").text,
        admin(gw, "GET", f"/v1/admin/keys/{created['id']}").text,
        admin(gw, "PATCH", f"/v1/admin/keys/{created['id']}", json={"rpm": 5}).text,
        admin(gw, "POST", f"/v1/admin/keys/{created['id']}/topup", json={"amount_usd": "1"}).text,
    ]
    for text in bodies:
        assert digest not in text and "secret_hash" not in text and created["key"] not in text


def test_admin_routes_need_an_admin_key(sqlite_gw: GatewayServer) -> None:
    """Every admin route: 401 without a key or with a bad one, 403 permission_error for a normal key."""
    gw = sqlite_gw
    target = gw.api_key_id
    routes = [
        ("POST", "/v1/admin/keys", {"name": "x"}),
        ("GET", "/v1/admin/keys", None),
        ("GET", f"/v1/admin/keys/{target}", None),
        ("PATCH", f"/v1/admin/keys/{target}", {"rpm": 1}),
        ("POST", f"/v1/admin/keys/{target}/revoke", None),
        ("POST", f"/v1/admin/keys/{target}/rotate", None),
        ("POST", f"/v1/admin/keys/{target}/topup", {"amount_usd": "5"}),
        ("GET", "/v1/admin/usage", None),
    ]
    before = get(gw, target)
    count = len(admin(gw, "GET", "/v1/admin/keys").json()["data"])
    for method, path, body in routes:
        assert_error(call(gw, method, path, None, json=body), 401)
        assert_error(call(gw, method, path, "tw-not-a-real-key", json=body), 401)
        forbidden = call(gw, method, path, gw.api_key, json=body)
        assert_error(forbidden, 403)
        assert forbidden.json()["error"]["type"] == "permission_error"
    assert get(gw, target) == before
    assert models_status(gw, gw.api_key) == 200
    assert len(admin(gw, "GET", "/v1/admin/keys").json()["data"]) == count


BAD_CREATES: list[tuple[Any, str | None]] = [
    ({"name": "x", "rpm": -1}, "rpm"),
    ({"name": "x", "rpm": 0}, "rpm"),
    ({"name": "x", "tpm": "100"}, "tpm"),
    ({"name": "x", "max_concurrent_streams": 1.5}, "max_concurrent_streams"),
    ({"name": "x", "rpm": 2**31}, "rpm"),
    ({"name": "x", "credits_usd": "-1"}, "credits_usd"),
    ({"name": "x", "credits_usd": "1.0000001"}, "credits_usd"),
    ({"name": "x", "credits_usd": "ten"}, "credits_usd"),
    ({"name": "x", "credits_usd": "NaN"}, "credits_usd"),
    ({"name": "x", "credits_usd": True}, "credits_usd"),
    ({"name": "x", "credits_usd": "2000000000"}, "credits_usd"),
    ({"name": "x", "models": "sim"}, "models"),
    ({"name": "x", "models": []}, "models"),
    ({"name": "x", "models": ["sim", "no-such-model"]}, "models"),
    ({"name": "x", "expires_at": "yesterday"}, "expires_at"),
    ({"name": "x", "expires_at": 1}, "expires_at"),
    ({"name": "x", "expires_at": "2001-01-01"}, "expires_at"),
    ({"name": "x", "admin": "yes"}, "admin"),
    ({"name": "x", "balance_micro": 10**9}, "balance_micro"),
    ({"name": "x", "is_admin": True}, "is_admin"),
    ({"name": "x", "plan": "gold"}, "plan"),
    ({"name": "x", "plan": ""}, "plan"),
    ({"name": "x", "plan": 3}, "plan"),
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"name": 5}, "name"),
    ({}, "name"),
    ([], None),
    ("not json", None),
]


def test_bad_creates_are_400_and_create_nothing(gw: GatewayServer) -> None:
    """Each invalid create body is 400 naming the field, and no key (and no credit) appears."""
    before = admin(gw, "GET", "/v1/admin/keys").json()["data"]
    for body, param in BAD_CREATES:
        if isinstance(body, str):
            response = admin(gw, "POST", "/v1/admin/keys", data=body)
        else:
            response = admin(gw, "POST", "/v1/admin/keys", json=body)
        assert_error(response, 400, param)
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert_error(admin(gw, "POST", "/v1/admin/keys"), 400)  # empty body
    assert admin(gw, "GET", "/v1/admin/keys").json()["data"] == before


BAD_PATCHES: list[tuple[dict[str, Any], str]] = [
    ({"rpm": -5}, "rpm"),
    ({"tpm": 0}, "tpm"),
    ({"max_concurrent_streams": "2"}, "max_concurrent_streams"),
    ({"name": None}, "name"),
    ({"name": ""}, "name"),
    ({"models": ["nope"]}, "models"),
    ({"models": []}, "models"),
    ({"expires_at": "2000-01-01"}, "expires_at"),
    ({"admin": True}, "admin"),
    ({"balance_micro": 1}, "balance_micro"),
    ({"rpm": 10, "colour": "blue"}, "colour"),
    ({"rpm": 10, "tpm": -1}, "tpm"),
    ({"plan": "gold"}, "plan"),
    ({"rpm": 9, "plan": "gold"}, "plan"),
]


def test_bad_patches_are_400_and_change_nothing(gw: GatewayServer) -> None:
    """Each invalid PATCH is 400 naming the field, and the key reads back unchanged (a valid field beside a bad one is not applied)."""
    target = create(gw, name="stable", rpm=7, tpm=700, models=["sim"])
    target.pop("key")
    for body, param in BAD_PATCHES:
        response = admin(gw, "PATCH", f"/v1/admin/keys/{target['id']}", json=body)
        assert_error(response, 400, param)
        assert get(gw, target["id"]) == target, body
    assert_error(admin(gw, "PATCH", f"/v1/admin/keys/{target['id']}", data="{"), 400)
    assert get(gw, target["id"]) == target


def test_plans_are_set_at_creation_and_changed_by_patch(gw: GatewayServer) -> None:
    """A key is created on a plan or on none (the default); PATCH moves it to another plan or
    back to the default with null; the key object shows the plan."""
    plain = create(gw, name="default buyer")
    assert plain["plan"] is None
    buyer = create(gw, name="at cost", plan="at-cost")
    assert buyer["plan"] == "at-cost" and get(gw, buyer["id"])["plan"] == "at-cost"
    moved = admin(gw, "PATCH", f"/v1/admin/keys/{buyer['id']}", json={"plan": "standard"})
    assert moved.status_code == 200 and moved.json()["plan"] == "standard"
    back = admin(gw, "PATCH", f"/v1/admin/keys/{buyer['id']}", json={"plan": None})
    assert back.status_code == 200 and back.json()["plan"] is None
    listed = {k["id"]: k["plan"] for k in admin(gw, "GET", "/v1/admin/keys").json()["data"]}
    assert listed[buyer["id"]] is None and listed[plain["id"]] is None


def test_topup(gw: GatewayServer) -> None:
    """A top-up adds exactly the amount (strings and numbers alike) and answers the new balance; the key can spend it."""
    target = create(gw, name="wallet")
    response = admin(
        gw, "POST", f"/v1/admin/keys/{target['id']}/topup", json={"amount_usd": "10.25"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["amount_micro"] == 10_250_000 and body["amount_usd"] == "10.250000"
    assert body["balance_micro"] == GRANT_MICRO + 10_250_000
    assert body["balance_usd"] == "11.750000"
    second = admin(
        gw,
        "POST",
        f"/v1/admin/keys/{target['id']}/topup",
        json={"amount_usd": 0.1, "note": "goodwill"},
    )
    assert second.json()["balance_micro"] == GRANT_MICRO + 10_350_000
    assert get(gw, target["id"])["balance_micro"] == GRANT_MICRO + 10_350_000


BAD_TOPUPS: list[tuple[Any, str | None]] = [
    ({"amount_usd": "0"}, "amount_usd"),
    ({"amount_usd": 0}, "amount_usd"),
    ({"amount_usd": "-5"}, "amount_usd"),
    ({"amount_usd": -5}, "amount_usd"),
    ({"amount_usd": "0.0000001"}, "amount_usd"),
    ({"amount_usd": "1e3"}, "amount_usd"),
    ({"amount_usd": "abc"}, "amount_usd"),
    ({"amount_usd": None}, "amount_usd"),
    ({"amount_usd": [1]}, "amount_usd"),
    ({"amount_usd": "1000000001"}, "amount_usd"),
    ({}, "amount_usd"),
    ({"amount_usd": "5", "payment_id": "x"}, "payment_id"),
    ({"amount_usd": "5", "note": "n" * 501}, "note"),
]


def test_bad_topups_are_400_and_change_nothing(gw: GatewayServer) -> None:
    """Zero, negative, over-precise, malformed or oversized top-ups are 400 naming the field; the balance stays."""
    target = create(gw, name="wallet")
    target.pop("key")
    for body, param in BAD_TOPUPS:
        response = admin(gw, "POST", f"/v1/admin/keys/{target['id']}/topup", json=body)
        assert_error(response, 400, param)
        assert get(gw, target["id"]) == target, body


def test_unknown_key_ids_are_404_and_change_nothing(sqlite_gw: GatewayServer) -> None:
    """GET, PATCH, revoke, rotate and top-up of an unknown id: 404 with param id; no key appears."""
    gw = sqlite_gw
    before = admin(gw, "GET", "/v1/admin/keys").json()["data"]
    for method, suffix, body in [
        ("GET", "", None),
        ("PATCH", "", {"rpm": 3}),
        ("PATCH", "", {}),
        ("POST", "/revoke", None),
        ("POST", "/rotate", None),
        ("POST", "/topup", {"amount_usd": "5"}),
    ]:
        response = admin(gw, method, f"/v1/admin/keys/key_doesnotexist{suffix}", json=body)
        assert_error(response, 404)
        assert response.json()["error"]["param"] in ("id", "key_id")
    assert admin(gw, "GET", "/v1/admin/keys").json()["data"] == before


def test_rotate(gw: GatewayServer) -> None:
    """Rotation: the old key gets 401 at once, the new one works, id, limits and balance stay; a revoked key cannot rotate."""
    target = create(gw, name="rotating", rpm=100, credits_usd="3")
    old = target.pop("key")
    assert models_status(gw, old) == 200
    response = admin(gw, "POST", f"/v1/admin/keys/{target['id']}/rotate")
    assert response.status_code == 200, response.text
    rotated = response.json()
    new = rotated.pop("key")
    assert new != old and new.startswith("tw-") and rotated["prefix"] == new[:10]
    assert {k: v for k, v in rotated.items() if k != "prefix"} == {
        k: v for k, v in target.items() if k != "prefix"
    }
    assert models_status(gw, old) == 401
    assert models_status(gw, new) == 200
    admin(gw, "POST", f"/v1/admin/keys/{target['id']}/revoke")
    refused = admin(gw, "POST", f"/v1/admin/keys/{target['id']}/rotate")
    assert_error(refused, 409, "id")
    assert models_status(gw, new) == 401


def test_an_admin_key_cannot_revoke_itself(tmp_path: Path) -> None:
    """Revoking the caller's own admin key is a 409 cannot_revoke_own_key that changes nothing; another admin key may revoke it."""
    with GatewayServer(tmp_path / "gw", overrides=OVERRIDES) as gw:
        keys = admin(gw, "GET", "/v1/admin/keys").json()["data"]
        own = next(k for k in keys if k["prefix"] == gw.admin_key[:10])
        refused = admin(gw, "POST", f"/v1/admin/keys/{own['id']}/revoke")
        assert_error(refused, 409, "id")
        assert refused.json()["error"]["code"] == "cannot_revoke_own_key"
        assert get(gw, own["id"]) == own
        assert models_status(gw, gw.admin_key) == 200
        other = create(gw, name="second admin", admin=True)
        revoked = call(gw, "POST", f"/v1/admin/keys/{own['id']}/revoke", other["key"])
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["status"] == "revoked"
        assert models_status(gw, gw.admin_key) == 401


def test_admin_usage_bad_queries(sqlite_gw: GatewayServer) -> None:
    """Bad group_by, times, reversed ranges and unknown parameters are 400 naming the parameter."""
    gw = sqlite_gw
    for query, param in [
        ("group_by=key,colour", "group_by"),
        ("start=tomorrow", "start"),
        ("end=-5", "end"),
        ("start=2025-01-02&end=2025-01-01", "end"),
        ("since=2025-01-01", "since"),
    ]:
        assert_error(admin(gw, "GET", f"/v1/admin/usage?{query}"), 400, param)
    ok = admin(gw, "GET", "/v1/admin/usage?start=2025-01-01&end=1767225600&group_by=")
    assert ok.status_code == 200, ok.text
    assert ok.json()["group_by"] == []


def test_openapi_documents_the_accounting_routes(sqlite_gw: GatewayServer) -> None:
    """/openapi.json lists the admin, usage and webhook routes with their request schemas."""
    document = requests.get(sqlite_gw.base_url + "/openapi.json", timeout=10).json()
    paths = document["paths"]
    for path, method in [
        ("/v1/admin/keys", "post"),
        ("/v1/admin/keys", "get"),
        ("/v1/admin/keys/{key_id}", "patch"),
        ("/v1/admin/keys/{key_id}/revoke", "post"),
        ("/v1/admin/keys/{key_id}/rotate", "post"),
        ("/v1/admin/keys/{key_id}/topup", "post"),
        ("/v1/admin/usage", "get"),
        ("/v1/usage", "get"),
        ("/v1/billing/webhook", "post"),
        ("/v1/signup", "post"),
    ]:
        assert method in paths[path], (path, method)
    schemas = document["components"]["schemas"]
    assert schemas["CreateKeyRequest"]["additionalProperties"] is False
    assert schemas["CreateKeyRequest"]["properties"]["rpm"]["anyOf"][0]["minimum"] == 1
    assert "amount_usd" in schemas["TopupRequest"]["required"]
    plans = schemas["CreateKeyRequest"]["properties"]["plan"]["anyOf"]
    assert {"standard", "at-cost"} <= set(next(b for b in plans if "enum" in b)["enum"])
    report = paths["/v1/admin/usage"]["get"]["responses"]["200"]["content"]
    assert report["application/json"]["schema"]["properties"]["data"]["items"] == {
        "$ref": "#/components/schemas/UsageReportRow"
    }
    assert {"cost_micro", "charge_micro", "margin_micro"} <= set(
        schemas["UsageReportTotal"]["required"]
    )


def test_runtime_counts_return_after_traffic(gw: GatewayServer) -> None:
    """GET /v1/admin/runtime (admin only) reports the process's counts; after 20 streamed
    completions they are back where they were: no task, file, connection or slot left."""
    admin = {"Authorization": f"Bearer {gw.admin_key}"}
    user = {"Authorization": f"Bearer {gw.api_key}"}
    refused = requests.get(f"{gw.base_url}/v1/admin/runtime", headers=user, timeout=10)
    assert refused.status_code == 403

    def counts() -> dict[str, Any]:
        reply = requests.get(f"{gw.base_url}/v1/admin/runtime", headers=admin, timeout=10)
        assert reply.status_code == 200
        data: dict[str, Any] = reply.json()
        return data

    before = counts()
    body = {"model": "sim", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    for _ in range(20):
        with requests.post(
            f"{gw.base_url}/v1/chat/completions", json=body, headers=user, stream=True, timeout=10
        ) as reply:
            assert reply.status_code == 200
            assert reply.text.rstrip().endswith("data: [DONE]")
    deadline = time.monotonic() + 10
    after = counts()
    while (after["live_generations"] or after["ledger_queued"]) and time.monotonic() < deadline:
        time.sleep(0.02)
        after = counts()
    for name in ("live_generations", "stream_slots_held", "ledger_queued", "ledger_held_in_memory"):
        assert after[name] == 0, name
    assert after["tasks"] <= before["tasks"] + 2  # the ledger writer may have started
    # the client's keep-alive socket and the server's end of it; on SQLite, the pooled
    # connection the ledger writes through in its thread (the file and its WAL)
    assert after["open_fds"] <= before["open_fds"] + 4
    assert after["db_connections_checked_out"] == 0
