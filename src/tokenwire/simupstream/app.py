"""``tokenwire sim-upstream``: the simulator as a standalone OpenAI-compatible HTTP server.

It is the upstream that benchmarks and proxy tests put the gateway in front of, so it does
as little as possible per token: the same :mod:`~tokenwire.providers.sim` plan and the same
chunk encoder as the gateway, written straight to the socket. It accepts any API key.
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tokenwire.api.errors import error_response, json_response
from tokenwire.completions import new_completion_id
from tokenwire.errors import GatewayError
from tokenwire.providers.sim import plan, run_plan
from tokenwire.streams.events import Usage
from tokenwire.wire import sse
from tokenwire.wire.chunks import ChunkEncoder, CompletionBuilder
from tokenwire.wire.schema import ChatRequest, decode_chat_request


class SimStats:
    """Counters a test or benchmark can read at ``GET /sim/stats``."""

    def __init__(self) -> None:
        self.active_streams = 0
        self.completed_streams = 0
        self.cancelled_streams = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "active_streams": self.active_streams,
            "completed_streams": self.completed_streams,
            "cancelled_streams": self.cancelled_streams,
        }


class _SimStream:
    def __init__(self, request: ChatRequest, ttft_s: float, itl_s: float, stats: SimStats) -> None:
        self._request = request
        self._ttft_s = ttft_s
        self._itl_s = itl_s
        self._stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = self._request
        completion_id = new_completion_id()
        encoder = ChunkEncoder(
            completion_id=completion_id,
            created=0,
            model=request.model,
            include_usage=request.include_usage,
        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        writer = asyncio.current_task()
        assert writer is not None

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            writer.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        include_usage = request.include_usage
        stats = self._stats
        stats.active_streams += 1
        try:
            events = run_plan(plan(request), ttft_s=self._ttft_s, itl_s=self._itl_s)
            pending_usage: Usage | None = None
            async for event in events:
                if isinstance(event, Usage):
                    pending_usage = event  # OpenAI sends usage after the finish chunk
                    continue
                data = encoder.encode(event, include_usage=include_usage)
                if data is not None:
                    await send(
                        {"type": "http.response.body", "body": sse.event(data), "more_body": True}
                    )
            tail = b""
            if pending_usage is not None and include_usage:
                tail = sse.event(encoder.usage(pending_usage))
            await send({"type": "http.response.body", "body": tail + sse.DONE, "more_body": False})
            stats.completed_streams += 1
        except (asyncio.CancelledError, OSError):
            stats.cancelled_streams += 1  # the client went away: stop generating
        finally:
            stats.active_streams -= 1
            watcher.cancel()


def create_sim_app(*, ttft_ms: float, itl_ms: float) -> Starlette:
    """The sim-upstream ASGI app."""
    ttft_s, itl_s = ttft_ms / 1000, itl_ms / 1000
    stats = SimStats()

    async def completions(request: Request) -> Response | _SimStream:
        try:
            chat = decode_chat_request(await request.body())
        except GatewayError as exc:
            return error_response(exc)
        if chat.stream:
            return _SimStream(chat, ttft_s, itl_s, stats)
        builder = CompletionBuilder()
        async for event in run_plan(plan(chat), ttft_s=ttft_s, itl_s=itl_s):
            builder.add(event)
        return json_response(
            builder.build(completion_id=new_completion_id(), created=0, model=chat.model)
        )

    async def models(_request: Request) -> Response:
        return json_response(
            {
                "object": "list",
                "data": [{"id": "sim", "object": "model", "created": 0, "owned_by": "sim"}],
            }
        )

    async def stats_route(_request: Request) -> Response:
        return json_response(stats.as_dict())

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/sim/stats", stats_route, methods=["GET"]),
        ]
    )
    app.state.stats = stats
    return app
