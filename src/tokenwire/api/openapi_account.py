"""``/openapi.json``: a key's own account (its usage, itself), sign-up and the billing webhook."""

from __future__ import annotations

from typing import Any

from tokenwire.api.openapi_accounting import PAYMENT_RESULT_SCHEMA, SIGNUP_SCHEMA, USD_STRING
from tokenwire.api.openapi_parts import (
    API_KEY_REF,
    BEARER,
    TIME_RANGE,
    errors,
    group_by_pattern,
    json_body,
    json_reply,
    query,
)
from tokenwire.api.webhooks import PAYMENT_SUCCEEDED, SIGNATURE_HEADER

OWN_GROUP_BY_PATTERN = group_by_pattern("model|day")


def webhook_body(event: dict[str, Any]) -> dict[str, Any]:
    """A ``payment.succeeded`` event must carry a PaymentSucceeded ``data``; others anything."""
    payment = {
        "type": "object",
        "required": ["id", "type", "data"],
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": 255},
            "type": {"const": PAYMENT_SUCCEEDED},
            "data": {"$ref": "#/components/schemas/PaymentSucceeded"},
        },
    }
    other = {"allOf": [event, {"properties": {"type": {"not": {"const": PAYMENT_SUCCEEDED}}}}]}
    return {"oneOf": [payment, other]}


def account_paths(event: dict[str, Any], signup_request: dict[str, Any]) -> dict[str, Any]:
    """``/v1/usage``, ``/v1/key``, ``/v1/billing/webhook`` and ``/v1/signup``; the arguments
    are the webhook event's and the sign-up request's schemas."""
    api_key = API_KEY_REF
    total = {"$ref": "#/components/schemas/UsageTotal"}
    return {
        "/v1/usage": {
            "get": {
                "operationId": "getUsage",
                "summary": "The calling key's own ledger rows, totals and balance.",
                "security": BEARER,
                "parameters": [
                    *TIME_RANGE,
                    query("model", "Only this model."),
                    query(
                        "limit",
                        "Rows to return, newest first (totals cover the whole range).",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    ),
                    query(
                        "group_by",
                        "Comma-separated: model and/or day (UTC). The answer then also "
                        "holds `groups`, the totals per group over the range.",
                        {"type": "string", "pattern": OWN_GROUP_BY_PATTERN},
                    ),
                ],
                "responses": {
                    "200": json_reply(
                        "Ledger rows (created_at in Unix ms), totals and the balance; with "
                        "group_by, the groups too.",
                        {
                            "type": "object",
                            "required": ["object", "data", "total", "balance_micro"],
                            "properties": {
                                "object": {"const": "list"},
                                "data": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "description": "A ledger row: what the key was "
                                        "charged (charge_*, repeated as cost_*), never "
                                        "the operator's cost.",
                                    },
                                },
                                "total": total,
                                "balance_micro": {"type": "integer"},
                                "balance_usd": USD_STRING,
                                "group_by": {"type": "array", "items": {"type": "string"}},
                                "groups": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                    ),
                    **errors(400, 401),
                },
            }
        },
        "/v1/key": {
            "get": {
                "operationId": "getOwnKey",
                "summary": "The calling key: name, limits, allowed models, expiry, balance.",
                "security": BEARER,
                "responses": {
                    "200": json_reply("The caller's key (never its secret).", api_key),
                    **errors(401),
                },
            }
        },
        "/v1/billing/webhook": {
            "post": {
                "operationId": "billingWebhook",
                "summary": "A signed payment event; payment.succeeded credits a key once.",
                "description": "No bearer key: the body is authenticated by the "
                f"`{SIGNATURE_HEADER}: t=<unix seconds>,v1=<hex HMAC-SHA256 of "
                '"<t>.<raw body>">` header, keyed with TOKENWIRE_WEBHOOK_SECRET.',
                "security": [{"webhookSignature": []}],
                "requestBody": json_body(webhook_body(event)),
                "responses": {
                    "200": json_reply(
                        "Received: applied (true, or false for a payment already applied) "
                        "or ignored (another event type).",
                        PAYMENT_RESULT_SCHEMA,
                    ),
                    **errors(400, 404, 413, 503),
                },
            }
        },
        "/v1/signup": {
            "post": {
                "operationId": "signup",
                "summary": "A key for an email address, with the free grant once per "
                "mailbox (when the gateway has sign-up turned on).",
                "security": [],
                "requestBody": json_body(signup_request),
                "responses": {
                    "201": json_reply(
                        "The new key, with its plaintext `key` (shown once) and its grant.",
                        SIGNUP_SCHEMA,
                    ),
                    **errors(400, 403, 413, 429),
                },
            }
        },
    }
