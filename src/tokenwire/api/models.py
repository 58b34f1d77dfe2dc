"""``GET /v1/models`` and ``GET /v1/models/{id}`` in OpenAI's list format, plus pricing."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tokenwire.api.auth import authenticate
from tokenwire.api.errors import json_response
from tokenwire.config import ModelEntry
from tokenwire.errors import ModelNotFound
from tokenwire.providers.registry import ProviderRegistry
from tokenwire.state import get_state


def model_object(entry: ModelEntry, registry: ProviderRegistry) -> dict[str, Any]:
    """One model in OpenAI's shape, with ``pricing`` (USD per 1M tokens) and availability."""
    reason = registry.unavailable_reason(entry)
    result: dict[str, Any] = {
        "id": entry.id,
        "object": "model",
        "created": 0,
        "owned_by": entry.provider,
        "pricing": {
            "input_usd_per_mtok": entry.input_micro_per_mtok / 1_000_000,
            "output_usd_per_mtok": entry.output_micro_per_mtok / 1_000_000,
        },
        "available": reason is None,
    }
    if reason is not None:
        result["unavailable_reason"] = reason
    return result


async def list_models(request: Request) -> Response:
    """Every model in the catalog."""
    await authenticate(request)
    registry = get_state(request).registry
    data = [model_object(entry, registry) for entry in registry.models.values()]
    return json_response({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    """One model by id, or 404 ``model_not_found``."""
    await authenticate(request)
    registry = get_state(request).registry
    model_id = request.path_params["model_id"]
    entry = registry.models.get(model_id)
    if entry is None:
        raise ModelNotFound(f"The model {model_id!r} does not exist.", param="model")
    return json_response(model_object(entry, registry))
