"""``GET /healthz`` (is this process live, and can it reach what it needs?) and ``GET /readyz``
(should a load balancer send it new requests?).

``200 {"status": "ok", …}`` or ``503 {"status": "unhealthy", "failing": [...], …}``, with one
entry per check under ``checks``:

* ``event_loop``: the loop-lag watchdog ticked on time (a loop blocked past
  ``server.health_max_loop_lag_s`` is not live);
* ``generations``: with generations live, at least one moved within ``server.health_stall_s``;
* ``database``: ``SELECT 1`` within ``server.health_timeout_s``;
* ``redis`` (only when limits or resumable streams use it): ``PING`` within the same timeout.

``/readyz`` answers whether to send this process new work: ``200 {"status": "ready"}``, or
``503`` with ``"status": "draining"`` once a drain began (SIGTERM; docs/operations.md) and
``"not_ready"`` when the database or Redis (when configured) does not answer, with the same
``failing`` list and ``checks``. A draining process stays live (``/healthz`` 200) so that an
orchestrator does not kill it while its streams finish.
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


async def with_store_checks(state: AppState, checks: dict[str, Any]) -> list[str]:
    """Add the database and (when used) Redis probes to ``checks``; the failing names."""
    database, redis = await asyncio.gather(database_check(state), state.monitor.redis_check())
    checks["database"] = database
    if redis is not None:
        checks["redis"] = redis
    return [name for name, check in checks.items() if not check["ok"]]


async def healthz(request: Request) -> Response:
    """200 when every check passes, else 503 naming the failing ones."""
    state = get_state(request)
    monitor = state.monitor
    checks: dict[str, Any] = {
        "event_loop": monitor.loop_check(),  # first: before this handler awaits anything
        "generations": monitor.generations_check(),
    }
    failing = await with_store_checks(state, checks)
    body = {
        "status": "unhealthy" if failing else "ok",
        "failing": failing,
        "live_generations": len(state.completions.live),
        "checks": checks,
    }
    return json_response(body, 503 if failing else 200)


def drain_check(state: AppState) -> dict[str, Any]:
    """Not draining; or why and how long running streams may still take."""
    notice = state.drain.notice
    if notice is None:
        return {"ok": True}
    return {"ok": False, "reason": notice.reason, "remaining_s": round(notice.remaining_s(), 1)}


async def readyz(request: Request) -> Response:
    """200 when this process takes new requests, else 503 naming why not."""
    state = get_state(request)
    checks: dict[str, Any] = {"draining": drain_check(state)}
    failing = await with_store_checks(state, checks)
    status = "ready" if not failing else "draining" if state.drain.draining else "not_ready"
    body = {"status": status, "failing": failing, "checks": checks}
    return json_response(body, 503 if failing else 200)
