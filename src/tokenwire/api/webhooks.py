"""``POST /v1/billing/webhook``: payment events that add credit to a key, signed like Stripe's.

The payment system signs each delivery with the shared secret in ``TOKENWIRE_WEBHOOK_SECRET``
(read once, when the app is built)::

    Tokenwire-Signature: t=<Unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

Several ``v1=`` entries may be sent (while the secret is being rotated); one matching is enough.
The check is constant-time, and a timestamp further than ``accounting.webhook_tolerance_s``
from now (either way) is refused, so a captured delivery cannot be replayed later. The body::

    {"id": "evt_…", "type": "payment.succeeded",
     "data": {"key_id": "key_…", "amount_usd": "10.00", "payment_id": "pi_…"}}

or, paid in another currency, ``"amount": "70.00", "currency": "CNY"`` instead of
``amount_usd``: the amount in units of that currency (yuan, not fen), credited at the rate
``[currencies]`` configures (``accounting/currency.py``: exact, rounded half up once to a
micro-dollar); the credit event records the currency, the amount and the rate.

``payment.succeeded`` credits the key once per ``payment_id``: a redelivery answers 200 with
``"applied": false`` and changes nothing. Other event types are acknowledged (200) and
ignored. Answers: 400 ``invalid_signature`` / ``timestamp_out_of_tolerance`` / a bad body
(``unknown_currency`` for a currency without a rate), 404 for an unknown key, 503 while the
secret is not set.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from tokenwire.accounting.currency import (
    USD,
    AmountTooLarge,
    Credit,
    UnknownCurrency,
    convert,
    rate_for,
)
from tokenwire.accounting.pricing import usd
from tokenwire.api.admin import PositiveAmount
from tokenwire.api.chat import read_body
from tokenwire.api.errors import json_response
from tokenwire.api.formats import read_usd
from tokenwire.errors import GatewayError, InvalidRequest
from tokenwire.state import get_state
from tokenwire.wire.untrusted import decode_json, param_from_message, parse_count

SECRET_ENV = "TOKENWIRE_WEBHOOK_SECRET"
SIGNATURE_HEADER = "Tokenwire-Signature"
PAYMENT_SUCCEEDED = "payment.succeeded"


class WebhookEvent(msgspec.Struct):
    """The envelope of every event; unknown fields are ignored (payment systems add some)."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    data: dict[str, Any] = msgspec.field(default_factory=dict)


CurrencyAmount = Annotated[
    PositiveAmount,
    msgspec.Meta(
        description='Units of `currency` (yuan, not fen) above 0: a string such as "70.00" '
        "(at most 6 decimals) or a number."
    ),
]
Currency = Annotated[
    str,
    msgspec.Meta(
        min_length=3,
        max_length=3,
        description="An ISO 4217 code configured in [currencies] (USD always is), upper or "
        "lower case.",
    ),
]


class PaymentSucceeded(msgspec.Struct):
    """``data`` of a ``payment.succeeded`` event: ``amount_usd``, or ``amount`` + ``currency``."""

    key_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    payment_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    amount_usd: PositiveAmount | msgspec.UnsetType = msgspec.UNSET
    amount: CurrencyAmount | msgspec.UnsetType = msgspec.UNSET
    currency: Currency | msgspec.UnsetType = msgspec.UNSET


def payment_credit(payment: PaymentSucceeded, rates: Mapping[str, Decimal]) -> Credit:
    """What a payment credits: ``amount_usd`` as is, or ``amount`` of ``currency`` at its
    configured rate; a 400 naming the field otherwise."""
    if payment.amount_usd is not msgspec.UNSET:
        if payment.amount is not msgspec.UNSET or payment.currency is not msgspec.UNSET:
            raise InvalidRequest(
                "Give 'amount_usd', or 'amount' and 'currency', not both.",
                param="data.amount_usd",
            )
        micro = read_usd(payment.amount_usd, "data.amount_usd", positive=True)
        return Credit(micro, USD, micro, "1")
    if payment.amount is msgspec.UNSET:
        raise InvalidRequest(
            "A payment needs 'amount_usd', or 'amount' and 'currency'.", param="data.amount_usd"
        )
    if payment.currency is msgspec.UNSET:
        raise InvalidRequest("'amount' needs its 'currency'.", param="data.currency")
    try:
        code, rate = rate_for(payment.currency, rates)
    except UnknownCurrency as exc:
        raise InvalidRequest(
            f"Invalid 'data.currency': {exc}.", param="data.currency", code="unknown_currency"
        ) from None
    original = read_usd(payment.amount, "data.amount", positive=True, unit=code)
    try:
        return convert(original, code, rate)
    except AmountTooLarge as exc:
        raise InvalidRequest(
            f"Invalid 'data.amount': {exc}.", param="data.amount", code="amount_too_large"
        ) from None


def signature_header(secret: str | bytes, body: bytes, timestamp: int) -> str:
    """The ``Tokenwire-Signature`` value for ``body`` sent at ``timestamp`` (Unix seconds)."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def _bad_signature(message: str) -> InvalidRequest:
    return InvalidRequest(message, param=SIGNATURE_HEADER, code="invalid_signature")


def verify_signature(
    secret: bytes, header: str | None, body: bytes, *, now: float, tolerance_s: float
) -> int:
    """Check a signature header; returns its timestamp or raises ``InvalidRequest`` (400)."""
    if not header:
        raise _bad_signature(f"The {SIGNATURE_HEADER} header is missing.")
    timestamp: int | None = None
    candidates: list[bytes] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if name == "t" and (seconds := parse_count(value, max_digits=12)) is not None:
            timestamp = seconds
        elif name == "v1":
            candidates.append(value.strip().encode("latin-1", "replace"))
    if timestamp is None or not candidates:
        raise _bad_signature(
            f"The {SIGNATURE_HEADER} header must look like 't=<Unix seconds>,v1=<hex HMAC>'."
        )
    expected = signature_header(secret, body, timestamp).rpartition("v1=")[2].encode()
    # Compare against every candidate (no early exit), each in constant time.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise _bad_signature("The webhook signature does not match the body and the secret.")
    if abs(now - timestamp) > tolerance_s:
        raise InvalidRequest(
            f"The webhook timestamp is more than {tolerance_s:g} s from the server's clock; "
            "a delivery is accepted only within that window (replay protection).",
            param=SIGNATURE_HEADER,
            code="timestamp_out_of_tolerance",
        )
    return timestamp


async def _handle(request: Request, secret: bytes | None) -> Response:
    state = get_state(request)
    if secret is None:
        raise GatewayError(
            f"Payment webhooks are disabled: set {SECRET_ENV} to the signing secret shared "
            "with the payment system and restart the gateway.",
            code="webhook_secret_unset",
            status=503,
        )
    body = await read_body(request, state.settings.server.max_body_bytes)
    verify_signature(
        secret,
        request.headers.get(SIGNATURE_HEADER),
        body,
        now=time.time(),
        tolerance_s=state.settings.accounting.webhook_tolerance_s,
    )
    event = decode_json(body, WebhookEvent)
    if event.type != PAYMENT_SUCCEEDED:
        return json_response(
            {"received": True, "ignored": True, "id": event.id, "type": event.type}
        )
    try:
        payment = msgspec.convert(event.data, PaymentSucceeded)  # depth checked by decode_json
    except msgspec.ValidationError as exc:
        text = str(exc)
        param = param_from_message(text)
        raise InvalidRequest(
            f"Invalid payment event: {text}",
            param=f"data.{param}" if param else "data",
            code="invalid_value",
        ) from None
    paid = payment_credit(payment, state.settings.currencies)
    amount = paid.amount_micro
    balance, applied = await state.ledger.credit(
        payment.key_id,
        amount,
        kind="payment",
        payment_id=payment.payment_id,
        note=f"webhook event {event.id}",
        paid=paid,
    )
    return json_response(
        {
            "received": True,
            "applied": applied,
            "id": event.id,
            "type": event.type,
            "key_id": payment.key_id,
            "payment_id": payment.payment_id,
            "amount_micro": amount,
            "amount_usd": usd(amount),
            "currency": paid.currency,
            "original_amount": usd(paid.original_micro),
            "rate": paid.rate,
            "balance_micro": balance,
            "balance_usd": usd(balance),
        }
    )


def webhook_endpoint(
    env: Mapping[str, str] | None = None,
) -> Callable[[Request], Awaitable[Response]]:
    """The route handler, with the signing secret read from ``env`` (or the process) now."""
    environ = os.environ if env is None else env
    value = environ.get(SECRET_ENV, "")
    secret = value.encode() if value.strip() else None

    async def billing_webhook(request: Request) -> Response:
        """Verify and apply one payment event."""
        return await _handle(request, secret)

    return billing_webhook
