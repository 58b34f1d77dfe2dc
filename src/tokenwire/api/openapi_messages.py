"""The Messages API's part of ``/openapi.json``: ``POST /v1/messages`` and its schemas.

The request schema is generated from the msgspec struct that validates the body
(:class:`~tokenwire.wire.messages_request.MessagesRequest`), plus the rules that depend on the
gateway (its models and their output limits) or span fields (a forced ``tool_choice`` needs
``tools``). Errors have Anthropic's shape.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenwire.wire.messages_request import MessagesRequest

REQUEST_TYPES = (MessagesRequest,)
"""The structs whose schemas this part adds to the document's components."""

ERROR_SCHEMA = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
_ERROR = {"$ref": "#/components/schemas/AnthropicErrorResponse"}
_STREAM_EVENT = {
    "description": "One server-sent event of Anthropic's stream: its event name is the type "
    "of its JSON data (message_start, content_block_start, content_block_delta, "
    "content_block_stop, message_delta, message_stop, ping, error); the events that end a "
    "step carry the number of the last log event as their id.",
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {
            "enum": [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
                "ping",
                "error",
            ]
        },
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "retry": {"type": "integer", "minimum": 0},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}


def add_rules(components: dict[str, Any], served: Iterable[tuple[str, int]]) -> None:
    """The request's rules beyond its struct: ``model`` one the gateway serves (``served``:
    id and output limit), ``max_tokens`` at most that model's limit, and a ``tool_choice`` of
    type any or tool only with ``tools``."""
    request = components["MessagesRequest"]
    components["AnthropicErrorResponse"] = ERROR_SCHEMA
    forced = {"properties": {"type": {"enum": ["any", "tool"]}}, "required": ["type"]}
    rules: list[dict[str, Any]] = [
        {
            "if": {"properties": {"tool_choice": forced}, "required": ["tool_choice"]},
            "then": {
                "properties": {"tools": {"type": "array", "minItems": 1}},
                "required": ["tools"],
            },
        }
    ]
    models = list(served)
    if models:
        request["properties"]["model"] = {"enum": [model for model, _ in models]}
    for model, limit in models:
        rules.append(
            {
                "if": {"properties": {"model": {"const": model}}},
                "then": {"properties": {"max_tokens": {"maximum": limit}}},
            }
        )
    request["allOf"] = rules


def paths(request_schema: dict[str, Any]) -> dict[str, Any]:
    """The ``/v1/messages`` path item."""
    errors = {
        str(status): {
            "description": "Anthropic-style error",
            "content": {"application/json": {"schema": _ERROR}},
        }
        for status in (400, 401, 402, 403, 404, 409, 413, 429, 502, 503, 504)
    }
    return {
        "/v1/messages": {
            "post": {
                "operationId": "createMessage",
                "summary": "Anthropic Messages API",
                "security": [{"bearerAuth": []}, {"anthropicApiKey": []}],
                "parameters": [
                    {
                        "name": "anthropic-version",
                        "in": "header",
                        "required": False,
                        "description": "Accepted and ignored (Anthropic's SDKs send it).",
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": request_schema}},
                },
                "responses": {
                    "200": {
                        "description": "A message object, or with stream=true Anthropic's "
                        "server-sent events.",
                        "content": {
                            "application/json": {"schema": {"type": "object"}},
                            "text/event-stream": {"schema": _STREAM_EVENT},
                        },
                    },
                    **errors,
                },
            }
        }
    }


SECURITY_SCHEMES = {
    "anthropicApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
}
