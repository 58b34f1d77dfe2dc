"""``GET /healthz``: liveness plus a database round trip."""

from __future__ import annotations

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import Response

from tokenwire.api.errors import json_response
from tokenwire.state import get_state


async def healthz(request: Request) -> Response:
    """200 ``{"status": "ok"}`` when the database answers, 503 otherwise."""
    state = get_state(request)
    try:
        async with state.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception:  # noqa: BLE001 - any database failure means not healthy
        return json_response({"status": "degraded", "database": "unreachable"}, 503)
    return json_response({"status": "ok", "live_generations": len(state.completions.live)})
