"""Pieces every part of ``/openapi.json`` uses: error responses, bodies, query parameters."""

from __future__ import annotations

from typing import Any

from tokenwire.api.formats import INSTANT_PATTERN

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
API_KEY_REF = {"$ref": "#/components/schemas/ApiKey"}
BEARER: list[dict[str, list[str]]] = [{"bearerAuth": []}]
"""The ``security`` of an operation that takes an API key."""

TIME_DOC = (
    "Unix seconds or ISO 8601 (UTC unless a zone is given); 'end' must be later than 'start' "
    "(400 empty_time_range otherwise)"
)
INSTANT = {"type": "string", "pattern": f"(?:{INSTANT_PATTERN})|^$"}
"""A ``start``/``end`` parameter; empty means no bound, as if it were left out."""

KEY_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}


def errors(*statuses: int) -> dict[str, Any]:
    """OpenAI-style error responses for these statuses."""
    return {
        str(s): {
            "description": "OpenAI-style error",
            "content": {"application/json": {"schema": ERROR_REF}},
        }
        for s in statuses
    }


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """A required JSON request body with this schema."""
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def json_reply(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON response with this schema (any object without one)."""
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


def query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """An optional query parameter (a string unless ``schema`` says otherwise)."""
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def group_by_pattern(names: str) -> str:
    """A comma-separated ``group_by`` of ``names`` (an alternation), blanks allowed."""
    group = f"(?:{names})"
    return rf"^ *(?:{group} *)?(?:, *(?:{group} *)?)*$"


TIME_RANGE = (
    query("start", f"From this time (inclusive): {TIME_DOC}.", INSTANT),
    query("end", f"Until this time (exclusive): {TIME_DOC}.", INSTANT),
)
"""The ``start`` and ``end`` query parameters of a usage report."""
