"""Pieces every part of ``/openapi.json`` uses: the error body and its responses."""

from __future__ import annotations

from typing import Any

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


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
