"""Starting and settling completions: admission → provider → Generation → ledger, once.

Both transports (SSE and WebSocket) and the JSON path call :meth:`CompletionService.start`;
it is the one place where a validated request becomes a generation:

1. the model resolves to a provider (404 / 503), the key may use it (403) and the request's
   ``max_tokens`` fits the model (400);
2. the rate limiter admits it (429 with ``Retry-After``), reserving its estimated tokens and a
   stream slot;
3. the ledger reserves the most its charge can be from the key's credits (402), at the key's
   plan's prices: a prompt bound that no upstream count exceeds, and the admitted output
   limit (``accounting/budget.py``), in a transaction shared with the reservations asked for
   meanwhile (``accounting/reserver.py``);
4. the generation starts. When it ends, however it ends and whoever was reading, it first
   releases the limits (the stream slot is free and the token bucket corrected before the
   client sees the end), then settles money: one ledger row with the cost (the model's
   upstream prices) and the charge (the plan's), the reservation returned less the charge.

Billing policy: a completion is billed for the tokens the upstream reports (or, when it
reports none, the upstream's early prompt count or our estimate plus the deltas received,
marked ``usage_estimated``); one cancelled by the client or by a disconnect is billed for the
prompt and the tokens generated until then; one that failed upstream before its first token
costs nothing. The charge never exceeds the reservation, so a balance never goes below zero.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from tokenwire.accounting.budget import (
    completion_budget,
    estimate_prompt_tokens,
    output_limit,
    prompt_token_bound,
)
from tokenwire.accounting.keys import KeyRecord
from tokenwire.accounting.ledger import Ledger, LedgerRow, Reservation
from tokenwire.accounting.plans import PlanBook
from tokenwire.accounting.pricing import amount_micro, worst_case_micro
from tokenwire.accounting.reserver import Reserver
from tokenwire.accounting.writer import LedgerWriter
from tokenwire.config import ModelEntry, Plan, Price
from tokenwire.drain import interrupted
from tokenwire.errors import GatewayError, LimiterUnavailable, PermissionDenied
from tokenwire.limits.base import Admission, LimitSpec, RateLimiter
from tokenwire.observability.logs import log_completion, log_refusal
from tokenwire.observability.metrics import Metrics
from tokenwire.observability.outcomes import completion_record, refusal_of
from tokenwire.observability.records import Api, Refusal, Transport
from tokenwire.providers.base import ProviderCall
from tokenwire.providers.registry import ProviderRegistry
from tokenwire.streams.events import Event, Usage
from tokenwire.streams.generation import Generation, GenerationState
from tokenwire.streams.memory_store import MemoryStreamStore
from tokenwire.streams.source import StreamSource
from tokenwire.streams.store import StreamStore
from tokenwire.wire.schema import ChatRequest

log = logging.getLogger("tokenwire.completions")
SettledHook = Callable[[Generation], Awaitable[None]]

_ID_PREFIXES: dict[str, str] = {"chat": "chatcmpl-", "responses": "resp_", "messages": "msg_"}


def new_completion_id(api: Api = "chat") -> str:
    """A fresh id in the API's style (``chatcmpl-…``, ``resp_…``, ``msg_…``), also the stream id."""
    return _ID_PREFIXES[api] + secrets.token_urlsafe(18)


@dataclass(frozen=True, slots=True)
class _Context:
    """What settling a generation needs to know about how it was admitted."""

    key_id: str
    entry: ModelEntry
    transport: Transport
    spec: LimitSpec
    admission: Admission
    plan: Plan  # the key's price list
    price: Price  # what it charges for this model
    reserved_micro: int | None  # None: nothing to charge, nothing was reserved
    client: str
    api: Api
    on_settled: SettledHook | None  # the API's own record (a stored response), after money
    max_output: int
    prompt_estimate: int


def ledger_status(generation: Generation) -> str:
    """The ledger's status for a finished generation."""
    if generation.interrupted:
        return "shutdown"
    if generation.state is GenerationState.FAILED:
        return "upstream_error"
    if generation.state is GenerationState.CANCELLED:
        if generation.cancel_cause == "client_disconnected":
            return "client_disconnected"
        return "cancelled"
    return "completed"


def ledger_transport(transport: Transport) -> str:
    """The ledger's transport: ``sse``, ``ws`` (both WebSocket modes) or ``json``."""
    return "ws" if transport == "ws-envelope" else transport


class CompletionService:
    """Admits requests, creates generations, settles them, keeps the live ones."""

    def __init__(
        self,
        registry: ProviderRegistry,
        *,
        limiter: RateLimiter,
        ledger: Ledger,
        disconnect_grace_s: float,
        default_max_tokens: int,
        streams: StreamStore | None = None,
        stream_grace_s: float = 30.0,
        writer: LedgerWriter | None = None,
        metrics: Metrics | None = None,
        plans: PlanBook | None = None,
    ) -> None:
        self._registry = registry
        self._plans = plans or PlanBook.at_cost()
        self.metrics = metrics or Metrics()
        self._limiter = limiter
        self._ledger = ledger
        self._writer = writer or LedgerWriter(ledger)
        self._reserver = Reserver(ledger)
        self._grace_s = disconnect_grace_s
        self._default_max_tokens = default_max_tokens
        self.live: dict[str, Generation] = {}
        self.streams: StreamStore = streams or MemoryStreamStore()
        self._stream_grace_s = stream_grace_s

    @property
    def plans(self) -> PlanBook:
        """The price lists keys are charged by."""
        return self._plans

    @property
    def writer(self) -> LedgerWriter:
        """The process's ledger writer (its outbox holds rows the database refused)."""
        return self._writer

    async def start(
        self,
        key: KeyRecord,
        request: ChatRequest,
        raw_body: dict[str, Any],
        transport: Transport,
        *,
        resumable: bool = False,
        idempotency: tuple[str, str] | None = None,
        client: str = "",
        api: Api = "chat",
        on_settled: SettledHook | None = None,
        include_cost: bool = False,
    ) -> StreamSource:
        """Admit and start a completion; raises before anything runs when it may not.

        A request with ``idempotency`` (Idempotency-Key, body digest) that matches an earlier
        one of the same key returns that stream (nothing new is admitted or billed), possibly
        one another gateway process runs; with another body it is a 409. Resumable
        generations (``resumable`` or ``idempotency``) survive their readers for
        ``stream_grace_s`` and are kept for resuming. ``api`` names the client API (the id's
        style and the ledger's ``api``); ``on_settled`` runs once after the ledger row is
        written, before the generation leaves ``live`` (a failure is logged). ``client`` (the
        caller's address) goes to the completion's log line. With ``include_cost`` the final
        usage carries the charge (``cost_micro``).
        """
        completion_id = new_completion_id(api)
        admit = _Admit(
            key, request, raw_body, transport, completion_id, client, api, on_settled, include_cost
        )
        if idempotency is None:
            return await self._start(admit, resumable)
        idempotency_key, digest = idempotency
        earlier = await self.streams.claim(key.id, idempotency_key, digest, completion_id)
        if earlier is not None:
            self.metrics.resumed(transport)
            return earlier
        try:
            return await self._start(admit, True, idempotency_key)
        except BaseException:
            await self.streams.release(key.id, idempotency_key, completion_id)
            raise

    async def resume(
        self, stream_id: str, key_id: str, after: int, transport: Transport
    ) -> StreamSource:
        """A resumable stream of ``key_id`` to read after event ``after`` (``streams.get``)."""
        stream = await self.streams.get(stream_id, key_id, after)
        self.metrics.resumed(transport)
        return stream

    async def _start(
        self, admit: _Admit, resumable: bool, idempotency_key: str | None = None
    ) -> Generation:
        context, events = await self._admit(admit)
        request, entry = admit.request, context.entry
        generation = Generation(
            completion_id=admit.completion_id,
            model=entry.id,
            events=events,
            prompt_tokens_estimate=context.prompt_estimate,
            disconnect_grace_s=self._stream_grace_s if resumable else self._grace_s,
            on_end=partial(self._on_end, context),
            on_settle=partial(self._settle, context),
            key_id=context.key_id,
            include_usage=request.include_usage,
            completion_limit=context.max_output,
            limit_for_prompt=(
                None
                if context.reserved_micro is None
                else partial(completion_budget, context.price, context.reserved_micro)
            ),
            price=partial(self._charge, context) if admit.include_cost else None,
        )
        generation.response_headers = context.admission.headers
        self.live[generation.id] = generation
        self.metrics.stream_opened(admit.transport)  # closed by _settle, which always runs
        try:
            if resumable:
                await self.streams.add(generation, idempotency_key)
        except BaseException:  # the client left meanwhile: end it like any disconnect
            generation.start()  # started all the same, so that it settles once and leaves
            generation.cancel("client_disconnected")
            raise
        generation.start()
        return generation

    async def _admit(self, admit: _Admit) -> tuple[_Context, AsyncIterator[Event]]:
        """Resolve, check, admit and reserve, or raise (a refusal is counted and logged)."""
        try:
            return await self._admission(admit)
        except GatewayError as exc:
            self._refused(admit, exc)
            raise

    async def _admission(self, admit: _Admit) -> tuple[_Context, AsyncIterator[Event]]:
        key, request, completion_id = admit.key, admit.request, admit.completion_id
        provider, entry = self._registry.resolve(request.model)
        if not key.may_use(entry.id):
            raise PermissionDenied(
                f"This API key may not use the model {entry.id!r}.",
                param="model",
                code="model_not_allowed",
            )
        plan = self._plans.plan(key.plan)
        price = plan.price(entry)
        max_output = output_limit(request, entry, self._default_max_tokens)
        prompt_estimate = estimate_prompt_tokens(request)
        call = ProviderCall(
            request=request,
            upstream_model=entry.upstream_model,
            raw_body=admit.raw_body,
            max_output_tokens=max_output,
        )
        # Made before anything is held: nothing runs until the generation pulls it, and
        # whatever a provider does while building it cannot leave a slot or credit behind.
        events = provider.stream(call)
        spec = LimitSpec(key.rpm, key.tpm, key.max_concurrent_streams)
        admission = await self._limiter.admit(
            key.id, spec, prompt_estimate + max_output, completion_id
        )
        reserved: int | None = None
        try:
            if not price.free:
                prompt_bound = prompt_token_bound(request, entry.context_tokens)
                reserved = worst_case_micro(price, prompt_bound, max_output)
                await self._reserver.reserve(
                    Reservation(
                        key.id,
                        completion_id,
                        reserved,
                        entry.id,
                        entry.provider,
                        ledger_transport(admit.transport),
                        admit.api,
                    )
                )
        except BaseException:
            await self._release_limits(admission, spec, 0, completion_id)
            raise
        context = _Context(
            key_id=key.id,
            entry=entry,
            transport=admit.transport,
            spec=spec,
            admission=admission,
            plan=plan,
            price=price,
            reserved_micro=reserved,
            client=admit.client,
            api=admit.api,
            on_settled=admit.on_settled,
            max_output=max_output,
            prompt_estimate=prompt_estimate,
        )
        return context, events

    def _refused(self, admit: _Admit, error: GatewayError) -> None:
        """Count and log a refusal of a model in the catalog (an unknown model's name is the
        client's to choose: no series is made for it)."""
        entry = self._registry.models.get(admit.request.model)
        if entry is None:
            return
        outcome, reason = refusal_of(error)
        refusal = Refusal(
            key_id=admit.key.id,
            model=entry.id,
            provider=entry.provider,
            transport=admit.transport,
            api=admit.api,
            outcome=outcome,
            reason=reason,
            error_code=error.code,
            error_status=error.http_status,
            client=admit.client,
        )
        self.metrics.refusal(refusal)
        log_refusal(refusal)

    async def _release_limits(
        self, admission: Admission, spec: LimitSpec, tokens: int, completion_id: str
    ) -> None:
        """Free the stream slot and correct the token bucket; a failure is logged, not raised.

        A slot that cannot be released now (the limiter's store is down) still frees itself:
        the Redis backend sends the release again, and its slots are leases that expire unless
        their process renews them. That backend logs its failures once per batch, not here.
        """
        try:
            await self._limiter.release(admission, spec, tokens)
        except LimiterUnavailable:
            pass  # logged by the limiter, once for all the calls of its failed round trip
        except Exception:  # noqa: BLE001 - logged; a Redis slot's lease runs out on its own
            _release_failed(completion_id)

    def _on_end(self, context: _Context, generation: Generation) -> Awaitable[None] | None:
        """Release the limits: at once when the limiter can (in process), else a round trip
        to await (the generation awaits it, bounded, before readers see the end)."""
        usage = generation.usage
        tokens = 0 if usage is None else usage.total_tokens
        admission, spec = context.admission, context.spec
        try:
            if self._limiter.release_nowait(admission, spec, tokens):
                return None
        except Exception:  # noqa: BLE001 - logged (a bug: the in-process slot stays held)
            _release_failed(generation.id)
            return None
        return self._release_limits(admission, spec, tokens, generation.id)

    async def _settle(self, context: _Context, generation: Generation) -> None:
        try:
            row = self._row(context, generation)
            record = completion_record(
                generation,
                row,
                key_id=context.key_id,
                transport=context.transport,
                api=context.api,
                client=context.client,
            )
            self.metrics.completion(record)
            log_completion(record)
            await self._writer.settle(row, reserved=context.reserved_micro is not None)
            if context.on_settled is not None:
                try:
                    await context.on_settled(generation)
                except Exception:  # logged; the money is settled either way
                    log.exception(
                        "recording %s after it settled failed",
                        generation.id,
                        extra={"fields": {"completion_id": generation.id}},
                    )
        finally:
            self.metrics.stream_closed(context.transport)
            self.streams.finished(generation)
            self.live.pop(generation.id, None)  # last: an empty ``live`` means all is written

    @staticmethod
    def _charge(context: _Context, usage: Usage) -> int:
        """What a completion that produced output is charged for ``usage``: its plan's price,
        never more than was reserved. The ledger row and the reported charge both use it."""
        charge = amount_micro(context.price, usage)
        if context.reserved_micro is not None:
            charge = min(charge, context.reserved_micro)
        return charge

    def _row(self, context: _Context, generation: Generation) -> LedgerRow:
        """The completion's ledger row: what it used, what it cost and what it is charged."""
        usage = generation.usage
        assert usage is not None
        failed_before_output = generation.state is GenerationState.FAILED and (
            generation.first_token_at is None
        )
        cost = charge = 0
        if not failed_before_output:
            cost = amount_micro(context.entry.cost, usage)
            charge = self._charge(context, usage)
        ended = generation.ended_at or time.perf_counter()
        return LedgerRow(
            completion_id=generation.id,
            key_id=context.key_id,
            model=context.entry.id,
            provider=generation.provider or context.entry.provider,
            transport=ledger_transport(context.transport),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            usage_estimated=usage.estimated,
            cache_write_tokens=usage.cache_write_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cost_micro=cost,
            charge_micro=charge,
            plan=context.plan.name,
            ttft_ms=(
                None
                if generation.first_token_at is None
                else round((generation.first_token_at - generation.started_at) * 1000)
            ),
            duration_ms=round((ended - generation.started_at) * 1000),
            finish_reason=generation.finish_reason,
            status=ledger_status(generation),
            created_at=int(time.time() * 1000),
            api=context.api,
        )

    def interrupt_all(self) -> int:
        """End every running generation with the in-band ``server_shutting_down`` error (a
        drain's timeout, or the shutdown itself); the number ended. Each says whether its
        events can be read again on another gateway process."""
        running = [g for g in self.live.values() if not g.finished]
        for generation in running:
            readable_s = self.streams.readable_elsewhere_s(generation)
            generation.interrupt(
                interrupted(
                    generation.id,
                    generation.log.last_seq,
                    resumable=readable_s is not None,
                    retention_s=readable_s or 0.0,
                )
            )
        return len(running)

    async def shutdown(self) -> None:
        """End every live generation, wait for them to settle (and reservations given back),
        flush the ledger writer."""
        pending = list(self.live.values())
        self.interrupt_all()
        await asyncio.gather(*(g.wait_settled() for g in pending))
        await self._reserver.aclose()
        await self._writer.aclose()


@dataclass(frozen=True, slots=True)
class _Admit:
    """One request on its way through admission."""

    key: KeyRecord
    request: ChatRequest
    raw_body: dict[str, Any]
    transport: Transport
    completion_id: str
    client: str
    api: Api
    on_settled: SettledHook | None
    include_cost: bool = False  # the final usage carries the charge


def _release_failed(completion_id: str) -> None:
    """Log the exception being handled: a completion's limits could not be released."""
    log.exception(
        "could not release the rate limits of %s",
        completion_id,
        extra={"fields": {"completion_id": completion_id}},
    )
