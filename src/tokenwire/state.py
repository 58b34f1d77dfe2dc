"""``AppState``: what request handlers share, built once per app (never a module global)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import HTTPConnection

from tokenwire.accounting.keys import KeyStore
from tokenwire.accounting.ledger import Ledger
from tokenwire.accounting.tickets import TicketStore
from tokenwire.completions import CompletionService
from tokenwire.config import Settings
from tokenwire.drain import Drain
from tokenwire.limits.base import RateLimiter
from tokenwire.monitor import HealthMonitor
from tokenwire.observability.metrics import Metrics
from tokenwire.providers.registry import ProviderRegistry
from tokenwire.responses import ResponsesService


@dataclass
class AppState:
    """Everything a request handler needs, built once per app in the lifespan."""

    settings: Settings
    engine: AsyncEngine
    keys: KeyStore
    registry: ProviderRegistry
    completions: CompletionService
    tickets: TicketStore
    ledger: Ledger
    limiter: RateLimiter
    monitor: HealthMonitor
    responses: ResponsesService
    metrics: Metrics  # this app's Prometheus series (the same object CompletionService observes)
    drain: Drain


def get_state(connection: HTTPConnection) -> AppState:
    """The app state of the app serving ``connection``."""
    state = connection.app.state.tw
    assert isinstance(state, AppState)
    return state
