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


class _SimStream:
    def __init__(self, request: ChatRequest, ttft_s: float, itl_s: float) -> None:
        self._request = request
        self._ttft_s = ttft_s
        self._itl_s = itl_s

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
        except asyncio.CancelledError:
            return  # the client went away: stop generating
        except OSError:
            return
        finally:
            watcher.cancel()


def create_sim_app(*, ttft_ms: float, itl_ms: float) -> Starlette:
    """The sim-upstream ASGI app."""
    ttft_s, itl_s = ttft_ms / 1000, itl_ms / 1000

    async def completions(request: Request) -> Response | _SimStream:
        try:
            chat = decode_chat_request(await request.body())
        except GatewayError as exc:
            return error_response(exc)
        if chat.stream:
            return _SimStream(chat, ttft_s, itl_s)
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

    return Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )
