"""Prometheus metrics: the app's own registry, observed once per completion, never per token.

:class:`Metrics` is built by the app (``build_state``) and kept on ``AppState``; nothing is
registered on ``prometheus_client``'s global default registry, so two apps in one process
(tests) count separately. Every series is labelled by bounded values only: the model and
provider from the catalog, the transport, an outcome or reason from a fixed list; never by
API key (``GET /v1/usage`` is the per-key view). docs/operations.md lists every series.

Cost on the request path: a completion's series are observed once, when it settles, from the
generation's own timestamps (TTFT, the mean inter-token gap, the duration); label children
are looked up once per label combination and kept. Values read from elsewhere (the ledger
writer's queue and failures, each deployment's circuit) are sampled when scraped.

**Several processes on one port.** When ``PROMETHEUS_MULTIPROC_DIR`` is set (before the
process starts: ``prometheus_client`` reads it on import), values live in that directory's
memory-mapped files, one set per process, and a scrape of any process merges all of them
(``MultiProcessCollector``). Gauges of things a process holds (open streams, queue depth) sum
over live processes (``livesum``); a circuit's state is the worst any live process sees
(``livemax``); the supervisor calls ``prometheus_client.multiprocess.mark_process_dead`` for
a worker that exits. Sampled values are refreshed every ``SAMPLE_INTERVAL_S`` in each
process, and at once in the process that answers the scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    values,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from tokenwire.config import ConfigError, deployment_name
from tokenwire.observability.records import (
    LIMIT_REASONS,
    TRANSPORTS,
    CompletionRecord,
    LimitReason,
    Refusal,
    Transport,
)
from tokenwire.streams.events import AttemptFailed, Routed

log = logging.getLogger("tokenwire.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SAMPLE_INTERVAL_S = 5.0
"""How often each process writes its sampled values in multiprocess mode."""

# TTFT and inter-token gaps: 5 ms (a fast upstream's token gap) to 60 s (a queued reasoning
# model's first token); denser where streaming lives (10 ms to 1 s).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
)  # fmt: skip
# Whole completions run longer: 2,000 tokens at 20 ms is 40 s, 8,000 is nearly 3 minutes.
DURATION_BUCKETS = (*LATENCY_BUCKETS, 90.0, 120.0, 180.0, 300.0, 600.0)
WEBSOCKET_MODES = ("pending", "compatible", "envelope")


@dataclass(frozen=True, slots=True)
class RuntimeSample:
    """Values owned elsewhere, read when sampled (see :class:`Metrics`)."""

    ledger_queued: int
    ledger_held: int
    ledger_outbox_files: int
    ledger_write_failures: int
    circuits: dict[str, int]  # deployment name -> 0 closed, 1 half-open, 2 open


Sampler = Callable[[], RuntimeSample]


class _Series:
    """The label children of one (model, provider, transport), looked up once."""

    __slots__ = ("charge", "completion_tokens", "cost", "itl", "prompt_tokens", "ttft")

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str]) -> None:
        self.ttft = metrics.ttft.labels(*labels)
        self.itl = metrics.inter_token.labels(*labels)
        self.prompt_tokens = metrics.prompt_tokens.labels(*labels)
        self.completion_tokens = metrics.completion_tokens.labels(*labels)
        self.cost = metrics.cost.labels(*labels)
        self.charge = metrics.charge.labels(*labels)


class Metrics:
    """Every tokenwire series, on a registry of this app's own."""

    def __init__(self, *, multiprocess_dir: str | None = None, sampler: Sampler | None = None):
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            _check_multiprocess(multiprocess_dir)
        self.registry = CollectorRegistry(auto_describe=True)
        # In multiprocess mode the values go to files and a scrape reads them all back, so
        # nothing is registered (it would be counted twice).
        registry = None if multiprocess_dir is not None else self.registry
        per_model = ("model", "provider", "transport")
        self.requests = Counter(
            "tokenwire_requests_total",
            "Chat completion requests that reached a model: settled completions and refusals.",
            ("model", "provider", "transport", "api", "outcome"),
            registry=registry,
        )
        self.ttft = Histogram(
            "tokenwire_ttft_seconds",
            "Time from admission to the first token from the upstream.",
            per_model,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "tokenwire_inter_token_seconds",
            "Mean time between tokens of one completion (one observation per completion).",
            per_model,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "tokenwire_request_duration_seconds",
            "Time from admission to the end of the completion.",
            (*per_model, "outcome"),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "tokenwire_prompt_tokens_total", "Prompt tokens billed.", per_model, registry=registry
        )
        self.completion_tokens = Counter(
            "tokenwire_completion_tokens_total",
            "Completion tokens billed.",
            per_model,
            registry=registry,
        )
        self.cost = Counter(
            "tokenwire_cost_microdollars_total",
            "What completions cost the operator upstream (the models' prices), in "
            "micro-dollars (1e-6 USD).",
            per_model,
            registry=registry,
        )
        self.charge = Counter(
            "tokenwire_charge_microdollars_total",
            "What keys were charged for completions (their plans' prices), in micro-dollars.",
            per_model,
            registry=registry,
        )
        self.open_streams = Gauge(
            "tokenwire_open_streams",
            "Completions being generated now, by the transport that started them.",
            ("transport",),
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.open_websockets = Gauge(
            "tokenwire_open_websockets",
            "Open WebSocket sessions, by the mode of their first request (pending: none yet).",
            ("mode",),
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.upstream_attempts = Counter(
            "tokenwire_upstream_attempts_total",
            "Upstream attempts before the first token, by how they ended (ok: it streamed).",
            ("provider", "deployment", "outcome"),
            registry=registry,
        )
        self.retries = Counter(
            "tokenwire_retries_total",
            "Upstream attempts after a failed one, by the deployment tried.",
            ("provider", "deployment"),
            registry=registry,
        )
        self.fallbacks = Counter(
            "tokenwire_fallbacks_total",
            "Retries that moved to another deployment of the model.",
            ("model",),
            registry=registry,
        )
        self.circuit_state = Gauge(
            "tokenwire_circuit_state",
            "Each deployment's circuit: 0 closed, 1 half-open, 2 open (cooling down).",
            ("deployment",),
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.limit_refusals = Counter(
            "tokenwire_limit_refusals_total",
            "Requests refused by a limit, by which one.",
            ("reason",),
            registry=registry,
        )
        self.resumes = Counter(
            "tokenwire_resumes_total",
            "Streams resumed (cursor or Idempotency-Key), by transport.",
            ("transport",),
            registry=registry,
        )
        self.ledger_queue_depth = Gauge(
            "tokenwire_ledger_queue_depth",
            "Ledger rows waiting for the writer.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.ledger_held_rows = Gauge(
            "tokenwire_ledger_held_rows",
            "Ledger rows the database and the outbox refused, kept in memory only.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.ledger_outbox_files = Gauge(
            "tokenwire_ledger_outbox_files",
            "Outbox files of ledger rows waiting for the database to be replayed.",
            multiprocess_mode="livemax",  # processes of one data dir see the same files
            registry=registry,
        )
        self.ledger_write_failures = Counter(
            "tokenwire_ledger_write_failures_total",
            "Ledger batch writes the database refused (each attempt).",
            registry=registry,
        )
        if registry is not None:
            ProcessCollector(registry=registry)  # CPU, memory, descriptors of this process
        self._sampler = sampler
        self._failures_seen = 0
        self._circuits_seen: set[str] = set()
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._outcomes: dict[tuple[str, str, str, str, str], tuple[Counter, Histogram]] = {}
        # (provider, upstream model, outcome) -> (deployment, its attempts counter)
        self._attempt_series: dict[tuple[str, str, str], tuple[str, Counter]] = {}
        self._sampling: asyncio.Task[None] | None = None
        for transport in TRANSPORTS:  # the fixed label sets exist from the start, at zero
            self.open_streams.labels(transport)
            self.resumes.labels(transport)
        for mode in WEBSOCKET_MODES:
            self.open_websockets.labels(mode)
        for reason in LIMIT_REASONS:
            self.limit_refusals.labels(reason)

    @classmethod
    def from_environ(cls, sampler: Sampler | None = None) -> Metrics:
        """Multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set, as prometheus_client."""
        return cls(multiprocess_dir=os.environ.get(MULTIPROC_ENV) or None, sampler=sampler)

    # -- observations ------------------------------------------------------------------------

    def completion(self, record: CompletionRecord) -> None:
        """Observe one settled completion (its only observation)."""
        labels = (record.model, record.provider, record.transport)
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series(self, labels)
        key = (*labels, record.api, record.outcome)
        outcome = self._outcomes.get(key)
        if outcome is None:
            requests = self.requests.labels(*key)
            duration = self.duration.labels(*labels, record.outcome)
            outcome = self._outcomes[key] = (requests, duration)
        outcome[0].inc()
        outcome[1].observe(record.duration_s)
        if record.ttft_s is not None:
            series.ttft.observe(record.ttft_s)
        if record.itl_s is not None:
            series.itl.observe(record.itl_s)
        series.prompt_tokens.inc(record.prompt_tokens)
        series.completion_tokens.inc(record.completion_tokens)
        if record.cost_micro:
            series.cost.inc(record.cost_micro)
        if record.charge_micro:
            series.charge.inc(record.charge_micro)
        if record.attempts:
            self._attempts(record.model, record.attempts)

    def _attempts(self, model: str, attempts: Iterable[Routed | AttemptFailed]) -> None:
        """Attempts, retries (every attempt after the first) and fallbacks (a retry on
        another deployment than the attempt before it)."""
        previous: str | None = None
        for attempt in attempts:
            outcome = "ok" if isinstance(attempt, Routed) else attempt.outcome
            key = (attempt.provider, attempt.upstream_model, outcome)
            known = self._attempt_series.get(key)
            if known is None:
                deployment = deployment_name(attempt.provider, attempt.upstream_model)
                counter = self.upstream_attempts.labels(attempt.provider, deployment, outcome)
                known = self._attempt_series[key] = (deployment, counter)
            deployment, counter = known
            counter.inc()
            if previous is not None:
                self.retries.labels(attempt.provider, deployment).inc()
                if deployment != previous:
                    self.fallbacks.labels(model).inc()
            previous = deployment

    def refusal(self, refusal: Refusal) -> None:
        """Count a request refused after its model was known."""
        self.requests.labels(
            refusal.model, refusal.provider, refusal.transport, refusal.api, refusal.outcome
        ).inc()
        if refusal.reason is not None:
            self.limit_refused(refusal.reason)

    def limit_refused(self, reason: LimitReason) -> None:
        """Count one refusal by a limit (also those before a model is known)."""
        self.limit_refusals.labels(reason).inc()

    def resumed(self, transport: Transport) -> None:
        """Count one stream resumed."""
        self.resumes.labels(transport).inc()

    def stream_opened(self, transport: Transport) -> None:
        self.open_streams.labels(transport).inc()

    def stream_closed(self, transport: Transport) -> None:
        self.open_streams.labels(transport).dec()

    def websocket_mode(self, old: str | None, new: str | None) -> None:
        """A session opened (``old`` None), chose its mode, or closed (``new`` None)."""
        if old is not None:
            self.open_websockets.labels(old).dec()
        if new is not None:
            self.open_websockets.labels(new).inc()

    # -- sampled values and scrapes ------------------------------------------------------------

    def sample(self) -> None:
        """Copy the sampled values (ledger writer, circuits) into their series."""
        if self._sampler is None:
            return
        now = self._sampler()
        self.ledger_queue_depth.set(now.ledger_queued)
        self.ledger_held_rows.set(now.ledger_held)
        self.ledger_outbox_files.set(now.ledger_outbox_files)
        if now.ledger_write_failures > self._failures_seen:
            self.ledger_write_failures.inc(now.ledger_write_failures - self._failures_seen)
            self._failures_seen = now.ledger_write_failures
        for name, state in now.circuits.items():
            self.circuit_state.labels(name).set(state)
        for gone in self._circuits_seen - now.circuits.keys():  # a provider was replaced
            with contextlib.suppress(KeyError):
                self.circuit_state.remove(gone)
        self._circuits_seen = set(now.circuits)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """:meth:`sample`, then :meth:`exposition`."""
        self.sample()
        return self.exposition(accept)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """Every series (of every process in multiprocess mode) and its content type, in the
        format the ``Accept`` header asks for: OpenMetrics (what Prometheus asks for) or the
        classic text format (0.0.4). Thread-safe: a scrape may run it off the event loop."""
        encoder, content_type = choose_encoder(accept)
        if self.multiprocess_dir is None:
            return encoder(self.registry), content_type
        merged = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return encoder(merged), content_type

    def start(self) -> None:
        """In multiprocess mode, sample every ``SAMPLE_INTERVAL_S`` (another process may be
        the one scraped)."""
        if self.multiprocess_dir is not None and self._sampler is not None:
            loop = asyncio.get_running_loop()
            self._sampling = loop.create_task(self._sample_periodically(), name="metrics-sampler")

    async def _sample_periodically(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # logged; the next round tries again
                log.exception("sampling the ledger and circuits for /metrics failed")
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    async def aclose(self) -> None:
        if self._sampling is not None:
            self._sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampling
            self._sampling = None


def _check_multiprocess(directory: str) -> None:
    """Refuse a multiprocess setup that would silently count per process."""
    if not os.path.isdir(directory):
        raise ConfigError(f"{MULTIPROC_ENV}={directory!r} is not a directory")
    if not getattr(values.ValueClass, "_multiprocess", False):
        raise ConfigError(
            f"{MULTIPROC_ENV} was set after prometheus_client was imported; set it in the "
            "environment of the process (the workers' supervisor does) so every worker's "
            "metrics are shared"
        )
