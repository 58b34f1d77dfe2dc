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
from tokenwire.api.errors import json_response
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
    (request_schema,), components = msgspec.json.schema_components(
        [ChatRequest], ref_template="#/components/schemas/{name}"
    )
    components["ErrorResponse"] = _ERROR_SCHEMA
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
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "responses": {
                        "200": {"description": "Healthy."},
                        "503": {"description": "The database is unreachable."},
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
