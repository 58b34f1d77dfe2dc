"""POST /v1/signup over real HTTP, on SQLite and PostgreSQL: off by default, invite codes,
the free grant once per mailbox, and the daily caps per address, per client IP and overall,
also under concurrent sign-ups."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tokenwire.accounting.signups import mailbox
from tokenwire.testing import FAST_SIM, GatewayServer

SIGNUP = (
    FAST_SIM
    + """
[server]
trusted_proxies = ["127.0.0.1"]   # the tests choose their client address with X-Forwarded-For

[limits]
auth_failures_per_window = 3

[signup]
enabled = true
grant_usd = "1.50"
invite_codes = ["alpha-2025", "beta"]
max_per_day = 4
max_per_ip_per_day = 2
max_per_email_per_day = 2
models = ["sim"]
rpm = 30

[[models]]
id = "other-sim"
provider = "sim"
"""
)


def sign_up(gw: GatewayServer, body: Any, client: str = "10.0.0.1") -> requests.Response:
    return requests.post(
        gw.base_url + "/v1/signup", json=body, headers={"X-Forwarded-For": client}, timeout=10
    )


@pytest.fixture
def gw(database_url: str, tmp_path: Path) -> Iterator[GatewayServer]:
    """A gateway with sign-up on (see SIGNUP), on SQLite or PostgreSQL."""
    with GatewayServer(tmp_path / "gw", overrides=SIGNUP, database_url=database_url) as server:
        yield server


def test_sign_up_is_off_by_default(tmp_path: Path) -> None:
    """Without [signup] enabled = true every valid sign-up is 403 signup_disabled; a body that
    is not a sign-up is still a 400 naming the field."""
    with GatewayServer(tmp_path / "off") as gw:
        refused = sign_up(gw, {"email": "ann@example.com"})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "signup_disabled"
        bad = sign_up(gw, {"email": "not an address"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "email"


def test_a_sign_up_returns_a_working_key_with_the_grant_once_per_mailbox(
    gw: GatewayServer,
) -> None:
    """A new address gets a key (shown once) with the $1.50 grant, the configured models and
    limits; the same mailbox again (case and +tag aside) gets a key but no second grant."""
    made = sign_up(gw, {"email": "Ann@Example.com", "invite_code": "alpha-2025"})
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["key"].startswith("tw-") and body["id"].startswith("key_")
    assert (body["grant_micro"], body["grant_usd"], body["balance_micro"]) == (
        1_500_000,
        "1.500000",
        1_500_000,
    )
    assert (body["email"], body["models"], body["rpm"], body["admin"]) == (
        "ann@example.com",
        ["sim"],
        30,
        False,
    )
    headers = {"Authorization": f"Bearer {body['key']}"}
    completion = requests.post(
        gw.base_url + "/v1/chat/completions",
        headers=headers,
        json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert completion.status_code == 200, completion.text
    own = requests.get(gw.base_url + "/v1/usage", headers=headers, timeout=10).json()
    assert own["balance_micro"] == 1_500_000  # sim is free on every plan
    priced = requests.post(
        gw.base_url + "/v1/chat/completions",
        headers=headers,
        json={"model": "other-sim", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert priced.status_code == 403  # the sign-up keys' models are [signup] models

    again = sign_up(gw, {"email": "ann+second@example.com", "invite_code": "beta"}, "10.0.0.2")
    assert again.status_code == 201, again.text
    assert (again.json()["grant_micro"], again.json()["balance_micro"]) == (0, 0)
    assert again.json()["key"] != body["key"]


def test_invite_codes_are_required_and_wrong_ones_are_throttled(gw: GatewayServer) -> None:
    """A missing or wrong invite code is 403 naming invite_code and creates nothing; after
    three failures the address gets 429 too_many_failed_authentications, others do not."""
    for code in (None, "alpha", "ALPHA-2025"):
        body = {"email": "eve@example.com"} | ({} if code is None else {"invite_code": code})
        refused = sign_up(gw, body, "10.0.0.66")
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == {
            "message": "Sign-up on this gateway needs a valid invite code.",
            "type": "permission_error",
            "param": "invite_code",
            "code": "invalid_invite_code",
        }
    blocked = sign_up(gw, {"email": "eve@example.com", "invite_code": "nope"}, "10.0.0.66")
    assert blocked.status_code == 429
    assert blocked.json()["error"]["code"] == "too_many_failed_authentications"
    fine = sign_up(gw, {"email": "eve@example.com", "invite_code": "beta"}, "10.0.0.67")
    assert fine.status_code == 201 and fine.json()["grant_micro"] == 1_500_000


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"email": ""},
        {"email": "ann"},
        {"email": "ann@localhost"},
        {"email": "ann @example.com"},
        {"email": "a" * 65 + "@example.com"},
        {"email": "ann@" + "d" * 250 + ".com"},
        {"email": 7},
        {"email": "ann@example.com", "invite_code": ""},
        {"email": "ann@example.com", "invite_code": "beta", "name": "x"},
    ],
)
def test_bad_sign_ups_are_400(gw: GatewayServer, body: dict[str, Any]) -> None:
    """A body that is not a valid sign-up is a 400 naming the field, and makes no key."""
    response = sign_up(gw, body, "10.0.0.99")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] in {"email", "invite_code", "name"}


def test_daily_caps_per_address_per_ip_and_overall(gw: GatewayServer) -> None:
    """max_per_email_per_day = 2, max_per_ip_per_day = 2, max_per_day = 4: the third sign-up
    of a mailbox, the third from an IP and the fifth overall are 429 with the code naming the
    cap and a Retry-After up to the next UTC midnight; a refusal takes no place under a cap."""

    def attempt(email: str, client: str) -> requests.Response:
        return sign_up(gw, {"email": email, "invite_code": "beta"}, client)

    assert attempt("bob@example.com", "10.1.0.1").status_code == 201
    assert attempt("bob+2@example.com", "10.1.0.2").status_code == 201
    third = attempt("BOB@example.com", "10.1.0.3")
    assert third.status_code == 429 and third.json()["error"]["code"] == "signup_email_limit"
    assert 1 <= int(third.headers["Retry-After"]) <= 86_400

    assert attempt("cat@example.com", "10.1.0.3").status_code == 201
    assert attempt("dan@example.com", "10.1.0.3").status_code == 201
    by_ip = attempt("eli@example.com", "10.1.0.3")
    assert by_ip.status_code == 429 and by_ip.json()["error"]["code"] == "signup_ip_limit"

    overall = attempt("fay@example.com", "10.1.0.4")
    assert overall.status_code == 429 and overall.json()["error"]["code"] == "signup_day_limit"
    # the refused eli@ took no place under its mailbox cap nor its IP's
    assert attempt("eli@example.com", "10.1.0.5").json()["error"]["code"] == "signup_day_limit"


def at_once(gw: GatewayServer, people: list[tuple[str, str]]) -> list[requests.Response]:
    """Sign-ups of (email, client address), all sent at the same time."""
    with ThreadPoolExecutor(len(people)) as pool:
        return list(
            pool.map(
                lambda person: sign_up(
                    gw, {"email": person[0], "invite_code": "beta"}, client=person[1]
                ),
                people,
            )
        )


def test_concurrent_sign_ups_never_exceed_a_cap_or_grant_twice(
    database_url: str, tmp_path: Path
) -> None:
    """Twelve sign-ups of one mailbox at once from twelve addresses: five (its cap) get keys,
    one grant among them; then twenty new addresses at once against a day cap of 8 get
    exactly the three places left."""
    config = SIGNUP.replace("max_per_day = 4", "max_per_day = 8").replace(
        "max_per_email_per_day = 2", "max_per_email_per_day = 5"
    )
    with GatewayServer(tmp_path / "gw", overrides=config, database_url=database_url) as gw:
        same = at_once(gw, [(f"gil+{i}@example.com", f"10.2.0.{i}") for i in range(12)])
        made = [r.json() for r in same if r.status_code == 201]
        assert len(made) == 5  # the mailbox's cap
        assert {r.json()["error"]["code"] for r in same if r.status_code != 201} == {
            "signup_email_limit"
        }
        assert sorted(m["grant_micro"] for m in made) == [0, 0, 0, 0, 1_500_000]
        many = at_once(gw, [(f"u{i}@example.com", f"10.3.0.{i}") for i in range(20)])
        assert sum(r.status_code == 201 for r in many) == 8 - 5
        assert all(r.status_code in (201, 429) for r in many)


def test_mailbox_ignores_case_and_tags() -> None:
    """The grant's identity: lower case, +tag dropped from the local part."""
    assert mailbox("Ann+Promo@Example.COM") == "ann@example.com"
    assert mailbox("ann@example.com") == "ann@example.com"
    assert mailbox("+only@example.com") == "+only@example.com"
