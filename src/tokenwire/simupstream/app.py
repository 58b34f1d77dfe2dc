"""``tokenwire sim-upstream``: the simulator as a standalone OpenAI-compatible HTTP server.

It is the upstream that benchmarks and proxy tests put the gateway in front of, so it does
as little as possible per token: the same :mod:`~tokenwire.providers.sim` plan and the same
chunk encoder as the gateway, written straight to the socket. It accepts any API key.
Faults are injected on request (:mod:`tokenwire.simupstream.faults`). Tests that need one
exact answer (say, hostile Markdown for the web pages) give ``reply``: every answer is then
those tokens, with the same timing, usage and cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tokenwire.api.errors import error_response, json_response
from tokenwire.completions import new_completion_id
from tokenwire.errors import GatewayError
from tokenwire.providers.sim import SimPlan, prompt_tokens, run_plan, run_request
from tokenwire.simupstream.faults import ConnectionDropped, Fault, requested_fault
from tokenwire.streams.events import Event, Usage
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


_STATUS_TYPES = {429: "rate_limit_error", 529: "overloaded_error"}


def fault_body(status: int) -> dict[str, dict[str, object]]:
    """The OpenAI-style error body a faulting upstream sends."""
    kind = _STATUS_TYPES.get(status, "server_error")
    return {"error": {"message": f"simulated {status}", "type": kind, "param": None, "code": kind}}


def answer_events(
    request: ChatRequest, ttft_s: float, itl_s: float, reply: tuple[str, ...] | None
) -> AsyncIterator[Event]:
    """The simulator's answer to ``request``, or ``reply`` (a fixed answer) when given."""
    if reply is None:
        return run_request(request, ttft_s=ttft_s, itl_s=itl_s)
    return run_plan(SimPlan(reply, "stop", prompt_tokens(request)), ttft_s, itl_s)


class _SimStream:
    def __init__(
        self,
        request: ChatRequest,
        ttft_s: float,
        itl_s: float,
        stats: SimStats,
        fault: Fault | None = None,
        reply: tuple[str, ...] | None = None,
    ) -> None:
        self._request = request
        self._ttft_s = ttft_s
        self._itl_s = itl_s
        self._stats = stats
        self._fault = fault
        self._reply = reply

    async def _strike(self, send: Send, receive: Receive) -> None:
        """Fail the way the fault says; returns only by raising or ending the body."""
        fault = self._fault
        assert fault is not None
        if fault.kind == "reset":
            raise ConnectionDropped()
        if fault.kind == "stall":
            while (await receive())["type"] != "http.disconnect":
                pass
            raise asyncio.CancelledError()
        if fault.kind == "malformed":
            body = b"data: {this is not json\n\n"
        elif fault.kind == "truncated":
            body = b""
        else:
            payload = fault_body(fault.status or 500)
            body = sse.event(msgspec.json.encode(payload))
        await send({"type": "http.response.body", "body": body, "more_body": False})

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
        fault = self._fault
        try:
            if fault is not None and not fault.after_first_token:
                await self._strike(send, receive)
                return
            events = answer_events(request, self._ttft_s, self._itl_s, self._reply)
            pending_usage: Usage | None = None
            sent = 0
            async for event in events:
                if fault is not None and sent == 1:
                    await self._strike(send, receive)
                    return
                if isinstance(event, Usage):
                    pending_usage = event  # OpenAI sends usage after the finish chunk
                    continue
                data = encoder.encode(event, include_usage=include_usage)
                if data is not None:
                    await send(
                        {"type": "http.response.body", "body": sse.event(data), "more_body": True}
                    )
                    sent += 1
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


def create_sim_app(
    *, ttft_ms: float, itl_ms: float, reply: Sequence[str] | None = None
) -> Starlette:
    """The sim-upstream ASGI app; with ``reply`` (tokens), every answer is that text."""
    ttft_s, itl_s = ttft_ms / 1000, itl_ms / 1000
    fixed = None if reply is None else tuple(reply)
    stats = SimStats()

    async def completions(request: Request) -> Response | _SimStream:
        try:
            chat = decode_chat_request(await request.body())
        except GatewayError as exc:
            return error_response(exc)
        fault = requested_fault(chat)
        if fault is not None and fault.status is not None and not fault.after_first_token:
            headers = {"Retry-After": "1"} if fault.status == 429 else None
            return json_response(fault_body(fault.status), fault.status, headers)
        if chat.stream:
            return _SimStream(chat, ttft_s, itl_s, stats, fault, fixed)
        builder = CompletionBuilder()
        async for event in answer_events(chat, ttft_s, itl_s, fixed):
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
