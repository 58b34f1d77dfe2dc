"""What one completion was, or why one was refused: built once, read by metrics and the log.

A :class:`CompletionRecord` is made when a generation settles (never per token) from the
generation's own timestamps and counts; a :class:`Refusal` when admission says no after the
model is known. Neither holds an API key, only its id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from tokenwire.streams.events import AttemptFailed, Routed

Transport = Literal["sse", "ws", "ws-envelope", "json"]
TRANSPORTS: tuple[Transport, ...] = get_args(Transport)
Api = Literal["chat", "responses", "messages"]
"""The client API a completion was asked through (the ledger's ``api``, a metrics label)."""
Outcome = Literal[
    "completed",
    "cancelled",
    "client_disconnected",
    "shutdown",
    "upstream_error",
    "internal_error",
]
RefusalOutcome = Literal["rate_limited", "insufficient_quota", "rejected", "unavailable"]
LimitReason = Literal[
    "requests",
    "tokens",
    "request_too_large",
    "streams",
    "credits",
    "auth_failures",
    "socket_requests",
]
LIMIT_REASONS: tuple[LimitReason, ...] = get_args(LimitReason)


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """One finished completion, as metrics and the completion log line see it."""

    completion_id: str
    key_id: str
    model: str
    provider: str
    transport: Transport
    api: Api
    outcome: Outcome
    finish_reason: str | None
    error_code: str | None
    error_status: int | None
    ttft_s: float | None  # admission to the first delta; None without one
    itl_s: float | None  # mean time between deltas; None with fewer than two
    duration_s: float
    prompt_tokens: int
    completion_tokens: int
    usage_estimated: bool
    cost_micro: int  # what the upstream charges the operator (the model's prices)
    charge_micro: int  # what the key was charged (its plan's prices)
    client: str
    attempts: tuple[Routed | AttemptFailed, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request refused after its model was known (limits, credits, permissions, a store down)."""

    key_id: str
    model: str
    provider: str
    transport: Transport
    api: Api
    outcome: RefusalOutcome
    reason: LimitReason | None  # which limit, for rate limits and credits
    error_code: str | None
    error_status: int
    client: str
