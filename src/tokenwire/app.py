"""``create_app(settings)``: the ASGI application. No module-level state; tests build their own."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from tokenwire.accounting.keys import KeyStore, load_server_secret
from tokenwire.accounting.ledger import Ledger
from tokenwire.accounting.outbox import LedgerOutbox
from tokenwire.accounting.plans import PlanBook
from tokenwire.accounting.tickets import MemoryTicketStore, RedisTicketStore, TicketStore
from tokenwire.accounting.writer import LedgerWriter
from tokenwire.api import (
    admin,
    chat,
    health,
    key,
    messages,
    metrics,
    models,
    openapi,
    responses,
    responses_ws,
    signup,
    streams,
    tickets,
    usage,
    webhooks,
    ws,
)
from tokenwire.api.errors import (
    error_response,
    handle_database_error,
    handle_gateway_error,
    handle_http_exception,
    handle_unexpected,
)
from tokenwire.completions import CompletionService
from tokenwire.config import LimitsConfig, Settings, load_settings
from tokenwire.drain import Drain, DrainReason, refusal, run_drain
from tokenwire.errors import GatewayError, NotFound
from tokenwire.limits.base import RateLimiter
from tokenwire.limits.memory import MemoryRateLimiter
from tokenwire.monitor import HealthMonitor
from tokenwire.observability.metrics import Metrics
from tokenwire.protocols import server_protocols
from tokenwire.providers.registry import ProviderRegistry
from tokenwire.responses import ResponsesService
from tokenwire.runtime import metrics_sampler
from tokenwire.state import AppState
from tokenwire.storage.engine import make_engine, migrate
from tokenwire.storage.responses import ResponseStore
from tokenwire.streams.memory_store import MemoryStreamStore
from tokenwire.streams.store import StreamStore
from tokenwire.web.site import web_routes

STALE_RESERVATION_S = 6 * 3600
"""A reservation this old belongs to a process that died: it is settled as ``abandoned``."""


PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Answered while draining too: liveness stays true, readiness says ``draining``, and
Prometheus still scrapes the drain's progress."""


async def build_state(
    settings: Settings, env: Mapping[str, str] | None = None, drain: Drain | None = None
) -> AppState:
    """Open the database (migrating it), load the secret, build providers."""
    environ = dict(os.environ if env is None else env)
    engine = make_engine(settings.database_url)
    await migrate(engine)
    registry = ProviderRegistry(settings, environ)
    ledger = Ledger(engine)
    outbox_dir = settings.data_dir / "ledger-outbox"
    writer = LedgerWriter(ledger, LedgerOutbox(outbox_dir))
    metrics = Metrics.from_environ(metrics_sampler(writer, registry, outbox_dir))
    await writer.replay()  # rows an earlier run could not write, before anything is abandoned
    await ledger.abandon_stale_reservations(older_than_s=STALE_RESERVATION_S)
    limiter = make_limiter(settings.limits)
    streams = make_stream_store(settings)
    await streams.start()
    completions = CompletionService(
        registry,
        limiter=limiter,
        ledger=ledger,
        disconnect_grace_s=settings.server.disconnect_grace_s,
        default_max_tokens=settings.accounting.default_max_tokens,
        streams=streams,
        stream_grace_s=settings.server.stream_grace_s,
        writer=writer,
        metrics=metrics,
        plans=PlanBook.from_settings(settings),
    )
    state = AppState(
        settings=settings,
        engine=engine,
        keys=KeyStore(
            engine,
            load_server_secret(settings.data_dir, environ),
            cache_ttl_s=settings.server.key_cache_ttl_s,
        ),
        registry=registry,
        completions=completions,
        tickets=make_ticket_store(settings),
        ledger=ledger,
        limiter=limiter,
        monitor=make_monitor(settings),
        responses=ResponsesService(completions, ResponseStore(engine)),
        metrics=metrics,
        drain=drain or Drain(),
    )
    state.monitor.start(state.completions.live)
    metrics.start()
    return state


def redis_configured(settings: Settings) -> bool:
    """Whether this gateway shares state through Redis (limits or streams; then tickets too)."""
    return "redis" in (settings.limits.backend, settings.server.stream_backend)


def make_monitor(settings: Settings) -> HealthMonitor:
    """The /healthz watchdog; it probes Redis when limits, streams or tickets live there."""
    server = settings.server
    used_for = tuple(
        name
        for name, backend in (
            ("limits", settings.limits.backend),
            ("streams", server.stream_backend),
        )
        if backend == "redis"
    )
    if used_for:
        used_for += ("tickets",)
    return HealthMonitor(
        max_loop_lag_s=server.health_max_loop_lag_s,
        stall_s=server.health_stall_s,
        probe_timeout_s=server.health_timeout_s,
        redis_url=settings.limits.redis_url if used_for else None,
        redis_used_for=used_for,
    )


def make_ticket_store(settings: Settings) -> TicketStore:
    """WebSocket tickets: in Redis when Redis is configured (any instance redeems them)."""
    ttl_s = settings.server.ws_ticket_ttl_s
    if redis_configured(settings):
        limits = settings.limits
        return RedisTicketStore(limits.redis_url, prefix=limits.redis_prefix, ttl_s=ttl_s)
    return MemoryTicketStore(ttl_s)


def make_limiter(config: LimitsConfig) -> RateLimiter:
    """The configured rate-limit backend."""
    if config.backend == "redis":
        from tokenwire.limits.redis import RedisRateLimiter

        return RedisRateLimiter(
            config.redis_url,
            prefix=config.redis_prefix,
            window_s=config.window_s,
            auth_failures_per_window=config.auth_failures_per_window,
        )
    return MemoryRateLimiter(
        window_s=config.window_s, auth_failures_per_window=config.auth_failures_per_window
    )


def make_stream_store(settings: Settings) -> StreamStore:
    """The configured resumable-stream backend."""
    server = settings.server
    if server.stream_backend == "redis":
        from tokenwire.streams.redis_store import RedisStreamStore

        return RedisStreamStore(
            settings.limits.redis_url,
            prefix=settings.limits.redis_prefix,
            grace_s=server.stream_grace_s,
            retention_s=server.stream_retention_s,
            max_finished=server.stream_max_finished,
            max_events=server.stream_max_events,
            max_events_per_stream=server.stream_max_events_per_stream,
        )
    return MemoryStreamStore(
        retention_s=server.stream_retention_s,
        max_finished=server.stream_max_finished,
        max_events=server.stream_max_events,
        max_events_per_stream=server.stream_max_events_per_stream,
    )


async def close_state(state: AppState) -> None:
    """Cancel live generations, close providers and the database."""
    await state.monitor.aclose()
    await state.metrics.aclose()
    await state.completions.shutdown()
    await state.completions.streams.aclose()
    await state.registry.aclose()
    await state.limiter.aclose()
    await state.tickets.aclose()
    await state.engine.dispose()


_DIRECT_POSTS: dict[str, ASGIApp] = {
    "/v1/chat/completions": chat.completions_endpoint,
    "/v1/responses": responses.responses_endpoint,
    "/v1/messages": messages.create_message_endpoint,
}
"""The completion routes, served without Starlette's router (see :class:`Gateway`)."""
_DIRECT_SOCKETS: dict[str, Callable[[WebSocket], Awaitable[None]]] = {
    "/v1/ws/chat": ws.ws_chat,
    "/v1/responses": responses_ws.ws_responses,
}
"""The WebSocket routes, served without Starlette's router (see :class:`Gateway`)."""


class Gateway:
    """The ASGI app: a direct path for the completion routes, Starlette for the rest.

    The completion routes carry nearly all traffic, one ASGI ``send`` per token. Starlette's
    router and its two exception middlewares wrap every ``send`` in three more Python calls;
    routing those paths here, with their own error handling, cut the gateway's CPU per
    request by about a fifth in a profile (docs/performance.md). Everything else, the
    lifespan included, goes through Starlette unchanged.
    """

    def __init__(
        self,
        app: Starlette,
        trusted_proxies: list[str] | None = None,
        *,
        metrics_port: int | None = None,
        drain_state: Drain | None = None,
    ) -> None:
        self.app = app
        self.state = app.state
        self._metrics_port = metrics_port  # connections to it get GET /metrics only, no key
        self.drain = drain_state or Drain()  # the lifespan hands it to the AppState
        # The one place that decides the client's address: X-Forwarded-For (and -Proto) are
        # believed only from a peer in server.trusted_proxies (uvicorn's own rewrite is off,
        # see server_options), so nobody else can pick the address the auth throttle counts.
        self._proxied: Any = None
        if trusted_proxies:
            route: Any = self._route  # uvicorn types ASGI apps more narrowly than Starlette
            self._proxied = ProxyHeadersMiddleware(route, trusted_hosts=trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.drain.draining and scope["type"] == "http" and scope["path"] not in PROBE_PATHS:
            # A request on a connection still open during a drain: 503, and the connection
            # closes, so the client's retry opens a new one (to another instance).
            await error_response(refusal(), {"Connection": "close"})(scope, receive, send)
            return
        if self._proxied is not None:
            await self._proxied(scope, receive, send)
        else:
            await self._route(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._metrics_port is not None and _local_port(scope) == self._metrics_port:
            await self._metrics_listener(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = _DIRECT_POSTS.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self.app
                await endpoint(scope, receive, send)
                return
        if scope["type"] == "websocket":
            # Direct too: a socket's task lives as long as the socket, and Starlette's router
            # and middlewares would keep five more coroutine frames alive per idle socket.
            socket = _DIRECT_SOCKETS.get(scope["path"])
            if socket is not None:
                scope["app"] = self.app
                await socket(WebSocket(scope, receive, send))
                return
        await self.app(scope, receive, send)

    @property
    def metrics_port(self) -> int | None:
        """The metrics listener's port (it stays open while the process drains)."""
        return self._metrics_port

    async def drain_before_exit(
        self, *, reason: DrainReason, timeout_s: float, forced: Callable[[], bool]
    ) -> int:
        """Drain the running app (tokenwire.drain); the number of streams the timeout ended.

        Called by :class:`tokenwire.server.DrainingServer` once it stopped accepting
        connections; a no-op before the app started.
        """
        state = getattr(self.state, "tw", None)
        if not isinstance(state, AppState):
            return 0
        return await run_drain(state, reason=reason, timeout_s=timeout_s, forced=forced)

    async def _metrics_listener(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The metrics listener: ``GET /metrics`` without a key, and nothing else."""
        if scope["type"] == "http" and scope["path"] == "/metrics" and scope["method"] == "GET":
            response = await metrics.metrics_response(Request(scope, receive), self.state.tw)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # refuses the handshake
            return
        else:
            response = error_response(
                NotFound("The metrics listener serves GET /metrics only.", code="not_found")
            )
        await response(scope, receive, send)


def _local_port(scope: Scope) -> int | None:
    """The port of the listener a connection came in on (None for a Unix socket)."""
    server = scope.get("server")
    return None if not server or server[1] is None else int(server[1])


def create_app(
    settings: Settings,
    env: Mapping[str, str] | None = None,
    *,
    on_started: Callable[[], None] | None = None,
) -> Gateway:
    """The tokenwire ASGI app for ``settings``; ``on_started`` runs once it is ready to serve."""

    drain_state = Drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = await build_state(settings, env, drain_state)
        app.state.tw = state
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await close_state(state)

    routes = [
        Route("/v1/chat/completions", chat.create_completion, methods=["POST"]),
        Route("/v1/chat/completions/{stream_id}/stream", streams.resume_stream, methods=["GET"]),
        Route("/v1/chat/completions/{stream_id}/cancel", streams.cancel_stream, methods=["POST"]),
        Route("/v1/messages", messages.create_message_endpoint, methods=["POST"]),
        Route(
            "/v1/messages/{message_id}/stream",
            messages.resume_message_endpoint,
            methods=["GET"],
        ),
        Route("/v1/responses", responses.create_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", responses.get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", responses.delete_response, methods=["DELETE"]),
        Route("/v1/models", models.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", models.get_model, methods=["GET"]),
        WebSocketRoute("/v1/ws/chat", ws.ws_chat),
        WebSocketRoute("/v1/responses", responses_ws.ws_responses),
        Route("/v1/ws/tickets", tickets.create_ticket, methods=["POST"]),
        Route("/v1/usage", usage.get_usage, methods=["GET"]),
        Route("/v1/key", key.get_own_key, methods=["GET"]),
        Route("/v1/admin/keys", admin.create_key, methods=["POST"]),
        Route("/v1/admin/keys", admin.list_keys, methods=["GET"]),
        Route("/v1/admin/keys/{key_id}", admin.get_key, methods=["GET"]),
        Route("/v1/admin/keys/{key_id}", admin.update_key, methods=["PATCH"]),
        Route("/v1/admin/keys/{key_id}/revoke", admin.revoke_key, methods=["POST"]),
        Route("/v1/admin/keys/{key_id}/rotate", admin.rotate_key, methods=["POST"]),
        Route("/v1/admin/keys/{key_id}/topup", admin.topup_key, methods=["POST"]),
        Route("/v1/admin/usage", admin.usage_report, methods=["GET"]),
        Route("/v1/admin/runtime", admin.runtime, methods=["GET"]),
        Route("/v1/billing/webhook", webhooks.webhook_endpoint(env), methods=["POST"]),
        Route("/v1/signup", signup.signup, methods=["POST"]),
        Route("/healthz", health.healthz, methods=["GET"]),
        Route("/readyz", health.readyz, methods=["GET"]),
        Route("/metrics", metrics.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
        *web_routes(),  # the pages /, /usage, /admin and /static/… (tokenwire.web)
    ]
    starlette = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            GatewayError: handle_gateway_error,
            HTTPException: handle_http_exception,
            sa.exc.DBAPIError: handle_database_error,
            sa.exc.TimeoutError: handle_database_error,
            Exception: handle_unexpected,
        },
    )
    server = settings.server
    return Gateway(
        starlette,
        server.trusted_proxies,
        metrics_port=server.metrics_port,
        drain_state=drain_state,
    )


def app_from_env() -> Gateway:
    """An app configured from ``TOKENWIRE_*`` variables, for any ASGI server's factory mode.

    For example ``uvicorn --factory tokenwire.app:app_from_env`` or
    ``granian --interface asgi --factory tokenwire.app:app_from_env``.
    """
    return create_app(load_settings())


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn options that follow from the settings (used by ``serve`` and tests alike)."""
    server = settings.server
    http, ws = server_protocols(server)  # httptools and websockets-sansio, with guards
    return {
        "loop": "uvloop",
        "http": http,
        "ws": ws,
        "ws_max_size": server.ws_max_message_bytes,
        "ws_ping_interval": server.ws_ping_interval_s,
        "ws_ping_timeout": server.ws_ping_interval_s,
        "ws_per_message_deflate": server.ws_per_message_deflate,
        "backlog": 4096,
        "proxy_headers": False,  # the app reads forwarding headers itself (Gateway)
        "timeout_keep_alive": 75,  # longer than clients' pools keep idle connections
        # After a drain (tokenwire.server) only finished responses and closing sockets are
        # left; a bare uvicorn (app_from_env) gets no drain, just this wait.
        "timeout_graceful_shutdown": 3,
    }
