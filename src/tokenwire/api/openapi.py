"""``GET /openapi.json``: the OpenAPI 3.1 document of the HTTP API.

The request schema is generated from the msgspec structs that validate requests, so the
document cannot drift from what the server accepts.
"""

from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from tokenwire import __version__
from tokenwire.api import openapi_messages
from tokenwire.api.admin import CreateKeyRequest, TopupRequest, UpdateKeyRequest
from tokenwire.api.openapi_account import account_paths
from tokenwire.api.openapi_accounting import (
    API_KEY_SCHEMA,
    REPORT_ROW_SCHEMA,
    REPORT_TOTAL_SCHEMA,
    TOTAL_SCHEMA,
)
from tokenwire.api.openapi_admin import admin_paths
from tokenwire.api.openapi_parts import BEARER, errors, json_body, json_reply
from tokenwire.api.openapi_responses import responses_paths, responses_rules
from tokenwire.api.signup import SignupRequest
from tokenwire.api.webhooks import SIGNATURE_HEADER, PaymentSucceeded, WebhookEvent
from tokenwire.state import get_state
from tokenwire.wire.responses_request import ResponsesRequest
from tokenwire.wire.schema import ChatRequest

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


_SSE_EVENT = {
    "description": "One server-sent event (the schema of each event, as OpenAPI 3.1 tools "
    'read it): a chat.completion.chunk (or an in-band {"error"}) as JSON in data, '
    "numbered by id, and a last one whose data is [DONE].",
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"const": "message"},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "retry": {"type": "integer", "minimum": 0},
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": "application/json"},
            ]
        },
    },
}


def _allow_models(components: dict[str, Any], model_ids: tuple[str, ...]) -> None:
    """Key requests' ``models`` items: the catalog's ids (anything else is refused)."""
    for name in ("CreateKeyRequest", "UpdateKeyRequest"):
        for branch in components[name]["properties"]["models"]["anyOf"]:
            if branch.get("type") == "array":
                branch["items"] = {"enum": list(model_ids)}


def _allow_plans(components: dict[str, Any], plans: tuple[str, ...]) -> None:
    """Key requests' ``plan``: a configured plan, or null for the default."""
    for name in ("CreateKeyRequest", "UpdateKeyRequest"):
        field = components[name]["properties"]["plan"]
        for branch in field["anyOf"]:
            if branch.get("type") == "string":
                branch["enum"] = list(plans)


def _payment_rules(components: dict[str, Any], currencies: tuple[str, ...]) -> None:
    """A payment has ``amount_usd``, or ``amount`` and ``currency`` (a configured one)."""
    payment = components["PaymentSucceeded"]
    payment["properties"]["currency"]["enum"] = [
        form for code in currencies for form in (code, code.lower())
    ]
    usd_only = {
        "required": ["amount_usd"],
        "not": {"anyOf": [{"required": ["amount"]}, {"required": ["currency"]}]},
    }
    foreign = {"required": ["amount", "currency"], "not": {"required": ["amount_usd"]}}
    payment["oneOf"] = [usd_only, foreign]


class CatalogModel(NamedTuple):
    """What the document says about one model of the catalog."""

    id: str
    max_output_tokens: int
    available: bool  # its provider is configured here


def _chat_rules(components: dict[str, Any], catalog: tuple[CatalogModel, ...]) -> None:
    """The chat request's rules that depend on this gateway or span fields, as JSON Schema:
    ``model`` is one the gateway serves, ``max_tokens`` at most that model's output limit,
    and ``stream_options`` only with ``stream: true``."""
    chat = components["ChatRequest"]
    rules: list[dict[str, Any]] = [
        {
            "if": {
                "properties": {"stream_options": {"type": "object"}},
                "required": ["stream_options"],
            },
            "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
        }
    ]
    served = [model for model in catalog if model.available]
    if served:
        chat["properties"]["model"] = {"enum": [model.id for model in served]}
    for model in served:
        limit = {"maximum": model.max_output_tokens}
        then = {"properties": {"max_tokens": limit, "max_completion_tokens": limit}}
        rules.append({"if": {"properties": {"model": {"const": model.id}}}, "then": then})
    chat["allOf"] = rules


def openapi_json_for(request: Request) -> bytes:
    """The document for this app (its model catalog, plans and currencies), encoded once."""
    state = get_state(request)
    registry = state.registry
    catalog = tuple(
        CatalogModel(entry.id, entry.max_output_tokens, registry.unavailable_reason(entry) is None)
        for entry in registry.models.values()
    )
    return _encoded(catalog, state.completions.plans.names, tuple(state.settings.currencies))


@cache
def _encoded(
    catalog: tuple[CatalogModel, ...], plans: tuple[str, ...], currencies: tuple[str, ...]
) -> bytes:
    return msgspec.json.encode(openapi_document(catalog, plans, currencies))


def openapi_document(
    catalog: tuple[CatalogModel, ...] = (),
    plans: tuple[str, ...] = (),
    currencies: tuple[str, ...] = ("USD",),
) -> dict[str, Any]:
    """The OpenAPI document; with ``catalog``, the models of this gateway (which a key may be
    limited to, which a request may name, and their output limits); with ``plans`` and
    ``currencies``, the plans a key may be on and the currencies a payment may be in."""
    schemas, components = msgspec.json.schema_components(
        [
            ChatRequest,
            CreateKeyRequest,
            UpdateKeyRequest,
            TopupRequest,
            WebhookEvent,
            PaymentSucceeded,
            ResponsesRequest,
            SignupRequest,
            *openapi_messages.REQUEST_TYPES,
        ],
        ref_template="#/components/schemas/{name}",
    )
    (
        request_schema,
        create_key,
        update_key,
        topup,
        event,
        _,
        responses_request,
        signup_request,
        messages_schema,
    ) = schemas
    if catalog:
        _allow_models(components, tuple(model.id for model in catalog))
    if plans:
        _allow_plans(components, plans)
    _payment_rules(components, currencies)
    _chat_rules(components, catalog)
    served = [(model.id, model.max_output_tokens) for model in catalog if model.available]
    responses_rules(components, served)
    openapi_messages.add_rules(components, served)
    components["ErrorResponse"] = _ERROR_SCHEMA
    components["ApiKey"] = API_KEY_SCHEMA
    components["UsageTotal"] = TOTAL_SCHEMA
    components["UsageReportTotal"] = REPORT_TOTAL_SCHEMA
    components["UsageReportRow"] = REPORT_ROW_SCHEMA
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
                    "security": BEARER,
                    "requestBody": json_body(request_schema),
                    "responses": {
                        "200": {
                            "description": "A chat.completion object, or with stream=true an "
                            "SSE stream of chat.completion.chunk objects ending in data: [DONE].",
                            "content": {
                                "application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": _SSE_EVENT},
                            },
                        },
                        **errors(400, 401, 404, 413, 429, 502, 503, 504),
                    },
                }
            },
            **responses_paths(responses_request),
            **openapi_messages.paths(messages_schema),
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "security": BEARER,
                    "responses": {
                        "200": {
                            "description": "The model catalog in OpenAI's list format.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **errors(401),
                    },
                }
            },
            "/v1/models/{model_id}": {
                "get": {
                    "operationId": "retrieveModel",
                    "security": BEARER,
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
                        **errors(401, 404),
                    },
                }
            },
            "/v1/chat/completions/{stream_id}/cancel": {
                "post": {
                    "operationId": "cancelChatCompletionStream",
                    "summary": "Stop a resumable stream of the caller's; its readers get "
                    'finish_reason "cancelled", the usage so far, then [DONE].',
                    "security": BEARER,
                    "parameters": [
                        {
                            "name": "stream_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": json_reply(
                            "The cancel was requested (already_ended: the stream had ended).",
                            {
                                "type": "object",
                                "required": ["object", "id", "already_ended"],
                                "properties": {
                                    "object": {"const": "chat.completion.cancel"},
                                    "id": {"type": "string"},
                                    "already_ended": {"type": "boolean"},
                                },
                            },
                        ),
                        **errors(401, 404, 410, 503),
                    },
                }
            },
            **account_paths(event, signup_request),
            **admin_paths(create_key, update_key, topup),
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
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "summary": "Readiness for a load balancer: send this instance new requests?",
                    "responses": {
                        "200": {"description": "Ready: not draining; database and Redis answer."},
                        "503": {
                            "description": (
                                "Not ready: `status` is `draining` (a graceful drain began; "
                                "docs/operations.md) or `not_ready`; `failing` names the checks "
                                "(draining, database, redis)."
                            )
                        },
                    },
                }
            },
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                **openapi_messages.SECURITY_SCHEMES,
                "webhookSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": SIGNATURE_HEADER,
                    "description": "t=<Unix seconds>,v1=<hex HMAC-SHA256 of "
                    '"<t>.<raw body>"> keyed with TOKENWIRE_WEBHOOK_SECRET.',
                },
            },
        },
    }


async def openapi_json(request: Request) -> Response:
    """Serve the OpenAPI document."""
    return Response(openapi_json_for(request), media_type="application/json")
