"""``GET /metrics``: the Prometheus exposition (``tokenwire.observability.metrics``).

Off the public API: on the main listener it answers only an admin key (401 without a key,
403 for another key); on the metrics listener (``server.metrics_port``, for a Prometheus
that cannot send a key, on an address only it reaches) it answers anyone, and that listener
serves nothing else (404).
"""

from __future__ import annotations

import asyncio
import gzip

from prometheus_client.exposition import gzip_accepted
from starlette.requests import Request
from starlette.responses import Response

from tokenwire.api.admin import require_admin
from tokenwire.observability.metrics import Metrics
from tokenwire.state import AppState


async def metrics_response(request: Request, state: AppState) -> Response:
    """The exposition of every series (sampled values refreshed first), in the format the
    scraper's ``Accept`` asks for, gzipped when it accepts that (Prometheus does)."""
    metrics = state.metrics
    metrics.sample()  # on the event loop: it reads what the loop's tasks change
    headers = request.headers
    gzipped = gzip_accepted(headers.get("accept-encoding", ""))
    # Off the loop: merging the workers' files (multiprocess mode) reads the disk.
    body, content_type = await asyncio.to_thread(
        _encode, metrics, headers.get("accept", ""), gzipped
    )
    response_headers = {"content-type": content_type, "cache-control": "no-store"}
    if gzipped:
        response_headers["content-encoding"] = "gzip"
    return Response(body, headers=response_headers)


def _encode(metrics: Metrics, accept: str, gzipped: bool) -> tuple[bytes, str]:
    body, content_type = metrics.exposition(accept)
    return (gzip.compress(body) if gzipped else body), content_type


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics`` on the main listener: admin keys only."""
    return await metrics_response(request, await require_admin(request))
