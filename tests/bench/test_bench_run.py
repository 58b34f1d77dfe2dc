"""``tokenwire bench`` run for real, as a subprocess: a small run of every scenario with the
servers bench starts (results.json valid against the schema, every request completed, the
markdown table, the plots, leak accounting with no growth), ``--target`` against a running gateway
(and one without WebSocket or upstream), ``--workers``, ``--warmup-s``, invalid options, the default
output directory and the documented ``--check`` commands. The runs are kept small (a few seconds
each): sim-upstream with a 5 ms first token and 2 ms between tokens, 8 tokens per request, and
``--settle-s 0`` (the gateway's counts are taken as soon as it is quiet, without waiting for its
idle upstream connections to close).
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

from tokenwire.bench.leaks import COUNTS, RUNTIME_PATH, TOLERANCE
from tokenwire.bench.options import BenchOptions, Scenario
from tokenwire.testing import FAST_SIM, GatewayServer, SimUpstreamServer

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
