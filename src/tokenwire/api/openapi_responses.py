"""The Responses API's part of ``/openapi.json``: its paths, and its request schema (generated
from :class:`~tokenwire.wire.responses_request.ResponsesRequest`) with the rules a plain struct
does not say: which values the gateway takes (``background`` only false, images by URL, text
only where a role takes text), that ``input`` is required, and each model's output limit.
"""

from __future__ import annotations

from typing import Any

from tokenwire.api.openapi_parts import errors, json_body

_STREAM_EVENTS = (
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
    "response.completed",
    "response.incomplete",
    "response.failed",
)
_RESPONSE_EVENT = {
    "description": "One server-sent event: a Responses streaming event, named by event and "
    "numbered by id (its sequence_number); the stream ends with response.completed, "
    "response.incomplete or response.failed (no [DONE]).",
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"enum": list(_STREAM_EVENTS)},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "retry": {"type": "integer", "minimum": 0},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}
_RESPONSE_OBJECT = {
    "type": "object",
    "required": ["id", "object", "created_at", "status", "model", "output"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "response"},
        "created_at": {"type": "integer"},
        "status": {"enum": ["completed", "incomplete", "failed", "cancelled", "in_progress"]},
        "model": {"type": "string"},
        "output": {"type": "array", "items": {"type": "object"}},
        "usage": {"type": ["object", "null"]},
    },
}
_RESPONSE_ID = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _parts(*names: str) -> dict[str, Any]:
    refs = [{"$ref": f"#/components/schemas/{name}"} for name in names]
    return {"anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": refs}}]}


def responses_rules(components: dict[str, Any], models: list[tuple[str, int]]) -> None:
    """Tighten the generated Responses schemas to what the gateway accepts (see the module).

    ``models``: the served models' ids and output limits.
    """
    request = components["ResponsesRequest"]
    properties = request["properties"]
    request["required"] = ["model", "input"]
    items = dict(properties["input"]["anyOf"][1]["items"])
    items.pop("discriminator", None)  # a message's type may be left out (OpenAI's "easy" input)
    properties["input"] = {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": items, "minItems": 1, "maxItems": 10_000},
        ]
    }
    properties["background"] = {"enum": [False, None]}
    if models:
        properties["model"] = {"enum": [model for model, _ in models]}
        request["allOf"] = [
            {
                "if": {"properties": {"model": {"const": model}}},
                "then": {"properties": {"max_output_tokens": {"maximum": limit}}},
            }
            for model, limit in models
        ]
    image = components["InputImage"]
    image["properties"].pop("file_id", None)
    image["required"] = ["type", "image_url"]
    image["properties"]["image_url"] = {"type": "string"}
    components["InputFile"]["properties"].pop("file_url", None)
    components["FunctionCallOutputItem"]["properties"]["output"] = _parts("InputText")
    message = components["MessageItem"]
    message["required"] = [name for name in message.get("required", []) if name != "type"]
    message["allOf"] = [
        {
            "if": {"properties": {"role": {"const": "user"}}},
            "then": {
                "properties": {
                    "content": _parts("InputText", "InputImage", "InputFile", "OutputText")
                }
            },
        },
        {
            "if": {"properties": {"role": {"const": "assistant"}}},
            "then": {"properties": {"content": _parts("InputText", "OutputText", "OutputRefusal")}},
        },
        {
            "if": {"properties": {"role": {"enum": ["system", "developer"]}}},
            "then": {"properties": {"content": _parts("InputText", "OutputText")}},
        },
    ]


def responses_paths(request_schema: dict[str, Any]) -> dict[str, Any]:
    """``/v1/responses`` and ``/v1/responses/{response_id}``."""
    bearer: list[dict[str, list[str]]] = [{"bearerAuth": []}]
    return {
        "/v1/responses": {
            "post": {
                "operationId": "createResponse",
                "summary": "Create a response (OpenAI's Responses API); the WebSocket mode is "
                "GET /v1/responses with an upgrade (docs/apis.md).",
                "security": bearer,
                "requestBody": json_body(request_schema),
                "responses": {
                    "200": {
                        "description": "A response object, or with stream=true an SSE stream "
                        "of Responses events.",
                        "content": {
                            "application/json": {"schema": _RESPONSE_OBJECT},
                            "text/event-stream": {"schema": _RESPONSE_EVENT},
                        },
                    },
                    **errors(400, 401, 402, 403, 404, 409, 413, 429, 502, 503, 504),
                },
            }
        },
        "/v1/responses/{response_id}": {
            "get": {
                "operationId": "getResponse",
                "summary": "A stored response (or one running here, as it stands); with "
                "stream=true, a resumable stream's events after starting_after.",
                "security": bearer,
                "parameters": [
                    _RESPONSE_ID,
                    {
                        "name": "stream",
                        "in": "query",
                        "required": False,
                        "schema": {"enum": ["true", "false"]},
                    },
                    {
                        "name": "starting_after",
                        "in": "query",
                        "required": False,
                        "description": "Replay the events after this sequence_number.",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,15}$"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The response object, or its events (stream=true).",
                        "content": {
                            "application/json": {"schema": _RESPONSE_OBJECT},
                            "text/event-stream": {"schema": _RESPONSE_EVENT},
                        },
                    },
                    **errors(400, 401, 404, 410, 503),
                },
            },
            "delete": {
                "operationId": "deleteResponse",
                "security": bearer,
                "parameters": [_RESPONSE_ID],
                "responses": {
                    "200": {
                        "description": "Deleted.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "id": {"type": "string"},
                                        "object": {"const": "response.deleted"},
                                        "deleted": {"const": True},
                                    },
                                }
                            }
                        },
                    },
                    **errors(401, 404, 503),
                },
            },
        },
    }
