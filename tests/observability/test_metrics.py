"""The Metrics object alone: what one completion, refusal or resume adds to each series, the
sampled values, a registry per app, and the multiprocess mode's guard and files (two real
processes writing to one directory, a third one scraping)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.multiprocess import mark_process_dead

from tokenwire.config import ConfigError
from tokenwire.observability.metrics import LATENCY_BUCKETS, Metrics, RuntimeSample
from tokenwire.observability.records import LIMIT_REASONS, CompletionRecord, Refusal
from tokenwire.streams.events import AttemptFailed, Routed
from tokenwire.testing import Scrape

RecordFactory = Callable[..., CompletionRecord]  # the ``completion`` fixture (conftest.py)


def scrape(metrics: Metrics) -> Scrape:
    return Scrape.parse(metrics.render()[0].decode())


def test_one_completion_is_one_observation_in_each_series(completion: RecordFactory) -> None:
    """Requests, TTFT, ITL, duration, tokens and cost each change once, by the record's values."""
    metrics = Metrics()
    metrics.completion(completion())
    metrics.completion(completion(transport="ws", outcome="client_disconnected", ttft_s=None))
    s = scrape(metrics)
    base = {"model": "m", "provider": "p"}
    assert s.total("tokenwire_requests_total", **base, transport="sse", outcome="completed") == 1
    assert (
        s.total(
            "tokenwire_requests_total", transport="ws", outcome="client_disconnected", api="chat"
        )
        == 1
    )
    assert s.total("tokenwire_ttft_seconds_count", **base) == 1  # the second had no first token
    assert s.total("tokenwire_ttft_seconds_sum", **base) == pytest.approx(0.04)
    assert s.total("tokenwire_ttft_seconds_bucket", **base, le="0.03") == 0
    assert s.total("tokenwire_ttft_seconds_bucket", **base, le="0.05") == 1
    assert s.total("tokenwire_inter_token_seconds_count", **base) == 2
    assert s.total("tokenwire_request_duration_seconds_count", **base, outcome="completed") == 1
    assert s.total("tokenwire_prompt_tokens_total", **base) == 20
    assert s.total("tokenwire_completion_tokens_total", **base) == 40
    assert s.total("tokenwire_cost_microdollars_total", **base) == 660
    assert s.total("tokenwire_charge_microdollars_total", **base) == 1000


def test_buckets_span_5ms_to_60s(completion: RecordFactory) -> None:
    """Latency histograms run from 5 ms to 60 s (and +Inf)."""
    s = scrape(_with(completion()))
    bounds = {
        labels["le"] for name, labels, _ in s.samples if name == "tokenwire_ttft_seconds_bucket"
    }
    assert LATENCY_BUCKETS[0] == 0.005 and LATENCY_BUCKETS[-1] == 60.0
    assert {"0.005", "60.0", "+Inf"} <= bounds


def _with(*records: CompletionRecord) -> Metrics:
    metrics = Metrics()
    for record in records:
        metrics.completion(record)
    return metrics


def test_attempts_retries_and_fallbacks_come_from_the_routing_history(
    completion: RecordFactory,
) -> None:
    """Each attempt counts by outcome; every attempt after the first is a retry; a retry on
    another deployment than the one before is also a fallback."""
    history = (
        AttemptFailed("a", "x", "server_error"),
        AttemptFailed("a", "x", "server_error"),  # a retry on the same deployment
        AttemptFailed("b", "y", "connect_error"),  # a fallback
        Routed("c", "z"),  # a fallback that served
    )
    s = scrape(_with(completion(model="routed", attempts=history)))
    attempts = "tokenwire_upstream_attempts_total"
    assert s.total(attempts, deployment="a/x", provider="a", outcome="server_error") == 2
    assert s.total(attempts, deployment="b/y", outcome="connect_error") == 1
    assert s.total(attempts, deployment="c/z", outcome="ok") == 1
    assert s.total("tokenwire_retries_total") == 3
    assert s.total("tokenwire_retries_total", deployment="a/x") == 1
    assert s.total("tokenwire_fallbacks_total", model="routed") == 2


def test_refusals_count_requests_and_limits_by_reason() -> None:
    """A refused request counts under its outcome; a limit refusal also under its reason."""
    metrics = Metrics()
    refusal = Refusal(
        key_id="k",
        model="m",
        provider="p",
        transport="json",
        api="chat",
        outcome="rate_limited",
        reason="tokens",
        error_code="rate_limit_exceeded",
        error_status=429,
        client="c",
    )
    metrics.refusal(refusal)
    metrics.limit_refused("auth_failures")
    s = scrape(metrics)
    assert s.total("tokenwire_requests_total", outcome="rate_limited", transport="json") == 1
    assert s.total("tokenwire_limit_refusals_total", reason="tokens") == 1
    assert s.total("tokenwire_limit_refusals_total", reason="auth_failures") == 1
    assert s.total("tokenwire_limit_refusals_total") == 2


def test_fixed_label_sets_exist_at_zero() -> None:
    """Every transport, WebSocket mode and limit reason has its series from the start."""
    s = scrape(Metrics())
    for transport in ("sse", "ws", "ws-envelope", "json"):
        assert ("tokenwire_open_streams", {"transport": transport}, 0.0) in s.samples
        assert ("tokenwire_resumes_total", {"transport": transport}, 0.0) in s.samples
    reasons = {
        labels["reason"]
        for name, labels, _ in s.samples
        if name == "tokenwire_limit_refusals_total"
    }
    assert reasons == set(LIMIT_REASONS) and len(LIMIT_REASONS) == 7


def test_gauges_follow_streams_and_sockets() -> None:
    """Open streams and WebSockets go up and down; a socket moves from pending to its mode."""
    metrics = Metrics()
    metrics.stream_opened("ws-envelope")
    metrics.stream_opened("ws-envelope")
    metrics.stream_closed("ws-envelope")
    metrics.websocket_mode(None, "pending")
    metrics.websocket_mode(None, "pending")
    metrics.websocket_mode("pending", "envelope")
    s = scrape(metrics)
    assert s.total("tokenwire_open_streams", transport="ws-envelope") == 1
    assert s.total("tokenwire_open_websockets", mode="pending") == 1
    assert s.total("tokenwire_open_websockets", mode="envelope") == 1
    metrics.websocket_mode("envelope", None)
    metrics.websocket_mode("pending", None)
    assert scrape(metrics).total("tokenwire_open_websockets") == 0


def test_sampled_values_are_read_at_scrape_time() -> None:
    """Queue depth, held rows, outbox files and circuits are what the sampler says when
    scraped; write failures become a counter that only grows by the difference."""
    now = RuntimeSample(
        ledger_queued=5,
        ledger_held=1,
        ledger_outbox_files=3,
        ledger_write_failures=2,
        circuits={"p/a": 2, "p/b": 0},
    )

    def sampler() -> RuntimeSample:
        return now

    metrics = Metrics(sampler=sampler)
    s = scrape(metrics)
    assert s.total("tokenwire_ledger_queue_depth") == 5
    assert s.total("tokenwire_ledger_held_rows") == 1
    assert s.total("tokenwire_ledger_outbox_files") == 3
    assert s.total("tokenwire_ledger_write_failures_total") == 2
    assert s.total("tokenwire_circuit_state", deployment="p/a") == 2
    now = dataclasses.replace(now, ledger_write_failures=5, circuits={"p/a": 1})
    s = scrape(metrics)
    assert s.total("tokenwire_ledger_write_failures_total") == 5
    assert s.total("tokenwire_circuit_state", deployment="p/a") == 1
    assert not [labels for name, labels, _ in s.samples if labels.get("deployment") == "p/b"]


def test_each_app_has_its_own_registry(completion: RecordFactory) -> None:
    """Two Metrics objects in one process count separately (nothing global)."""
    first, second = Metrics(), Metrics()
    first.completion(completion())
    assert scrape(first).total("tokenwire_requests_total") == 1
    assert scrape(second).total("tokenwire_requests_total") == 0


def test_multiprocess_mode_needs_the_variable_before_the_process_starts(tmp_path: Path) -> None:
    """In a process that imported prometheus_client without PROMETHEUS_MULTIPROC_DIR, asking
    for multiprocess mode is a configuration error, not silently per-process counts."""
    with pytest.raises(ConfigError, match="PROMETHEUS_MULTIPROC_DIR was set after"):
        Metrics(multiprocess_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="not a directory"):
        Metrics(multiprocess_dir=str(tmp_path / "missing"))


WORKER = textwrap.dedent(
    """
    import sys
    from tokenwire.observability.metrics import Metrics
    from tokenwire.observability.records import CompletionRecord
    from tokenwire.streams.events import Routed

    metrics = Metrics.from_environ()
    assert metrics.multiprocess_dir is not None
    for i in range(int(sys.argv[1])):
        metrics.completion(CompletionRecord(
            completion_id=f"c{i}", key_id="k", model="m", provider="p", transport="sse",
            api="chat", outcome="completed", finish_reason="stop", error_code=None,
            error_status=None, ttft_s=0.02, itl_s=0.01, duration_s=0.3, prompt_tokens=3,
            completion_tokens=4, usage_estimated=False, cost_micro=10, charge_micro=15,
            client="c",
            attempts=(Routed("p", "up"),),
        ))
    for _ in range(int(sys.argv[2])):
        metrics.stream_opened("ws")
    if sys.argv[3] == "scrape":
        sys.stdout.write(metrics.render()[0].decode())
    """
)


def run_worker(directory: Path, completions: int, open_streams: int, scrape: bool) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    argv = [str(completions), str(open_streams), "scrape" if scrape else "-"]
    result = subprocess.run(
        [sys.executable, "-c", WORKER, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_two_processes_share_one_directory(tmp_path: Path) -> None:
    """Two processes record into one PROMETHEUS_MULTIPROC_DIR; a third one's scrape sums them:
    counters and histograms of both, open-stream gauges of the live ones only once the dead
    are marked (mark_process_dead, as the supervisor does)."""
    run_worker(tmp_path, 3, 1, scrape=False)
    run_worker(tmp_path, 4, 2, scrape=False)
    pids = sorted({int(f.stem.rsplit("_", 1)[1]) for f in tmp_path.glob("*.db")})
    assert len(pids) == 2
    s = Scrape.parse(run_worker(tmp_path, 0, 0, scrape=True))
    assert s.total("tokenwire_requests_total", model="m", outcome="completed") == 7
    assert s.total("tokenwire_ttft_seconds_count") == 7
    assert s.total("tokenwire_cost_microdollars_total") == 70
    assert s.total("tokenwire_charge_microdollars_total") == 105
    assert s.total("tokenwire_upstream_attempts_total", deployment="p/up", outcome="ok") == 7
    assert s.total("tokenwire_open_streams", transport="ws") == 3  # not yet marked dead
    for pid in pids:
        mark_process_dead(pid, str(tmp_path))
    s = Scrape.parse(run_worker(tmp_path, 0, 0, scrape=True))
    assert s.total("tokenwire_requests_total") == 7  # counters outlive their processes
    assert s.total("tokenwire_open_streams", transport="ws") == 0
