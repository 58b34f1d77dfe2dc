"""``/openapi.json``: the admin paths (keys, the runtime counts, the usage report)."""

from __future__ import annotations

from typing import Any

from tokenwire.api.openapi_accounting import (
    INT_OR_NULL,
    KEY_LINKS,
    RUNTIME_SCHEMA,
    USD_STRING,
)
from tokenwire.api.openapi_parts import (
    API_KEY_REF,
    BEARER,
    KEY_ID,
    TIME_RANGE,
    errors,
    group_by_pattern,
    json_body,
    json_reply,
    query,
)

GROUP_BY_PATTERN = group_by_pattern("key|key_id|model|provider|plan|day")


def admin_paths(
    create_key: dict[str, Any], update_key: dict[str, Any], topup: dict[str, Any]
) -> dict[str, Any]:
    """``/v1/admin/...``; the arguments are the request bodies' schemas."""
    api_key = API_KEY_REF
    return {
        "/v1/admin/keys": {
            "post": {
                "operationId": "adminCreateKey",
                "summary": "Create a key with the free grant plus credits_usd (admin).",
                "security": BEARER,
                "requestBody": json_body(create_key),
                "responses": {
                    "201": {
                        **json_reply("The key, with its plaintext `key` (shown once).", api_key),
                        "links": KEY_LINKS,
                    },
                    **errors(400, 401, 403),
                },
            },
            "get": {
                "operationId": "adminListKeys",
                "summary": "Every key, oldest first (admin).",
                "security": BEARER,
                "responses": {
                    "200": json_reply(
                        "A list of keys.",
                        {
                            "type": "object",
                            "properties": {"data": {"type": "array", "items": api_key}},
                        },
                    ),
                    **errors(401, 403),
                },
            },
        },
        "/v1/admin/keys/{key_id}": {
            "get": {
                "operationId": "adminGetKey",
                "security": BEARER,
                "parameters": [KEY_ID],
                "responses": {"200": json_reply("One key.", api_key), **errors(401, 403, 404)},
            },
            "patch": {
                "operationId": "adminUpdateKey",
                "summary": "Change the fields present; null clears a limit, models or expiry.",
                "security": BEARER,
                "parameters": [KEY_ID],
                "requestBody": json_body(update_key),
                "responses": {
                    "200": json_reply("The updated key.", api_key),
                    **errors(400, 401, 403, 404),
                },
            },
        },
        "/v1/admin/keys/{key_id}/revoke": {
            "post": {
                "operationId": "adminRevokeKey",
                "security": BEARER,
                "parameters": [KEY_ID],
                "responses": {
                    "200": json_reply("The revoked key.", api_key),
                    **errors(401, 403, 404, 409),
                },
            }
        },
        "/v1/admin/keys/{key_id}/rotate": {
            "post": {
                "operationId": "adminRotateKey",
                "summary": "A new secret for the same key; the old one stops working.",
                "security": BEARER,
                "parameters": [KEY_ID],
                "responses": {
                    "200": json_reply(
                        "The key, with its new plaintext `key` (shown once).", api_key
                    ),
                    **errors(401, 403, 404, 409),
                },
            }
        },
        "/v1/admin/keys/{key_id}/topup": {
            "post": {
                "operationId": "adminTopupKey",
                "security": BEARER,
                "parameters": [KEY_ID],
                "requestBody": json_body(topup),
                "responses": {
                    "200": json_reply(
                        "The amount added and the new balance.",
                        {
                            "type": "object",
                            "properties": {
                                "key_id": {"type": "string"},
                                "amount_micro": {"type": "integer"},
                                "amount_usd": USD_STRING,
                                "balance_micro": {"type": "integer"},
                                "balance_usd": USD_STRING,
                            },
                        },
                    ),
                    **errors(400, 401, 403, 404),
                },
            }
        },
        "/v1/admin/runtime": {
            "get": {
                "operationId": "adminRuntime",
                "summary": "What this gateway process holds now: tasks, open files, "
                "database connections, stream slots, unwritten ledger rows (admin).",
                "security": BEARER,
                "responses": {
                    "200": json_reply("The process's counts.", RUNTIME_SCHEMA),
                    **errors(401, 403),
                },
            }
        },
        "/v1/admin/usage": {
            "get": {
                "operationId": "adminUsage",
                "summary": "Requests, tokens, cost, charge and margin grouped by key, "
                "model, provider, plan and day (admin).",
                "security": BEARER,
                "parameters": [
                    *TIME_RANGE,
                    query(
                        "group_by",
                        "Comma-separated: any of key, model, provider, plan, day (UTC). "
                        "Default: key,model,day.",
                        {"type": "string", "pattern": GROUP_BY_PATTERN},
                    ),
                    query("key_id", "Only this key."),
                    query("model", "Only this model."),
                ],
                "responses": {
                    "200": json_reply(
                        "One row per group (cost: what the upstreams charge the "
                        "operator; charge: what keys paid; margin: the difference), and "
                        "the total over the range.",
                        {
                            "type": "object",
                            "required": ["object", "group_by", "data", "total"],
                            "properties": {
                                "object": {"const": "list"},
                                "group_by": {
                                    "type": "array",
                                    "items": {
                                        "enum": ["key_id", "model", "provider", "plan", "day"]
                                    },
                                },
                                "start_ms": INT_OR_NULL,
                                "end_ms": INT_OR_NULL,
                                "data": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/UsageReportRow"},
                                },
                                "total": {"$ref": "#/components/schemas/UsageReportTotal"},
                            },
                        },
                    ),
                    **errors(400, 401, 403),
                },
            }
        },
    }
