"""POST /v1/billing/webhook over real HTTP: Stripe-style signatures, replay windows, idempotent credit.

Signatures are computed here by hand (HMAC-SHA256 of ``"<t>.<raw body>"``), not with the
gateway's own helper, so the test pins the wire format.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from tokenwire.api.webhooks import signature_header
from tokenwire.storage.engine import make_engine
from tokenwire.storage.tables import credit_events
from tokenwire.testing import FAST_SIM, GatewayServer

SECRET = "whsec_test_3f9a1c"
ENV = {"TOKENWIRE_WEBHOOK_SECRET": SECRET}
GRANT_MICRO = 1000 * 1_000_000  # GatewayServer's default grant


@pytest.fixture
def gw(database_url: str, tmp_path: Path) -> Iterator[GatewayServer]:
    """A gateway with the webhook secret set, on SQLite or PostgreSQL."""
    with GatewayServer(tmp_path / "gw", env=ENV, database_url=database_url) as server:
        yield server


@pytest.fixture(scope="module")
def sqlite_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """One SQLite gateway with the secret set, for the refusal cases."""
    with GatewayServer(tmp_path_factory.mktemp("webhook"), env=ENV) as server:
        yield server


def sign(body: bytes, timestamp: int, secret: str = SECRET) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def event(key_id: str, amount: str = "10.00", payment_id: str = "pi_1", **extra: Any) -> bytes:
    payload = {
        "id": "evt_" + payment_id,
        "type": "payment.succeeded",
        "data": {"key_id": key_id, "amount_usd": amount, "payment_id": payment_id},
        **extra,
    }
    return json.dumps(payload).encode()


def deliver(
    gw: GatewayServer, body: bytes, signature: str | None = None, *, at: int | None = None
) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if signature is None:
        signature = sign(body, int(time.time()) if at is None else at)
    if signature:
        headers["Tokenwire-Signature"] = signature
    return requests.post(
        gw.base_url + "/v1/billing/webhook", data=body, headers=headers, timeout=10
    )


def balance(gw: GatewayServer, key_id: str) -> int:
    response = requests.get(
        f"{gw.base_url}/v1/admin/keys/{key_id}",
        headers={"Authorization": f"Bearer {gw.admin_key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    value: int = response.json()["balance_micro"]
    return value


def test_payment_credits_once(gw: GatewayServer) -> None:
    """A signed payment.succeeded credits the key; redelivering it (even re-signed later) answers applied=false and changes nothing."""
    body = event(gw.api_key_id, "10.00", "pi_once")
    first = deliver(gw, body)
    assert first.status_code == 200, first.text
    result = first.json()
    assert result["received"] is True and result["applied"] is True
    assert (result["key_id"], result["payment_id"]) == (gw.api_key_id, "pi_once")
    assert result["amount_micro"] == 10_000_000 and result["amount_usd"] == "10.000000"
    assert result["balance_micro"] == GRANT_MICRO + 10_000_000
    assert balance(gw, gw.api_key_id) == GRANT_MICRO + 10_000_000

    replay = deliver(gw, body)  # the payment system retries the same event
    assert replay.status_code == 200, replay.text
    assert replay.json()["applied"] is False
    assert replay.json()["balance_micro"] == GRANT_MICRO + 10_000_000
    other_event = deliver(gw, event(gw.api_key_id, "99.00", "pi_once", id="evt_different"))
    assert other_event.json()["applied"] is False
    assert balance(gw, gw.api_key_id) == GRANT_MICRO + 10_000_000

    second = deliver(gw, event(gw.api_key_id, "0.000001", "pi_twice"))
    assert second.json()["applied"] is True
    assert balance(gw, gw.api_key_id) == GRANT_MICRO + 10_000_001


def test_bad_or_missing_signature(sqlite_gw: GatewayServer) -> None:
    """A wrong secret, a tampered body, a malformed or missing header: 400 invalid_signature, balance unchanged."""
    gw = sqlite_gw
    before = balance(gw, gw.api_key_id)
    body = event(gw.api_key_id, "5.00", "pi_badsig")
    now = int(time.time())
    good = sign(body, now)
    cases = [
        sign(body, now, secret="whsec_wrong"),
        sign(event(gw.api_key_id, "500.00", "pi_badsig"), now),  # signature of another body
        good.replace(f"t={now}", f"t={now - 1}"),  # timestamp is part of the signed text
        f"t={now}",
        good.split(",")[1],
        f"t={now},v1=",
        f"t={now},v1=zz{'0' * 62}",
        f"t=soon,{good.split(',')[1]}",
        "garbage",
        "",
    ]
    for header in cases:
        response = deliver(gw, body, header)
        assert response.status_code == 400, (header, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_signature", (header, error)
        assert error["type"] == "invalid_request_error"
    assert balance(gw, gw.api_key_id) == before
    # Several v1 entries (secret rotation): one matching is enough.
    rotated = f"t={now},v1={'0' * 64},{good.split(',')[1]}"
    assert deliver(gw, body, rotated).json()["applied"] is True


def test_stale_and_future_timestamps_are_refused(sqlite_gw: GatewayServer) -> None:
    """A correctly signed delivery outside the tolerance (300 s) either way is 400 and credits nothing."""
    gw = sqlite_gw
    before = balance(gw, gw.api_key_id)
    body = event(gw.api_key_id, "7.00", "pi_stale")
    for offset in (-301, -3600, 301, 86_400):
        response = deliver(gw, body, at=int(time.time()) + offset)
        assert response.status_code == 400, (offset, response.text)
        assert response.json()["error"]["code"] == "timestamp_out_of_tolerance"
    assert balance(gw, gw.api_key_id) == before
    assert deliver(gw, body, at=int(time.time()) - 200).json()["applied"] is True


def test_unknown_key_other_events_and_bad_bodies(sqlite_gw: GatewayServer) -> None:
    """Unknown key: 404; other event types: 200 ignored; invalid payment data: 400 naming the field."""
    gw = sqlite_gw
    before = balance(gw, gw.api_key_id)
    missing = deliver(gw, event("key_doesnotexist", "5.00", "pi_nokey"))
    assert missing.status_code == 404, missing.text
    assert missing.json()["error"]["param"] == "key_id"

    refund = json.dumps({"id": "evt_r", "type": "charge.refunded", "data": {"x": 1}}).encode()
    ignored = deliver(gw, refund)
    assert ignored.status_code == 200
    assert ignored.json() == {
        "received": True,
        "ignored": True,
        "id": "evt_r",
        "type": "charge.refunded",
    }

    for body, param in [
        (event(gw.api_key_id, "0", "pi_zero"), "data.amount_usd"),
        (event(gw.api_key_id, "-5.00", "pi_neg"), "data.amount_usd"),
        (event(gw.api_key_id, "1.0000001", "pi_precise"), "data.amount_usd"),
        (event(gw.api_key_id, "5", "p" * 129), "data.payment_id"),
        (
            json.dumps({"id": "e", "type": "payment.succeeded", "data": {"key_id": "k"}}).encode(),
            "data.payment_id",
        ),
        (
            json.dumps(
                {"id": "e", "type": "payment.succeeded", "data": {"key_id": "k", "payment_id": "p"}}
            ).encode(),
            "data.amount_usd",
        ),
        (json.dumps({"type": "payment.succeeded"}).encode(), "id"),
        (b"[1, 2]", None),
        (b"{not json", None),
    ]:
        response = deliver(gw, body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, response.json()
    assert balance(gw, gw.api_key_id) == before
    # A signed event that names a key once it exists works (the 404 recorded nothing).
    assert deliver(gw, event(gw.api_key_id, "5.00", "pi_nokey")).json()["applied"] is True


def test_unset_secret_is_503(tmp_path: Path) -> None:
    """Without TOKENWIRE_WEBHOOK_SECRET every delivery is 503 with a message naming the variable."""
    with GatewayServer(tmp_path / "nosecret", env={}) as gw:
        body = event(gw.api_key_id)
        response = deliver(gw, body)
        assert response.status_code == 503
        error = response.json()["error"]
        assert "TOKENWIRE_WEBHOOK_SECRET" in error["message"]
        assert error["code"] == "webhook_secret_unset"
        assert balance(gw, gw.api_key_id) == GRANT_MICRO


def test_signature_helper_matches_the_documented_format() -> None:
    """The gateway's signature_header produces exactly t=<ts>,v1=<hex HMAC of "<ts>.<body>">."""
    body = b'{"id":"evt_1"}'
    assert signature_header(SECRET, body, 1_700_000_000) == sign(body, 1_700_000_000)


RATES = """
[currencies]
CNY = "1.0"
EUR = "1.0825"
"""


def payment(key_id: str, payment_id: str, **money: Any) -> bytes:
    """A payment.succeeded event paying ``money`` (amount_usd, or amount and currency)."""
    data = {"key_id": key_id, "payment_id": payment_id, **money}
    return json.dumps(
        {"id": "evt_" + payment_id, "type": "payment.succeeded", "data": data}
    ).encode()


async def _credit_events(database_url: str, key_id: str) -> list[tuple[Any, ...]]:
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(
                    credit_events.c.payment_id,
                    credit_events.c.amount_micro,
                    credit_events.c.currency,
                    credit_events.c.original_micro,
                    credit_events.c.rate,
                )
                .where(credit_events.c.key_id == key_id, credit_events.c.kind == "payment")
                .order_by(credit_events.c.id)
            )
            return [tuple(row) for row in rows]
    finally:
        await engine.dispose()


def test_payments_in_other_currencies_are_credited_at_the_configured_rate(
    database_url: str, tmp_path: Path
) -> None:
    """70.00 CNY at 1.0 credits $70.00 once per payment id (a redelivery changes nothing); 12.34
    EUR at 1.0825 credits exactly 13,358,050 micro-dollars; each credit event records the
    currency, the amount paid and the rate."""
    with GatewayServer(
        tmp_path / "gw", env=ENV, database_url=database_url, overrides=FAST_SIM + RATES
    ) as gw:
        start = balance(gw, gw.api_key_id)
        first = deliver(gw, payment(gw.api_key_id, "pi_cny", amount="70.00", currency="CNY"))
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["applied"] is True
        assert (body["amount_micro"], body["currency"], body["original_amount"], body["rate"]) == (
            70_000_000,
            "CNY",
            "70.000000",
            "1.0",
        )
        assert body["balance_micro"] == start + 70_000_000
        again = deliver(gw, payment(gw.api_key_id, "pi_cny", amount="70.00", currency="cny"))
        assert again.status_code == 200 and again.json()["applied"] is False
        assert balance(gw, gw.api_key_id) == start + 70_000_000

        euros = deliver(gw, payment(gw.api_key_id, "pi_eur", amount=12.34, currency="eur"))
        assert euros.status_code == 200, euros.text
        assert euros.json()["amount_micro"] == 13_358_050  # 12.34 x 1.0825 = 13.35805
        dollars = deliver(gw, payment(gw.api_key_id, "pi_usd", amount="5", currency="USD"))
        assert dollars.json()["amount_micro"] == 5_000_000
        assert balance(gw, gw.api_key_id) == start + 70_000_000 + 13_358_050 + 5_000_000

        events = asyncio.run(_credit_events(gw.settings.database_url, gw.api_key_id))
        assert events == [
            ("pi_cny", 70_000_000, "CNY", 70_000_000, "1.0"),
            ("pi_eur", 13_358_050, "EUR", 12_340_000, "1.0825"),
            ("pi_usd", 5_000_000, "USD", 5_000_000, "1"),
        ]


@pytest.mark.parametrize(
    ("money", "param", "code"),
    [
        ({"amount": "10", "currency": "GBP"}, "data.currency", "unknown_currency"),
        ({"amount": "10", "currency": "Cny"}, "data.currency", "unknown_currency"),
        ({"amount": "10"}, "data.currency", None),
        ({"currency": "CNY"}, "data.amount_usd", None),
        ({"amount": "10", "currency": "CNY", "amount_usd": "10"}, "data.amount_usd", None),
        ({"amount": "1.0000001", "currency": "CNY"}, "data.amount", None),
        ({"amount": "0", "currency": "CNY"}, "data.amount", None),
        ({"amount": "-3", "currency": "CNY"}, "data.amount", None),
        ({"amount": "10", "currency": "CNYX"}, "data.currency", None),
    ],
)
def test_bad_currency_payments_are_400_naming_the_field(
    currency_gw: GatewayServer, money: dict[str, Any], param: str, code: str | None
) -> None:
    """An unknown currency, a missing half of amount + currency, both forms at once, or a bad
    amount: 400 naming the field, and nothing credited."""
    gw = currency_gw
    before = balance(gw, gw.api_key_id)
    response = deliver(gw, payment(gw.api_key_id, f"pi_bad_{param}_{code}", **money))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code
    assert balance(gw, gw.api_key_id) == before


@pytest.fixture(scope="module")
def currency_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """One SQLite gateway with the secret and CNY / EUR rates, for the refusal cases."""
    with GatewayServer(
        tmp_path_factory.mktemp("currency"), env=ENV, overrides=FAST_SIM + RATES
    ) as server:
        yield server
