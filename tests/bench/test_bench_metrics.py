"""The metric arithmetic of ``tokenwire bench``, on made-up figures: percentiles, TTFT, E2E,
TPOT and inter-token latency from arrival stamps (E2E ending at the last content chunk), stream
records flagging errors and wrong text, ITL pooled over requests, overhead against the direct row,
rounds combined, server CPU per request, and the parsing of the scenario and concurrency options.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

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
from tokenwire.bench.options import Scenario, parse_concurrency, parse_scenarios
from tokenwire.bench.resources import ResourceUsage
from tokenwire.bench.results import GATEWAY, RowRun
from tokenwire.bench.sse import handle_line
from tokenwire.bench.workload import StreamState, decode_message, request_body
from tokenwire.errors import InvalidRequest
from tokenwire.providers.sim import plan
from tokenwire.wire.schema import decode_chat_request


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


def test_cpu_per_request_is_server_cpu_over_requests_sent() -> None:
    """server CPU ms/req: the server's CPU seconds in the row over the requests of the row."""
    records = [RequestRecord(0, i, 0.01, 0.02, None, [], 4, 1, 1) for i in range(8)]
    row = RowRun(scenario=Scenario.SSE, concurrency=2, round=1)
    row.metrics = summarize_row(records, wall_s=1.0)
    row.resources = ResourceUsage(cpu_s={GATEWAY: 0.004})
    assert row.cpu_ms_per_request(GATEWAY) == pytest.approx(0.5)
    assert row.cpu_ms_per_request("client") is None  # not sampled


def test_option_parsing_sorts_and_rejects() -> None:
    """Concurrency is sorted and deduplicated; scenarios come in canonical order, direct first."""
    assert parse_concurrency("100,1,10,10") == (1, 10, 100)
    assert parse_scenarios("ws-mux,direct,sse") == (Scenario.DIRECT, Scenario.SSE, Scenario.WS_MUX)
    with pytest.raises(InvalidRequest) as caught:
        parse_concurrency("1,zero")
    assert caught.value.param == "--concurrency"
    with pytest.raises(InvalidRequest):
        parse_concurrency("0")
