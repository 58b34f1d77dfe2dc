"""``tokenwire bench``: real runs (started servers and ``--target``), the results, the metrics.

The end-to-end runs are kept small (a few seconds each): sim-upstream with a 5 ms first token
and 2 ms between tokens, 8 tokens per request, and ``--settle-s 0`` (the gateway's counts are
taken as soon as it is quiet, without waiting for its idle upstream connections to close).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import matplotlib.image
import pytest

from tokenwire.bench.leaks import (
    COUNTS,
    RUNTIME_PATH,
    TOLERANCE,
    LeakAccount,
    ProbeError,
    Snapshot,
    settle,
)
from tokenwire.bench.metrics import (
    Dist,
    RequestRecord,
    dist_ms,
    median_rows,
    overhead,
    percentile,
    summarize_row,
    timeline,
)
from tokenwire.bench.options import BenchOptions, Scenario, parse_concurrency, parse_scenarios
from tokenwire.bench.resources import ResourceUsage
from tokenwire.bench.results import GATEWAY, RowRun, check
from tokenwire.bench.sse import handle_line
from tokenwire.bench.workload import StreamState, decode_message, request_body
from tokenwire.errors import InvalidRequest
from tokenwire.providers.sim import plan
from tokenwire.testing import FAST_SIM, GatewayServer, SimUpstreamServer
from tokenwire.wire.schema import decode_chat_request

SCENARIOS = [s.value for s in Scenario]
CONCURRENCY = (1, 4)
REQUESTS_PER_USER = 2
TOKENS = 8
PLOTS = ("ttft_distribution.png", "throughput_vs_concurrency.png", "cpu_per_1k_tokens.png")


def run_bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``tokenwire bench ARGS`` with this interpreter; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "tokenwire.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def schema() -> dict[str, Any]:
    """The JSON Schema shipped as package data."""
    text = resources.files("tokenwire.bench").joinpath("results.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def load_results(out: Path) -> dict[str, Any]:
    """``results.json`` of a run, validated against the schema."""
    document: dict[str, Any] = json.loads((out / "results.json").read_text())
    jsonschema.Draft202012Validator(schema()).validate(document)
    return document


def records_by_key(document: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """Records keyed by (scenario, concurrency)."""
    return {(r["scenario"], r["concurrency"]): r for r in document["records"]}


@pytest.fixture(scope="module")
def started_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, Path]]:
    """One small real run of every scenario, bench starting sim-upstream and the gateway."""
    out = tmp_path_factory.mktemp("bench") / "out"
    done = run_bench(
        "--scenarios",
        ",".join(SCENARIOS),
        "--concurrency",
        ",".join(map(str, CONCURRENCY)),
        "--tokens",
        str(TOKENS),
        "--ttft-ms",
        "5",
        "--itl-ms",
        "2",
        "--requests-per-user",
        str(REQUESTS_PER_USER),
        "--pause-s",
        "0",
        "--settle-s",
        "0",
        "--out",
        str(out),
    )
    yield done.returncode, done.stdout + done.stderr, out


# --- the real run ----------------------------------------------------------------------------


def test_run_exits_zero_and_results_match_the_schema(started_run: tuple[int, str, Path]) -> None:
    """A small run of all scenarios exits 0 and writes a results.json valid against the schema."""
    code, output, out = started_run
    assert code == 0, output
    document = load_results(out)
    assert document["exit_code"] == 0
    assert document["setup"]["mode"] == "started"
    assert document["setup"]["ws_compression"] == "off"
    assert document["setup"]["ws_compression_negotiated"] is False


def test_every_scenario_and_concurrency_completed_every_request_correctly(
    started_run: tuple[int, str, Path],
) -> None:
    """Each scenario x concurrency has a record with every request completed, none wrong."""
    _, output, out = started_run
    records = records_by_key(load_results(out))
    assert len(records) == len(SCENARIOS) * len(CONCURRENCY)
    for scenario in SCENARIOS:
        for concurrency in CONCURRENCY:
            record = records[(scenario, concurrency)]
            expected = concurrency * REQUESTS_PER_USER
            assert record["status"] == "ok", (scenario, concurrency, output)
            assert record["expected_requests"] == expected
            assert record["requests"] == record["completed"] == expected, record["problems"]
            assert record["errors"] == 0 and record["wrong"] == 0
            assert record["output_tokens"] == expected * TOKENS
            assert record["ttft_ms"]["count"] == expected
            if scenario == "json":  # the whole answer at once: TTFT = E2E, no gaps
                assert record["itl_ms"]["count"] == 0
                assert record["per_request"]["ttft_ms"] == record["per_request"]["e2e_ms"]
            else:
                # one gap per pair of content chunks; the WebSocket writer merges the deltas of
                # a client that fell behind into one message, so there may be fewer than
                # tokens - 1
                assert 0 < record["itl_ms"]["count"] <= expected * (TOKENS - 1)
            assert record["server_cpu_ms_per_request"] >= 0
            assert len(record["per_request"]["ttft_ms"]) == expected
            assert record["per_request"]["output_tokens"] == [TOKENS] * expected
            assert record["server_peak_rss_mib"] > 10
            assert record["client_rss_kib_per_stream"] is not None
            if scenario == "direct":
                assert record["overhead_vs_direct"] is None
            else:
                assert record["overhead_vs_direct"]["ttft_ms"]["p50"] is not None


def test_markdown_has_a_row_per_scenario_and_concurrency(
    started_run: tuple[int, str, Path],
) -> None:
    """results.md has one table row per scenario x concurrency."""
    _, _, out = started_run
    lines = (out / "results.md").read_text().splitlines()
    for scenario in SCENARIOS:
        for concurrency in CONCURRENCY:
            prefix = f"| {scenario} | {concurrency} | "
            assert sum(line.startswith(prefix) for line in lines) == 1, prefix


def test_plots_are_non_trivial_pngs(started_run: tuple[int, str, Path]) -> None:
    """Each PNG opens as an image of a real size with more than one colour in it."""
    _, _, out = started_run
    for name in PLOTS:
        image = matplotlib.image.imread(out / name)
        height, width = image.shape[:2]
        assert height >= 300 and width >= 500, (name, image.shape)
        assert float(image.std()) > 0.01, name


def test_leak_accounting_shows_no_growth(started_run: tuple[int, str, Path]) -> None:
    """Per concurrency, the gateway's runtime counts after the rows equal those after the warm-up."""
    _, output, out = started_run
    document = load_results(out)
    assert document["setup"]["key_max_streams"] == 2 * max(CONCURRENCY)
    leaks = document["leaks"]
    assert leaks["source"] == RUNTIME_PATH
    accounts = {a["concurrency"]: a for a in leaks["per_concurrency"]}
    assert sorted(accounts) == list(CONCURRENCY)
    for concurrency, account in accounts.items():
        assert account["passed"], (concurrency, account["reasons"], output)
        before, after = account["before"], account["after"]
        assert before["quiet"] and after["quiet"]
        assert before["pid"] == after["pid"] == document["setup"]["gateway_pid"]
        deltas = {c["name"]: c["delta"] for c in account["counts"]}
        assert list(deltas) == list(COUNTS)
        # open descriptors may differ by pooled connections (the tolerance); nothing else may
        assert {name: d for name, d in deltas.items() if name != "open_fds"} == dict.fromkeys(
            COUNTS[:1] + COUNTS[2:], 0
        ), account["counts"]
        assert deltas["open_fds"] <= TOLERANCE["open_fds"]
        assert before["counts"]["live_generations"] == after["counts"]["live_generations"] == 0
        assert account["rss_after_warmup_mib"] > 10 and account["rss_peak_mib"] > 10
        assert account["rss_growth_pct"] is not None
        timeline = account["timeline"]  # the polls during the measured rows, as columns
        assert len(timeline["t_s"]) == len(timeline["tasks"]) == account["peak_polls"] >= 1
    markdown = (out / "results.md").read_text()
    for concurrency in CONCURRENCY:
        assert f"## Leak accounting, {concurrency} streams" in markdown
    assert "| stream_slots_held | 0 | 0 | +0 |" in markdown


def snapshot_of(pid: int = 7, **counts: int) -> Snapshot:
    """A quiet snapshot: every count 0 unless given."""
    return Snapshot(pid, {name: counts.get(name, 0) for name in COUNTS}, True, 1.0, 5)


def test_check_fails_on_a_leak_or_rss_growth_and_passes_without() -> None:
    """--check fails when a count grows past its tolerance or RSS grows over the limit."""
    opts = BenchOptions(scenarios=(Scenario.SSE,), check=True)
    clean = LeakAccount(1000, snapshot_of(tasks=5, open_fds=40), snapshot_of(tasks=5, open_fds=52))
    clean.rss_after_warmup_mib, clean.rss_peak_mib = 180.0, 197.0  # +9.4 %, fds +12 <= 18
    assert check([], opts, [clean]).passed, check([], opts, [clean]).reasons

    leaky = LeakAccount(1000, snapshot_of(tasks=5), snapshot_of(tasks=6, stream_slots_held=3))
    result = check([], opts, [leaky])
    assert not result.passed
    assert any("tasks 5 → 6 (+1, allowed +0)" in r for r in result.reasons), result.reasons
    assert any("stream_slots_held 0 → 3" in r for r in result.reasons), result.reasons

    fds = LeakAccount(1000, snapshot_of(open_fds=40), snapshot_of(open_fds=59))
    assert not check([], opts, [fds]).passed  # +19 > 18

    grown = LeakAccount(1000, snapshot_of(), snapshot_of())
    grown.rss_after_warmup_mib, grown.rss_peak_mib = 180.0, 200.0  # +11.1 %
    (reason,) = check([], opts, [grown]).reasons
    assert "RSS grew 11.1 %" in reason

    restarted = LeakAccount(1000, snapshot_of(pid=7), snapshot_of(pid=8))
    assert "different gateway process" in check([], opts, [restarted]).reasons[0]
    stuck = LeakAccount(1000, snapshot_of(), Snapshot(7, {n: 0 for n in COUNTS}, False, 120, 9))
    assert "not quiet" in check([], opts, [stuck]).reasons[0]
    assert not check([], opts, []).passed  # sse alone and no leak figures: nothing judged


def test_rss_trend_is_the_slope_over_the_second_half_of_the_polls() -> None:
    """A step at the start does not count in the trend; a steady climb does, in MiB per minute."""
    step = LeakAccount(1000)
    for second in range(600):
        step.note_peaks({}, float(second), 165.0 if second < 11 else 177.0)
    assert step.rss_trend_mib_per_min == pytest.approx(0.0)
    climb = LeakAccount(1000)
    for second in range(600):
        climb.note_peaks({}, float(second), 170.0 + second / 60)  # +1 MiB a minute
    assert climb.rss_trend_mib_per_min == pytest.approx(1.0)
    assert LeakAccount(1000).rss_trend_mib_per_min is None


def test_settle_waits_for_quiet_and_ignores_a_passing_task() -> None:
    """The snapshot waits until nothing is live, then keeps each count's minimum of the last second."""
    now = [0.0]
    answers = iter(
        [{"live_generations": 3, "ledger_queued": 1, "tasks": 40}] * 5  # still finishing
        + [{"live_generations": 0, "ledger_queued": 0, "tasks": 6}]  # a periodic task runs
        + [{"live_generations": 0, "ledger_queued": 0, "tasks": 5}] * 200
    )

    async def read() -> dict[str, Any]:
        answer = next(answers)
        return {"pid": 7, **dict.fromkeys(COUNTS, 0), **answer}

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    def clock() -> float:
        return now[0]

    import asyncio

    before = asyncio.run(settle(read, 2.0, clock=clock, sleep=sleep))
    assert before.quiet and before.pid == 7
    assert before.counts["tasks"] == 5 and before.counts["live_generations"] == 0
    assert 3.0 <= before.waited_s <= 3.5  # 1 s until quiet, then 2 s
    start = now[0]
    after = asyncio.run(settle(read, 30.0, baseline=before, clock=clock, sleep=sleep))
    assert after.counts == before.counts
    assert now[0] - start <= 1.5  # back to the baseline: no need to wait 30 s

    async def refuse() -> dict[str, Any]:
        raise ProbeError("GET /v1/admin/runtime: HTTP 403")

    now[0] = 0.0
    with pytest.raises(ProbeError, match="403"):
        asyncio.run(settle(refuse, 0.0, quiet_limit_s=2.0, clock=clock, sleep=sleep))


# --- --target --------------------------------------------------------------------------------


def proxy_config(upstream_url: str) -> str:
    """Model ``proxied-sim`` served by ``upstream_url`` (as a gateway under test would be)."""
    return (
        FAST_SIM
        + f"""
[providers.upstream]
kind = "openai"
base_url = "{upstream_url}/v1"

[[models]]
id = "proxied-sim"
provider = "upstream"
upstream_model = "sim"
"""
    )


def test_target_mode_measures_a_running_gateway(tmp_path: Path) -> None:
    """--target/--key/--upstream/--target-pid: rows run against a gateway bench did not start."""
    out = tmp_path / "out"
    with (
        SimUpstreamServer(ttft_ms=2, itl_ms=1) as upstream,
        GatewayServer(tmp_path / "gw", overrides=proxy_config(upstream.base_url)) as gateway,
    ):
        done = run_bench(
            "--target",
            gateway.base_url,
            "--key",
            gateway.api_key,
            "--model",
            "proxied-sim",
            "--upstream",
            upstream.base_url,
            "--target-pid",
            str(os.getpid()),
            "--admin-key",
            gateway.admin_key,
            "--settle-s",
            "0",
            "--scenarios",
            "direct,sse,ws,ws-mux",
            "--concurrency",
            "3",
            "--tokens",
            str(TOKENS),
            "--warmup",
            "0",
            "--pause-s",
            "0",
            "--no-plots",
            "--out",
            str(out),
        )
    assert done.returncode == 0, done.stdout + done.stderr
    document = load_results(out)
    assert document["setup"]["mode"] == "target"
    assert document["setup"]["gateway_pid"] == os.getpid()
    records = records_by_key(document)
    for scenario in ("direct", "sse", "ws", "ws-mux"):
        record = records[(scenario, 3)]
        assert record["status"] == "ok"
        assert record["completed"] == 3 and record["errors"] == record["wrong"] == 0
    assert records[("sse", 3)]["server_peak_rss_mib"] is not None  # sampled via --target-pid
    assert records[("sse", 3)]["overhead_vs_direct"]["tokens_per_s_ratio"] > 0
    assert not (out / "ttft_distribution.png").exists()
    (account,) = document["leaks"]["per_concurrency"]  # counted through --admin-key
    assert account["before"]["pid"] == account["after"]["pid"] == os.getpid()
    assert account["before"]["quiet"] and account["after"]["quiet"]
    assert {c["name"]: c["delta"] for c in account["counts"]}["live_generations"] == 0
    assert document["options"]["admin_key"] == gateway.admin_key[:6] + "…"
    written = (out / "results.json").read_text()
    assert gateway.admin_key not in written and gateway.api_key not in written


def test_workers_runs_the_started_gateway_as_several_processes_on_redis(tmp_path: Path) -> None:
    """--workers 2: the gateway bench starts has two worker processes sharing limits and
    streams in Redis; CPU is sampled over all of them, leak accounting is skipped with a note."""
    out = tmp_path / "out"
    done = run_bench(
        *("--workers", "2", "--scenarios", "direct,sse,json", "--concurrency", "4"),
        *("--tokens", str(TOKENS), "--requests-per-user", "3", "--pause-s", "0"),
        *("--settle-s", "0", "--no-plots", "--out", str(out)),
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    document = load_results(out)
    assert document["setup"]["gateway_workers"] == 2
    assert document["setup"]["gateway_shared_state"] == "redis"
    assert any("2 gateway workers" in note for note in document["notes"])
    records = records_by_key(document)
    for scenario in ("sse", "json"):
        record = records[(scenario, 4)]
        assert record["completed"] == 12 and record["errors"] == record["wrong"] == 0
        assert record["server_cpu_ms_per_request"] is not None


def test_cpu_per_request_is_server_cpu_over_requests_sent() -> None:
    """server CPU ms/req: the server's CPU seconds in the row over the requests of the row."""
    records = [RequestRecord(0, i, 0.01, 0.02, None, [], 4, 1, 1) for i in range(8)]
    row = RowRun(scenario=Scenario.SSE, concurrency=2, round=1)
    row.metrics = summarize_row(records, wall_s=1.0)
    row.resources = ResourceUsage(cpu_s={GATEWAY: 0.004})
    assert row.cpu_ms_per_request(GATEWAY) == pytest.approx(0.5)
    assert row.cpu_ms_per_request("client") is None  # not sampled


def test_warmup_s_keeps_the_warm_up_load_going(tmp_path: Path) -> None:
    """--warmup-s: the warm-up round sends requests for that long (a soak's baseline is the
    steady state), not one per user: the gateway bills far more than the measured requests."""
    out = tmp_path / "out"
    with GatewayServer(tmp_path / "gw", overrides=proxy_config("http://127.0.0.1:9")) as gateway:
        done = run_bench(
            *("--target", gateway.base_url, "--key", gateway.api_key, "--model", "sim"),
            *("--scenarios", "sse", "--concurrency", "2", "--tokens", str(TOKENS)),
            *("--warmup-s", "0.5", "--pause-s", "0", "--no-plots", "--out", str(out)),
        )
        assert done.returncode == 0, done.stdout + done.stderr

        async def rows() -> int:
            return len(await gateway.state.ledger.rows(key_id=gateway.api_key_id))

        billed = asyncio.run_coroutine_threadsafe(rows(), gateway.loop_of_server()).result()
    assert billed > 10  # 2 users for 0.5 s of warm-up, then 2 measured requests
    assert records_by_key(load_results(out))[("sse", 2)]["completed"] == 2
    assert run_bench("--warmup-s", "0", "--out", str(out)).returncode == 2


def test_target_without_websocket_or_upstream_reports_unsupported_and_skipped(
    tmp_path: Path,
) -> None:
    """A target with no /v1/ws/chat gets ws rows marked unsupported; no --upstream skips direct."""
    out = tmp_path / "out"
    with SimUpstreamServer(ttft_ms=0, itl_ms=1) as plain:  # OpenAI-compatible, no WebSocket
        done = run_bench(
            "--target",
            plain.base_url,
            "--key",
            "anything",
            "--model",
            "sim",
            "--scenarios",
            "direct,sse,ws",
            "--concurrency",
            "2",
            "--tokens",
            str(TOKENS),
            "--warmup",
            "0",
            "--pause-s",
            "0",
            "--no-plots",
            "--out",
            str(out),
        )
    assert done.returncode == 0, done.stdout + done.stderr
    document = load_results(out)
    records = records_by_key(document)
    assert records[("sse", 2)]["status"] == "ok"
    assert records[("sse", 2)]["completed"] == 2
    assert records[("ws", 2)]["status"] == "unsupported"
    assert "HTTP" in records[("ws", 2)]["note"]
    assert records[("direct", 2)]["status"] == "skipped"
    assert any("direct row skipped" in note for note in document["notes"])
    assert "| ws | 2 | unsupported" in (out / "results.md").read_text()


def test_invalid_options_exit_2_naming_the_option(tmp_path: Path) -> None:
    """Bad option values are refused before anything starts, naming the option."""
    done = run_bench("--scenarios", "sse,carrier-pigeon", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "carrier-pigeon" in done.stderr and "--scenarios" in done.stderr
    done = run_bench("--target", "http://127.0.0.1:9", "--out", str(tmp_path))
    assert done.returncode == 2 and "--key" in done.stderr
    done = run_bench("--admin-key", "tw-x", "--out", str(tmp_path))
    assert done.returncode == 2 and "--admin-key" in done.stderr


# --- metric definitions ----------------------------------------------------------------------


def record(
    ttft: float | None,
    e2e: float | None,
    tpot: float | None,
    itl: list[float],
    *,
    tokens: int = 3,
    error: str | None = None,
    wrong: str | None = None,
) -> RequestRecord:
    """A request record with the given figures (seconds)."""
    return RequestRecord(0, 0, ttft, e2e, tpot, itl, tokens, len(itl) + 1, 1, error, wrong)


def test_percentile_interpolates_linearly_like_numpy() -> None:
    """p50/p90/p99 of [1, 2, 3, 4] are 2.5, 3.7, 3.97; an empty sample has none."""
    data = [1.0, 2.0, 3.0, 4.0]
    assert percentile(data, 50) == pytest.approx(2.5)
    assert percentile(data, 90) == pytest.approx(3.7)
    assert percentile(data, 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 50) is None
    assert dist_ms([]) == Dist(None, None, None, None, 0)


def test_timeline_ttft_e2e_tpot_and_itl() -> None:
    """TTFT = first stamp - send; E2E = last - send; TPOT = (E2E - TTFT)/(n-1); ITL = gaps."""
    line = timeline(10.0, [10.1, 10.12, 10.15, 10.2], output_tokens=4)
    assert line.ttft_s == pytest.approx(0.1)
    assert line.e2e_s == pytest.approx(0.2)
    assert line.tpot_s == pytest.approx((0.2 - 0.1) / 3)
    assert line.itl_s == pytest.approx([0.02, 0.03, 0.05])


def test_tpot_is_undefined_for_one_token_and_uses_usage_tokens() -> None:
    """TPOT needs two tokens; with merged chunks it divides by the usage count, not chunks."""
    assert timeline(0.0, [0.5], output_tokens=1).tpot_s is None
    merged = timeline(0.0, [0.1, 0.4], output_tokens=4)  # 4 tokens arrived in 2 chunks
    assert merged.tpot_s == pytest.approx(0.1)
    assert merged.itl_s == pytest.approx([0.3])


def sse_line(payload: dict[str, Any] | str) -> bytes:
    """One SSE ``data:`` line."""
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return b"data: " + body.encode()


def test_e2e_ends_at_the_last_content_chunk_not_the_usage_chunk() -> None:
    """The finish-reason chunk, the usage chunk and [DONE] arriving later do not move E2E."""
    body = request_body("proxied-sim", "t", 0, 0, 3)
    tokens = plan(decode_chat_request(body)).tokens
    assert len(tokens) == 3
    state = StreamState(0, 0, body, sent=1.0)
    for token, stamp in zip(tokens, (1.010, 1.030, 1.060), strict=True):
        handle_line(sse_line({"choices": [{"delta": {"content": token}}]}), stamp, state)
    handle_line(sse_line({"choices": [{"delta": {}, "finish_reason": "length"}]}), 1.5, state)
    handle_line(sse_line({"choices": [], "usage": {"completion_tokens": 3}}), 1.9, state)
    handle_line(sse_line("[DONE]"), 2.0, state)
    result = state.record(tokens=3, end_marker="data: [DONE]")
    assert result.error is None and result.wrong is None
    assert result.ttft_s == pytest.approx(0.010)
    assert result.e2e_s == pytest.approx(0.060)
    assert result.tpot_s == pytest.approx(0.025)
    assert result.itl_s == pytest.approx([0.020, 0.030])


def test_stream_state_flags_missing_done_in_band_errors_and_wrong_text() -> None:
    """No end marker is an error, an in-band error is an error, other text is wrong."""
    body = request_body("m", "t", 1, 2, 2)
    no_done = StreamState(1, 2, body, sent=0.0)
    assert no_done.record(2, "data: [DONE]").error == "stream ended without data: [DONE]"
    failed = StreamState(1, 2, body, sent=0.0)
    failed.apply(decode_message(b'{"error": {"code": "upstream_error", "message": "x"}}'), 0.1)
    failed.done = True
    assert failed.record(2, "data: [DONE]").error == "in-band error upstream_error: x"
    wrong = StreamState(1, 2, body, sent=0.0, done=True, finish="length", usage_tokens=2)
    wrong.apply(decode_message(b'{"choices": [{"delta": {"content": "nope"}}]}'), 0.1)
    assert wrong.record(2, "data: [DONE]").wrong is not None


def test_itl_is_pooled_over_requests_and_failed_requests_are_left_out() -> None:
    """ITL percentiles pool every gap of every successful request; errors don't count."""
    rows = [
        record(0.010, 0.050, 0.020, [0.010, 0.030]),
        record(0.020, 0.040, 0.020, [0.020]),
        record(None, None, None, [], error="HTTP 500", tokens=0),
        record(0.030, 0.070, 0.020, [0.020, 0.020], wrong="text differs"),
    ]
    row = summarize_row(rows, wall_s=0.5)
    assert (row.requests, row.completed, row.errors, row.wrong) == (4, 2, 1, 1)
    assert row.itl.count == 5  # 2 + 1 + 2, the failed request adds none
    assert row.itl.p50 == pytest.approx(20.0)
    assert row.itl.mean == pytest.approx(20.0)
    assert row.ttft.p50 == pytest.approx(20.0)  # of 10, 20, 30 ms
    assert row.output_tokens == 9  # 3 successful-or-wrong requests x 3 tokens
    assert row.tokens_per_s == pytest.approx(18.0)
    assert row.requests_per_s == pytest.approx(8.0)


def test_overhead_is_the_difference_per_percentile_and_a_throughput_ratio() -> None:
    """Overhead = row - direct for each percentile; tokens/s as row / direct."""
    direct = summarize_row([record(0.010, 0.050, 0.020, [0.020, 0.020])], wall_s=1.0)
    gateway = summarize_row([record(0.013, 0.055, 0.021, [0.021, 0.021])], wall_s=1.25)
    result = overhead(gateway, direct)
    assert result.ttft.p50 == pytest.approx(3.0)
    assert result.e2e.p99 == pytest.approx(5.0)
    assert result.itl.mean == pytest.approx(1.0)
    assert result.tokens_per_s_ratio == pytest.approx(0.8)


def test_rounds_combine_as_totals_and_medians() -> None:
    """Over rounds, counts add up and rates and percentiles take the median."""
    rounds = [
        summarize_row([record(t, t + 0.04, 0.02, [0.02, 0.02])], wall_s=w)
        for t, w in ((0.010, 1.0), (0.030, 2.0), (0.020, 4.0))
    ]
    combined = median_rows(rounds)
    assert combined.requests == 3 and combined.output_tokens == 9
    assert combined.tokens_per_s == pytest.approx(1.5)  # median of 3, 1.5, 0.75
    assert combined.ttft.p50 == pytest.approx(20.0)
    assert combined.ttft.count == 3


def test_option_parsing_sorts_and_rejects() -> None:
    """Concurrency is sorted and deduplicated; scenarios come in canonical order, direct first."""
    assert parse_concurrency("100,1,10,10") == (1, 10, 100)
    assert parse_scenarios("ws-mux,direct,sse") == (Scenario.DIRECT, Scenario.SSE, Scenario.WS_MUX)
    with pytest.raises(InvalidRequest) as caught:
        parse_concurrency("1,zero")
    assert caught.value.param == "--concurrency"
    with pytest.raises(InvalidRequest):
        parse_concurrency("0")


REPO = Path(__file__).resolve().parents[2]


def test_default_output_dir_is_ignored_by_git() -> None:
    """What bench writes without --out (./bench-results/<timestamp>/…) is ignored by git."""
    out = BenchOptions().out_dir(datetime(2026, 12, 5, 12, 0, 0))
    assert not out.is_absolute()
    checked = subprocess.run(
        ["git", "check-ignore", "--no-index", str(out / "results.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, f"{out} is not ignored: {checked.stdout}{checked.stderr}"


def test_documented_check_commands_spread_arrivals() -> None:
    """Every documented 'tokenwire bench … --check' judging sse against direct uses --ramp-s: a 200-stream burst misses the TTFT target by design."""
    commands = []
    for doc in ("README.md", "bench/README.md", "docs/benchmarks.md"):
        text = (REPO / doc).read_text().replace("\\\n", " ")
        commands += [line for line in text.splitlines() if line.startswith("tokenwire bench")]
    checks = [command for command in commands if "--check" in command]
    assert len(checks) >= 3, commands
    for command in checks:
        words = command.split()
        scenarios = (
            words[words.index("--scenarios") + 1] if "--scenarios" in words else "direct,sse"
        )
        if {"direct", "sse"} <= set(scenarios.split(",")):  # else no TTFT target is judged
            assert "--ramp-s" in command, command
