"""The accounting parts of ``/openapi.json``: keys, runtime counts, usage totals and reports,
sign-up and payment results (the response schemas ``openapi.py`` refers to)."""

from __future__ import annotations

from typing import Any

INT_OR_NULL = {"type": ["integer", "null"]}
KEY_LINKS = {
    name: {"operationId": operation, "parameters": {"key_id": "$response.body#/id"}}
    for name, operation in (
        ("GetKey", "adminGetKey"),
        ("UpdateKey", "adminUpdateKey"),
        ("TopUpKey", "adminTopupKey"),
        ("RotateKey", "adminRotateKey"),
        ("RevokeKey", "adminRevokeKey"),
    )
}
"""What a new key's id leads to: the operations on that key (schemathesis chains them)."""
_COUNT = {"type": "integer", "minimum": 0}
RUNTIME_SCHEMA = {
    "type": "object",
    "required": ["pid", "tasks", "live_generations", "stream_slots_held", "ledger_queued"],
    "properties": {
        "pid": {"type": "integer"},
        "tasks": _COUNT,
        "open_fds": {"type": ["integer", "null"], "minimum": 0},
        "db_connections_checked_out": {"type": ["integer", "null"]},
        "live_generations": _COUNT,
        "stream_slots_held": _COUNT,
        "ledger_queued": _COUNT,
        "ledger_held_in_memory": _COUNT,
        "ledger_outbox_files": _COUNT,
        "ledger_write_failures": _COUNT,
    },
}
USD_STRING = {"type": "string", "pattern": r"^-?\d+\.\d{6}$"}
API_KEY_SCHEMA = {
    "type": "object",
    "required": ["object", "id", "name", "prefix", "admin", "status", "balance_micro"],
    "properties": {
        "object": {"const": "api_key"},
        "id": {"type": "string"},
        "name": {"type": "string"},
        "prefix": {"type": "string", "description": "The first 10 characters of the key."},
        "admin": {"type": "boolean"},
        "status": {"enum": ["active", "revoked", "expired"]},
        "created_at": {"type": "integer", "description": "Unix seconds."},
        "expires_at": INT_OR_NULL,
        "revoked_at": INT_OR_NULL,
        "models": {"type": ["array", "null"], "items": {"type": "string"}},
        "rpm": INT_OR_NULL,
        "tpm": INT_OR_NULL,
        "max_concurrent_streams": INT_OR_NULL,
        "balance_micro": {"type": "integer"},
        "balance_usd": USD_STRING,
        "plan": {
            "type": ["string", "null"],
            "description": "The plan (price list) the key is charged by; null: the default plan.",
        },
        "key": {"type": "string", "description": "The plaintext key: on create and rotate only."},
    },
}
_TOKEN_COUNTS = {
    "requests": _COUNT,
    "prompt_tokens": {**_COUNT, "description": "The whole prompt, cached parts included."},
    "completion_tokens": _COUNT,
    "cache_write_tokens": {**_COUNT, "description": "Prompt tokens written to the cache."},
    "cache_read_tokens": {**_COUNT, "description": "Prompt tokens read from the cache."},
}


def _money(name: str, description: str, *, signed: bool = False) -> dict[str, Any]:
    micro: dict[str, Any] = {"type": "integer", "description": f"{description}, micro-dollars"}
    if not signed:
        micro["minimum"] = 0
    return {f"{name}_micro": micro, f"{name}_usd": USD_STRING}


TOTAL_SCHEMA = {
    "type": "object",
    "description": "A key's own totals: what it was charged (cost_* repeats charge_*).",
    "required": [*_TOKEN_COUNTS, "charge_micro", "charge_usd", "cost_micro", "cost_usd"],
    "properties": {
        **_TOKEN_COUNTS,
        **_money("charge", "What the key was charged"),
        **_money("cost", "The same as charge_micro: what the usage cost the key"),
    },
}
_REPORT_FIGURES = {
    **_TOKEN_COUNTS,
    **_money("cost", "What the upstreams charge the operator"),
    **_money("charge", "What the keys were charged"),
    **_money("margin", "charge - cost (negative: sold below cost)", signed=True),
}
REPORT_TOTAL_SCHEMA = {
    "type": "object",
    "description": "Requests, tokens, cost, charge and margin of a group or of the range.",
    "required": list(_REPORT_FIGURES),
    "properties": _REPORT_FIGURES,
}
REPORT_ROW_SCHEMA = {
    "type": "object",
    "description": "One group: the values it is grouped by (those in group_by), then its figures.",
    "required": list(_REPORT_FIGURES),
    "properties": {
        "key_id": {"type": "string"},
        "model": {"type": "string"},
        "provider": {"type": "string"},
        "plan": {"type": ["string", "null"], "description": "null: rows from before plans."},
        "day": {"type": "string", "format": "date", "description": "UTC date."},
        **_REPORT_FIGURES,
    },
}
SIGNUP_SCHEMA = {
    "allOf": [
        {"$ref": "#/components/schemas/ApiKey"},
        {
            "type": "object",
            "required": ["key", "email", "grant_micro", "grant_usd"],
            "properties": {
                "email": {"type": "string"},
                **_money("grant", "The free credit given (0: this mailbox had its grant)"),
            },
        },
    ]
}
PAYMENT_RESULT_SCHEMA = {
    "type": "object",
    "required": ["received"],
    "properties": {
        "received": {"const": True},
        "applied": {"type": "boolean"},
        "ignored": {"type": "boolean"},
        "key_id": {"type": "string"},
        "payment_id": {"type": "string"},
        **_money("amount", "Credited"),
        "currency": {"type": "string", "description": "What was paid (ISO 4217)."},
        "original_amount": {"type": "string", "description": "How much of it, 6 decimals."},
        "rate": {"type": "string", "description": "USD per unit of currency, as configured."},
        **_money("balance", "The key's balance now"),
    },
}
