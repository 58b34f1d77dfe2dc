"""``GET /v1/models`` and ``GET /v1/models/{id}`` in OpenAI's list format, plus pricing.

``pricing`` is what the calling key is charged, on its plan (USD per 1M tokens); what a model
costs the operator upstream is never shown here.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tokenwire.accounting.pricing import per_mtok_usd
from tokenwire.api.auth import authenticate
from tokenwire.api.errors import json_response
from tokenwire.config import ModelEntry, Plan
from tokenwire.errors import ModelNotFound
from tokenwire.providers.registry import ProviderRegistry
from tokenwire.state import get_state


def pricing_object(plan: Plan, entry: ModelEntry) -> dict[str, Any]:
    """What ``plan`` charges for ``entry``, in USD per 1M tokens of each kind."""
    price = plan.price(entry)
    return {
        "plan": plan.name,
        "flat": price.flat,
        "input_usd_per_mtok": per_mtok_usd(price.input),
        "output_usd_per_mtok": per_mtok_usd(price.output),
        "cache_write_usd_per_mtok": per_mtok_usd(price.cache_write),
        "cache_read_usd_per_mtok": per_mtok_usd(price.cache_read),
    }


def model_object(entry: ModelEntry, registry: ProviderRegistry, plan: Plan) -> dict[str, Any]:
    """One model in OpenAI's shape, with ``pricing`` on ``plan`` and availability."""
    reason = registry.unavailable_reason(entry)
    result: dict[str, Any] = {
        "id": entry.id,
        "object": "model",
        "created": 0,
        "owned_by": entry.provider,
        "pricing": pricing_object(plan, entry),
        "available": reason is None,
    }
    if reason is not None:
        result["unavailable_reason"] = reason
    return result


async def list_models(request: Request) -> Response:
    """Every model in the catalog, priced on the caller's plan."""
    key = await authenticate(request)
    state = get_state(request)
    plan = state.completions.plans.plan(key.plan)
    registry = state.registry
    data = [model_object(entry, registry, plan) for entry in registry.models.values()]
    return json_response({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    """One model by id, or 404 ``model_not_found``."""
    key = await authenticate(request)
    state = get_state(request)
    model_id = request.path_params["model_id"]
    entry = state.registry.models.get(model_id)
    if entry is None:
        raise ModelNotFound(f"The model {model_id!r} does not exist.", param="model")
    plan = state.completions.plans.plan(key.plan)
    return json_response(model_object(entry, state.registry, plan))
