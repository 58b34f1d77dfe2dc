"""How a finished completion, or a refused request, is named to metrics and the log.

Built once per completion when it settles (``CompletionService._settle``), never per token.
"""

from __future__ import annotations

import time

from tokenwire.accounting.ledger import LedgerRow
from tokenwire.errors import GatewayError, InsufficientQuota, InternalError
from tokenwire.limits.base import LimitExceeded
from tokenwire.observability.records import (
    Api,
    CompletionRecord,
    LimitReason,
    Outcome,
    RefusalOutcome,
    Transport,
)
from tokenwire.streams.generation import Generation, GenerationState


def completion_outcome(generation: Generation) -> Outcome:
    """How a finished generation ended, for metrics and its log line (finer than the
    ledger's status: a gateway bug and a shutdown are told apart)."""
    if generation.interrupted:  # ended by a drain's timeout (tokenwire.drain)
        return "shutdown"
    if generation.state is GenerationState.FAILED:
        if isinstance(generation.error, InternalError):
            return "internal_error"
        return "upstream_error"
    if generation.state is GenerationState.CANCELLED:
        if generation.cancel_cause == "shutdown":
            return "shutdown"
        if generation.cancel_cause == "client_disconnected":
            return "client_disconnected"
        return "cancelled"
    return "completed"


def refusal_of(error: GatewayError) -> tuple[RefusalOutcome, LimitReason | None]:
    """How metrics and the log name a refusal at admission."""
    if isinstance(error, LimitExceeded):
        return "rate_limited", error.reason
    if isinstance(error, InsufficientQuota):
        return "insufficient_quota", "credits"
    return ("unavailable" if error.http_status >= 500 else "rejected"), None


def completion_record(
    generation: Generation,
    row: LedgerRow,
    *,
    key_id: str,
    transport: Transport,
    api: Api,
    client: str,
) -> CompletionRecord:
    """What metrics and the log know of a settled completion: its ledger row, and timings
    from the generation's own timestamps (TTFT; the mean gap between its first and last
    delta; the whole duration)."""
    started, first, last = (
        generation.started_at,
        generation.first_token_at,
        generation.last_token_at,
    )
    ended = generation.ended_at or time.perf_counter()
    deltas = generation.deltas
    error = generation.error
    return CompletionRecord(
        completion_id=generation.id,
        key_id=key_id,
        model=row.model,
        provider=row.provider,
        transport=transport,
        api=api,
        outcome=completion_outcome(generation),
        finish_reason=generation.finish_reason,
        error_code=None if error is None else error.code,
        error_status=None if error is None else error.http_status,
        ttft_s=None if first is None else first - started,
        itl_s=(
            None if first is None or last is None or deltas < 2 else (last - first) / (deltas - 1)
        ),
        duration_s=ended - started,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        usage_estimated=row.usage_estimated,
        cost_micro=row.cost_micro,
        charge_micro=row.charge_micro,
        client=client,
        attempts=tuple(generation.attempts),
    )
