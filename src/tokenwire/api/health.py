"""``GET /healthz``: is this process live, and can it reach what it needs?

``200 {"status": "ok", …}`` or ``503 {"status": "unhealthy", "failing": [...], …}``, with one
entry per check under ``checks``:

* ``event_loop``: the loop-lag watchdog ticked on time (a loop blocked past
  ``server.health_max_loop_lag_s`` is not live);
* ``generations``: with generations live, at least one moved within ``server.health_stall_s``;
* ``database``: ``SELECT 1`` within ``server.health_timeout_s``;
* ``redis`` (only when limits or resumable streams use it): ``PING`` within the same timeout.

Readiness (draining before a shutdown) is a different question and not answered here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import Response

from tokenwire.api.errors import json_response
from tokenwire.state import AppState, get_state


async def database_check(state: AppState) -> dict[str, Any]:
    """``SELECT 1`` under the probe timeout."""
    try:
        async with asyncio.timeout(state.monitor.probe_timeout_s):
            async with state.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any database failure means not healthy
        return {"ok": False, "error": type(exc).__name__}
    return {"ok": True}


async def healthz(request: Request) -> Response:
    """200 when every check passes, else 503 naming the failing ones."""
    state = get_state(request)
    monitor = state.monitor
    checks: dict[str, Any] = {
        "event_loop": monitor.loop_check(),  # first: before this handler awaits anything
        "generations": monitor.generations_check(),
    }
    database, redis = await asyncio.gather(database_check(state), monitor.redis_check())
    checks["database"] = database
    if redis is not None:
        checks["redis"] = redis
    failing = [name for name, check in checks.items() if not check["ok"]]
    body = {
        "status": "unhealthy" if failing else "ok",
        "failing": failing,
        "live_generations": len(state.completions.live),
        "checks": checks,
    }
    return json_response(body, 503 if failing else 200)
