"""Transport conformance: the same request gives the same result over SSE and both WS modes.

Every scenario runs over three transports,

* ``sse``: ``POST /v1/chat/completions`` with ``stream: true`` (aiohttp),
* ``ws-compat``: ``/v1/ws/chat`` in compatible mode (a plain body in, chunks and ``[DONE]`` out),
* ``ws-envelope``: ``/v1/ws/chat`` in envelope mode (``chat.completion.create``),
* ``responses-sse``: ``POST /v1/responses`` with ``stream: true`` (the same request in the
  Responses API's words: :func:`responses_body`),
* ``responses-ws``: ``/v1/responses`` over WebSocket (``response.create``),

and against the backends ``sim`` (in-process) and ``proxied-sim`` (sim-upstream over real
HTTP); upstream behaviour the simulator cannot show (HTTP errors, failures after the first
token, text needing JSON escapes, no usage) comes from ``flaky``, a scripted upstream over
real HTTP (see ``conftest.py``). Each
transport's output is folded into one :class:`Record` (text, tool calls, finish reasons, usage,
error, chunk ids, roles, models). The test asserts that the record equals the expected one
computed from :func:`tokenwire.providers.sim.plan` (or the documented error), and that every
WebSocket record equals the SSE record of the same scenario: same text, finish reasons, usage
and error codes on every transport. Transport-specific framing is checked on the way
(``[DONE]`` last, SSE ids increasing, envelope ``request_id`` / ``sequence_number`` / ``done``,
nothing trailing after the end of a request; Responses events named, numbered 0, 1, 2…).

An API whose record is Chat SSE's for the same scenario is one more entry in
:data:`TRANSPORTS` (a runner that sends the scenario's chat body in its own words and folds
what comes back into a :class:`Record`, naming errors' params as Chat does) and in
:data:`CANNOT_EXPRESS` (the chat fields it has no words for: those scenarios are not run on
it). The Messages API (``POST /v1/messages``, Anthropic's SSE events) always states
``max_tokens`` and reports usage, so ``test_messages.py`` holds it to the Chat SSE record of
the chat request it translates to. The runners and scenarios are in ``harness.py``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from tests.conformance.harness import (
    TRANSPORTS,
    Observed,
    Record,
    assert_nothing_trailing,
    auth_headers,
    collect_compat,
    collect_envelopes,
    collect_responses,
    create_message,
    expresses,
    fold_responses,
    recv_text,
    responses_body,
    responses_ws_url,
    run_sse,
    run_ws_envelope,
    ws_url,
)
from tests.conformance.scenarios import (
    CASES,
    INCLUDE_USAGE,
    SCENARIOS,
    SSE_REFERENCE,
    Scenario,
    chat_body,
    sim_plan,
    sim_stats,
    sse_reference,
    upstream_cancelled_once,
    user_messages,
)
from websockets.asyncio.client import ClientConnection, connect

from tokenwire.testing import GatewayServer, SimUpstreamServer

# -- the tests -------------------------------------------------------------------------------


def test_scenarios_exercise_what_they_claim() -> None:
    """Guard the plan-dependent scenarios: the stop really cuts, the limits really bind."""
    scenarios = {s.name: s for s in SCENARIOS}
    full = sim_plan(chat_body("sim"))
    assert full.finish_reason == "stop" and len(full.tokens) == 16
    cut = sim_plan(scenarios["stop"].body("sim"))
    assert cut.finish_reason == "stop" and 0 < len(cut.text) < len(full.text)
    assert full.text.startswith(cut.text)
    assert full.text[len(cut.text) :].startswith("lver")
    assert cut.tokens[-1] not in full.tokens  # a token cut in the middle
    for name, limit in (("max_tokens", 5), ("max_completion_tokens", 3), ("seeded", 8)):
        limited = sim_plan(scenarios[name].body("sim"))
        assert limited.finish_reason == "length" and len(limited.tokens) == limit
    assert (
        sim_plan(scenarios["seeded"].body("sim")).text
        != sim_plan(chat_body("sim", max_tokens=8)).text
    )
    assert sim_plan(scenarios["tool_call"].body("sim")).tool_call is not None


@pytest.mark.parametrize(("transport", "backend", "scenario"), CASES)
async def test_same_result_on_every_transport(
    conformance_gateway: GatewayServer,
    flaky_script: dict[str, Any],
    transport: str,
    backend: str,
    scenario: Scenario,
) -> None:
    """The transport's record equals the expected one and the SSE record of the scenario."""
    body = scenario.body(backend)
    observed = await TRANSPORTS[transport](conformance_gateway, body)
    record = observed.record

    assert record.without_message() == scenario.expected(body, flaky_script)
    if transport == "sse":
        SSE_REFERENCE.setdefault((backend, scenario.name), observed)
    reference = await sse_reference(conformance_gateway, backend, scenario)
    if transport.startswith("responses-"):  # same error, in the API's own words
        assert record.without_message() == reference.record.without_message()
    else:
        assert record == reference.record, f"{transport} differs from SSE"

    if scenario.retry_after_ms is not None and transport != "ws-compat":
        # SSE: the Retry-After header; envelope: retry_after_ms; Responses WS: the error's
        # headers. Compatible mode sends the same object as SSE in-band, without a retry field.
        assert observed.retry_after_ms == scenario.retry_after_ms
    if transport == "ws-compat" and reference.record.ids:
        # Byte for byte the SSE data: the finish and usage chunks, and the in-band error.
        assert observed.raw == reference.raw
    if transport == "ws-envelope":
        assert observed.raw == [r for r in reference.raw if not r.startswith('{"error"')]
        usage = None if scenario.error else scenario.usage(body, flaky_script)
        _check_envelope(observed, reference, usage)
    if transport.startswith("responses-") and observed.done is not None and not scenario.error:
        # A Responses stream always ends with its usage, asked for or not.
        usage = scenario.usage(body, flaky_script)
        assert observed.done["usage"]["input_tokens"] == usage["prompt_tokens"]
        assert observed.done["usage"]["output_tokens"] == usage["completion_tokens"]
        assert observed.done["usage"]["total_tokens"] == usage["total_tokens"]


def _check_envelope(observed: Observed, reference: Observed, usage: dict[str, int] | None) -> None:
    """``done`` with ``usage`` after a stream (none after an error); same event numbers."""
    if usage is None:
        assert observed.done is None
        return
    done = observed.done
    assert done is not None
    assert done["finish_reason"] == observed.record.finish_reasons[-1]
    assert done["usage"] == usage, "done.usage differs from the expected usage"
    if observed.record.usage is not None:
        assert done["usage"] == observed.record.usage
    assert observed.stream_id is not None and observed.stream_id.startswith("chatcmpl-")
    # Event numbers come from the generation's log: the finish chunk has the same number as
    # over SSE, and done counts every event of the log (usage included).
    assert reference.finish_number is not None
    assert observed.finish_number == reference.finish_number
    total_events = reference.finish_number + 1
    assert done["sequence_number"] == total_events
    # Merged deltas carry the number of their last delta: a subset of the SSE ids.
    assert set(observed.numbers) <= set(reference.numbers)


async def _cancel_on_first_chunk(ws: ClientConnection, request_id: str, count: int) -> None:
    if count == 1:
        await ws.send(json.dumps({"type": "chat.completion.cancel", "request_id": request_id}))


@pytest.mark.parametrize("backend", ["sim", "proxied-sim"])
async def test_envelope_cancel_ends_with_cancelled_and_usage_so_far(
    conformance_gateway: GatewayServer, sim_upstream: SimUpstreamServer, backend: str
) -> None:
    """``chat.completion.cancel`` → finish chunk ``cancelled``, usage so far, ``done``."""
    body = chat_body(backend, max_tokens=4000, **INCLUDE_USAGE)  # ~4 s at 1 ms a token
    full = sim_plan(body)
    before = await sim_stats(sim_upstream)
    observed = await run_ws_envelope(conformance_gateway, body, on_chunk=_cancel_on_first_chunk)
    record = observed.record
    assert record.error is None
    assert record.finish_reasons == ["cancelled"]
    assert record.roles == ["assistant"] and record.ids == 1 and record.models == [backend]
    assert record.text and full.text.startswith(record.text) and record.text != full.text
    assert observed.done is not None
    assert observed.done["finish_reason"] == "cancelled"
    assert observed.done["usage"] == record.usage
    assert record.usage is not None
    # "the usage so far": every streamed token is counted, and only those.
    assert record.usage["completion_tokens"] == len(record.text.split())
    assert record.usage["total_tokens"] == (
        record.usage["prompt_tokens"] + record.usage["completion_tokens"]
    )
    if backend == "proxied-sim":
        await upstream_cancelled_once(sim_upstream, before)


async def test_envelope_cancel_before_the_first_token(conformance_gateway: GatewayServer) -> None:
    """A cancel while the upstream is silent: a ``cancelled`` finish chunk, 0 tokens, ``done``."""
    body = chat_body("flaky", user_messages("hang"), **INCLUDE_USAGE)
    async with connect(
        ws_url(conformance_gateway), additional_headers=auth_headers(conformance_gateway)
    ) as ws:
        await ws.send(create_message("hung", body))
        await asyncio.sleep(0.2)  # the upstream request is in flight, no token yet
        await ws.send(json.dumps({"type": "chat.completion.cancel", "request_id": "hung"}))
        observed = (await collect_envelopes(ws, ["hung"]))["hung"]
        await assert_nothing_trailing(ws)
    record = observed.record
    assert record.without_message() == Record(
        finish_reasons=["cancelled"],
        usage=record.usage,
        ids=1,
        roles=["assistant"],
        models=["flaky"],
        usage_field="null",
    )
    assert record.usage is not None and record.usage["completion_tokens"] == 0
    assert observed.done is not None and observed.done["finish_reason"] == "cancelled"
    assert observed.done["usage"] == record.usage


async def test_compatible_requests_on_one_socket_run_in_order(
    conformance_gateway: GatewayServer,
) -> None:
    """Pipelined compatible-mode bodies: each reply (ending in [DONE]) equals its SSE record."""
    cases = [
        (backend, scenario)
        for backend in ("sim", "proxied-sim")
        for scenario in SCENARIOS
        if backend in scenario.backends
    ] + [("flaky", s) for s in SCENARIOS if "flaky" in s.backends]
    async with connect(
        ws_url(conformance_gateway), additional_headers=auth_headers(conformance_gateway)
    ) as ws:
        for backend, scenario in cases:  # all sent before reading anything
            await ws.send(json.dumps(scenario.body(backend)))
        replies = [await collect_compat(ws) for _ in cases]
        await assert_nothing_trailing(ws)
    for (backend, scenario), observed in zip(cases, replies, strict=True):
        reference = await sse_reference(conformance_gateway, backend, scenario)
        assert observed.record == reference.record, (backend, scenario.name)


async def test_envelope_requests_multiplexed_on_one_socket(
    conformance_gateway: GatewayServer, flaky_script: dict[str, Any]
) -> None:
    """Every scenario at once on one socket: each request's record equals its SSE record."""
    cases = {
        f"{scenario.name}/{backend}": (backend, scenario)
        for scenario in SCENARIOS
        for backend in scenario.backends
    }
    assert len(cases) <= conformance_gateway.settings.server.ws_max_concurrent_requests
    async with connect(
        ws_url(conformance_gateway), additional_headers=auth_headers(conformance_gateway)
    ) as ws:
        for request_id, (backend, scenario) in cases.items():
            await ws.send(create_message(request_id, scenario.body(backend)))
        results = await collect_envelopes(ws, list(cases))
        await assert_nothing_trailing(ws)
    for request_id, (backend, scenario) in cases.items():
        reference = await sse_reference(conformance_gateway, backend, scenario)
        observed = results[request_id]
        assert observed.record == reference.record, request_id
        body = scenario.body(backend)
        usage = None if scenario.error else scenario.usage(body, flaky_script)
        _check_envelope(observed, reference, usage)


@pytest.mark.parametrize("transport", ["ws-compat", "ws-envelope"])
async def test_websocket_streams_even_with_stream_false(
    conformance_gateway: GatewayServer, transport: str
) -> None:
    """The protocol says ``stream`` is implied: ``"stream": false`` still streams, as SSE."""
    scenario = next(s for s in SCENARIOS if s.name == "include_usage")
    body = {**scenario.body("proxied-sim"), "stream": False}
    observed = await TRANSPORTS[transport](conformance_gateway, body)
    reference = await sse_reference(conformance_gateway, "proxied-sim", scenario)
    assert observed.record == reference.record


async def test_slow_reader_gets_merged_chunks_and_the_same_record(
    conformance_gateway: GatewayServer, flaky_script: dict[str, Any]
) -> None:
    """A client that reads nothing for a while: deltas merge, numbers skip, nothing is lost.

    20000 instant tokens (~4.6 MB of chunks) overflow the socket buffers while the client
    sleeps, so the request task falls behind the log and merges text deltas.
    """
    body = chat_body("instant-sim", max_tokens=20_000, **INCLUDE_USAGE)
    scenario = Scenario("large", lambda _m: body)
    reference = await run_sse(conformance_gateway, body)
    assert reference.record.without_message() == scenario.expected(body, flaky_script)
    url, headers = ws_url(conformance_gateway), auth_headers(conformance_gateway)
    async with connect(url, additional_headers=headers, max_queue=1) as ws:
        await ws.send(create_message("slow", body))
        await asyncio.sleep(1.0)
        observed = (await collect_envelopes(ws, ["slow"]))["slow"]
        await assert_nothing_trailing(ws)
    assert observed.record == reference.record
    assert observed.raw == reference.raw
    _check_envelope(observed, reference, scenario.usage(body, flaky_script))
    assert len(observed.numbers) < len(reference.numbers), "no delta was merged"
    async with connect(url, additional_headers=headers, max_queue=1) as ws:
        await ws.send(json.dumps(body))
        await asyncio.sleep(1.0)
        compat = await collect_compat(ws)
        await assert_nothing_trailing(ws)
    assert compat.record == reference.record
    assert compat.raw == reference.raw


# -- Responses over WebSocket: cancel, order, lanes; billing on every transport --------------


async def _first_delta_then_cancel(ws: ClientConnection, lane: dict[str, str]) -> Observed:
    """Read one response's events; on its first text delta, cancel it."""
    events: list[dict[str, Any]] = []
    while True:
        event = json.loads(await recv_text(ws))
        events.append(event)
        if event["type"] == "response.output_text.delta" and len(events) == 5:
            await ws.send(json.dumps({"type": "response.cancel", **lane}))
        if event["type"] in ("response.completed", "response.incomplete", "response.failed"):
            return Observed(fold_responses(events, None, True), done=event["response"])


@pytest.mark.parametrize("backend", ["sim", "proxied-sim"])
async def test_responses_ws_cancel_ends_with_cancelled_and_usage_so_far(
    conformance_gateway: GatewayServer, sim_upstream: SimUpstreamServer, backend: str
) -> None:
    """``response.cancel`` → ``response.incomplete`` with status cancelled, the text so far
    and its usage; the upstream request is closed."""
    body = chat_body(backend, max_tokens=4000, **INCLUDE_USAGE)  # ~4 s at 1 ms a token
    full = sim_plan(body)
    before = await sim_stats(sim_upstream)
    url, headers = responses_ws_url(conformance_gateway), auth_headers(conformance_gateway)
    async with connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "response.create", **responses_body(body)}))
        observed = await _first_delta_then_cancel(ws, {})
        await assert_nothing_trailing(ws)
    record = observed.record
    assert record.error is None and record.finish_reasons == ["cancelled"]
    assert record.text and full.text.startswith(record.text) and record.text != full.text
    assert record.usage is not None
    assert record.usage["completion_tokens"] == len(record.text.split())
    assert observed.done is not None and observed.done["status"] == "cancelled"
    if backend == "proxied-sim":
        await upstream_cancelled_once(sim_upstream, before)


async def test_responses_ws_requests_on_one_socket_run_in_order(
    conformance_gateway: GatewayServer,
) -> None:
    """Pipelined ``response.create`` messages without a lane: each reply, in order, equals
    its SSE record."""
    cases = [
        (backend, scenario)
        for scenario in SCENARIOS
        for backend in scenario.backends
        if expresses("responses-ws", scenario.body(backend))
    ]
    url, headers = responses_ws_url(conformance_gateway), auth_headers(conformance_gateway)
    async with connect(url, additional_headers=headers) as ws:
        for backend, scenario in cases:  # all sent before reading anything
            message = {"type": "response.create", **responses_body(scenario.body(backend))}
            await ws.send(json.dumps(message))
        replies = []
        for backend, scenario in cases:
            include_usage = "stream_options" in scenario.body(backend)
            replies.append(await collect_responses(ws, include_usage))
        await assert_nothing_trailing(ws)
    for (backend, scenario), observed in zip(cases, replies, strict=True):
        reference = await sse_reference(conformance_gateway, backend, scenario)
        assert observed.record.without_message() == reference.record.without_message(), (
            backend,
            scenario.name,
        )


async def test_responses_ws_lanes_run_concurrently(conformance_gateway: GatewayServer) -> None:
    """Two ``stream_id`` lanes: a response waiting for a silent upstream does not hold back
    the other lane, and every event carries its lane's stream_id."""
    slow = responses_body(chat_body("flaky", user_messages("hang")))
    fast = responses_body(chat_body("sim"))
    url, headers = responses_ws_url(conformance_gateway), auth_headers(conformance_gateway)
    ends: list[str] = []
    async with connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "response.create", "stream_id": "slow", **slow}))
        await ws.send(json.dumps({"type": "response.create", "stream_id": "fast", **fast}))
        while len(ends) < 2:
            event = json.loads(await recv_text(ws))
            assert event["stream_id"] in ("slow", "fast"), event
            if event["type"] in ("response.completed", "response.incomplete", "response.failed"):
                ends.append(event["stream_id"])
        await assert_nothing_trailing(ws)
    assert ends == ["fast", "slow"]


async def _ledger_row(gateway: GatewayServer, completion_id: str) -> dict[str, Any]:
    """The key's ledger row for a completion, once it is written."""
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.get(
                gateway.base_url + "/v1/usage?limit=1000", headers=auth_headers(gateway)
            ) as response:
                rows = (await response.json())["data"]
            found = [row for row in rows if row["completion_id"] == completion_id]
            if found:
                return dict(found[0])
            await asyncio.sleep(0.02)
    raise AssertionError(f"no ledger row for {completion_id}")


async def test_every_transport_bills_the_same(conformance_gateway: GatewayServer) -> None:
    """The same priced request over every transport: one ledger row each, with the same
    tokens, cost and status, and the API it came through."""
    body = chat_body("priced-sim", max_tokens=7, **INCLUDE_USAGE)
    rows = {}
    for transport, run in TRANSPORTS.items():
        observed = await run(conformance_gateway, body)
        assert observed.stream_id is not None, transport
        rows[transport] = await _ledger_row(conformance_gateway, observed.stream_id)
    sim = sim_plan(body)
    for transport, row in rows.items():
        assert row["api"] == ("responses" if transport.startswith("responses-") else "chat")
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            sim.prompt_tokens,
            sim.completion_tokens,
        ), transport
        assert row["cost_micro"] == 3 * sim.prompt_tokens + 15 * sim.completion_tokens > 0
        assert row["status"] == "completed" and row["finish_reason"] == "length"
