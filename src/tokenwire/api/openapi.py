"""``GET /openapi.json``: the OpenAPI 3.1 document of the HTTP API.

The request schema is generated from the msgspec structs that validate requests, so the
document cannot drift from what the server accepts.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from tokenwire import __version__
from tokenwire.api.admin import CreateKeyRequest, TopupRequest, UpdateKeyRequest
from tokenwire.api.errors import json_response
from tokenwire.api.webhooks import SIGNATURE_HEADER, PaymentSucceeded, WebhookEvent
from tokenwire.wire.schema import ChatRequest

_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


_INT_OR_NULL = {"type": ["integer", "null"]}
_USD_STRING = {"type": "string", "pattern": r"^-?\d+\.\d{6}$"}
_API_KEY_SCHEMA = {
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
        "expires_at": _INT_OR_NULL,
        "revoked_at": _INT_OR_NULL,
        "models": {"type": ["array", "null"], "items": {"type": "string"}},
        "rpm": _INT_OR_NULL,
        "tpm": _INT_OR_NULL,
        "max_concurrent_streams": _INT_OR_NULL,
        "balance_micro": {"type": "integer"},
        "balance_usd": _USD_STRING,
        "key": {"type": "string", "description": "The plaintext key: on create and rotate only."},
    },
}
_TOTAL_SCHEMA = {
    "type": "object",
    "properties": {
        "requests": {"type": "integer"},
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "cost_micro": {"type": "integer"},
        "cost_usd": _USD_STRING,
    },
}
_TIME_DOC = "Unix seconds or ISO 8601 (UTC unless a zone is given)"


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_KEY_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {
            "description": "OpenAI-style error",
            "content": {"application/json": {"schema": _ERROR}},
        }
        for s in statuses
    }


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI document (built once)."""
    (request_schema, create_key, update_key, topup, event, _), components = (
        msgspec.json.schema_components(
            [
                ChatRequest,
                CreateKeyRequest,
                UpdateKeyRequest,
                TopupRequest,
                WebhookEvent,
                PaymentSucceeded,
            ],
            ref_template="#/components/schemas/{name}",
        )
    )
    components["ErrorResponse"] = _ERROR_SCHEMA
    components["ApiKey"] = _API_KEY_SCHEMA
    components["UsageTotal"] = _TOTAL_SCHEMA
    api_key = {"$ref": "#/components/schemas/ApiKey"}
    total = {"$ref": "#/components/schemas/UsageTotal"}
    bearer: list[dict[str, list[str]]] = [{"bearerAuth": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tokenwire",
            "version": __version__,
            "description": "OpenAI-compatible LLM gateway with SSE and WebSocket streaming.",
        },
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "operationId": "createChatCompletion",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": request_schema}},
                    },
                    "responses": {
                        "200": {
                            "description": "A chat.completion object, or with stream=true an "
                            "SSE stream of chat.completion.chunk objects ending in data: [DONE].",
                            "content": {
                                "application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}},
                            },
                        },
                        **_errors(400, 401, 404, 413, 429, 502, 503, 504),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "security": bearer,
                    "responses": {
                        "200": {
                            "description": "The model catalog in OpenAI's list format.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_errors(401),
                    },
                }
            },
            "/v1/models/{model_id}": {
                "get": {
                    "operationId": "retrieveModel",
                    "security": bearer,
                    "parameters": [
                        {
                            "name": "model_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "One model.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_errors(401, 404),
                    },
                }
            },
            "/v1/usage": {
                "get": {
                    "operationId": "getUsage",
                    "summary": "The calling key's own ledger rows, totals and balance.",
                    "security": bearer,
                    "parameters": [
                        _query("start", f"From this time (inclusive): {_TIME_DOC}."),
                        _query("end", f"Until this time (exclusive): {_TIME_DOC}."),
                        _query("model", "Only this model."),
                        _query(
                            "limit",
                            "Rows to return, newest first (totals cover the whole range).",
                            {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        ),
                    ],
                    "responses": {
                        "200": _json(
                            "Ledger rows (created_at in Unix ms), totals and the balance.",
                            {
                                "type": "object",
                                "properties": {
                                    "object": {"const": "list"},
                                    "data": {"type": "array", "items": {"type": "object"}},
                                    "total": total,
                                    "balance_micro": {"type": "integer"},
                                    "balance_usd": _USD_STRING,
                                },
                            },
                        ),
                        **_errors(400, 401),
                    },
                }
            },
            "/v1/admin/keys": {
                "post": {
                    "operationId": "adminCreateKey",
                    "summary": "Create a key with the free grant plus credits_usd (admin).",
                    "security": bearer,
                    "requestBody": _body(create_key),
                    "responses": {
                        "201": _json("The key, with its plaintext `key` (shown once).", api_key),
                        **_errors(400, 401, 403),
                    },
                },
                "get": {
                    "operationId": "adminListKeys",
                    "summary": "Every key, oldest first (admin).",
                    "security": bearer,
                    "responses": {
                        "200": _json(
                            "A list of keys.",
                            {
                                "type": "object",
                                "properties": {"data": {"type": "array", "items": api_key}},
                            },
                        ),
                        **_errors(401, 403),
                    },
                },
            },
            "/v1/admin/keys/{key_id}": {
                "get": {
                    "operationId": "adminGetKey",
                    "security": bearer,
                    "parameters": [_KEY_ID],
                    "responses": {"200": _json("One key.", api_key), **_errors(401, 403, 404)},
                },
                "patch": {
                    "operationId": "adminUpdateKey",
                    "summary": "Change the fields present; null clears a limit, models or expiry.",
                    "security": bearer,
                    "parameters": [_KEY_ID],
                    "requestBody": _body(update_key),
                    "responses": {
                        "200": _json("The updated key.", api_key),
                        **_errors(400, 401, 403, 404),
                    },
                },
            },
            "/v1/admin/keys/{key_id}/revoke": {
                "post": {
                    "operationId": "adminRevokeKey",
                    "security": bearer,
                    "parameters": [_KEY_ID],
                    "responses": {
                        "200": _json("The revoked key.", api_key),
                        **_errors(401, 403, 404, 409),
                    },
                }
            },
            "/v1/admin/keys/{key_id}/rotate": {
                "post": {
                    "operationId": "adminRotateKey",
                    "summary": "A new secret for the same key; the old one stops working.",
                    "security": bearer,
                    "parameters": [_KEY_ID],
                    "responses": {
                        "200": _json(
                            "The key, with its new plaintext `key` (shown once).", api_key
                        ),
                        **_errors(401, 403, 404, 409),
                    },
                }
            },
            "/v1/admin/keys/{key_id}/topup": {
                "post": {
                    "operationId": "adminTopupKey",
                    "security": bearer,
                    "parameters": [_KEY_ID],
                    "requestBody": _body(topup),
                    "responses": {
                        "200": _json(
                            "The amount added and the new balance.",
                            {
                                "type": "object",
                                "properties": {
                                    "key_id": {"type": "string"},
                                    "amount_micro": {"type": "integer"},
                                    "amount_usd": _USD_STRING,
                                    "balance_micro": {"type": "integer"},
                                    "balance_usd": _USD_STRING,
                                },
                            },
                        ),
                        **_errors(400, 401, 403, 404),
                    },
                }
            },
            "/v1/admin/usage": {
                "get": {
                    "operationId": "adminUsage",
                    "summary": "Requests, tokens and cost grouped by key, model and day (admin).",
                    "security": bearer,
                    "parameters": [
                        _query("start", f"From this time (inclusive): {_TIME_DOC}."),
                        _query("end", f"Until this time (exclusive): {_TIME_DOC}."),
                        _query(
                            "group_by",
                            "Comma-separated: any of key, model, day (UTC). Default: all three.",
                        ),
                        _query("key_id", "Only this key."),
                        _query("model", "Only this model."),
                    ],
                    "responses": {
                        "200": _json(
                            "One row per group, and the total.",
                            {
                                "type": "object",
                                "properties": {
                                    "group_by": {"type": "array", "items": {"type": "string"}},
                                    "data": {"type": "array", "items": {"type": "object"}},
                                    "total": total,
                                },
                            },
                        ),
                        **_errors(400, 401, 403),
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
                    "security": [],
                    "parameters": [
                        {
                            "name": SIGNATURE_HEADER,
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": _body(event),
                    "responses": {
                        "200": _json(
                            "Received: applied (true, or false for a payment already applied) "
                            "or ignored (another event type)."
                        ),
                        **_errors(400, 404, 413, 503),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "responses": {
                        "200": {"description": "Healthy: every check passed."},
                        "503": {
                            "description": (
                                "Unhealthy: `failing` names the checks that failed (event_loop, "
                                "generations, database, redis)."
                            )
                        },
                    },
                }
            },
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


async def openapi_json(_request: Request) -> Response:
    """Serve the OpenAPI document."""
    return json_response(openapi_document())
