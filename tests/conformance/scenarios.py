"""The conformance scenarios: each a chat body per backend and the record it must give, and
the SSE records every other transport is held to."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from tests.conformance.harness import (
    MESSAGES,
    TOOLS,
    TRANSPORTS,
    Observed,
    Record,
    expresses,
    run_sse,
    usage_of,
)

from tokenwire.accounting.budget import estimate_prompt_tokens
from tokenwire.providers.sim import SimPlan, plan
from tokenwire.testing import GatewayServer, SimUpstreamServer
from tokenwire.wire.schema import decode_chat_request

# -- the scenarios ---------------------------------------------------------------------------


def chat_body(
    model: str, messages: list[dict[str, Any]] = MESSAGES, **extra: Any
) -> dict[str, Any]:
    return {"model": model, "messages": messages, "stream": True, **extra}


def user_messages(content: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


@dataclass(frozen=True)
class Scenario:
    """A request body for a model, and the record every transport must produce for it."""

    name: str
    body: Callable[[str], dict[str, Any]]
    backends: tuple[str, ...] = ("sim", "proxied-sim")
    error: dict[str, Any] | None = None  # expected status/type/code/param
    partial: bool = False  # the flaky upstream's one good chunk precedes the error
    retry_after_ms: int | None = None
    upstream_usage: str | None = None  # flaky complete streams: "reported" or "estimated"

    def expected(self, body: dict[str, Any], flaky: dict[str, Any]) -> Record:
        """The record from ``plan()`` or the flaky upstream's script, or the documented error."""
        if self.error is not None and not self.partial:
            return Record(error=self.error)
        request = decode_chat_request(json.dumps(body).encode())
        record = Record(
            ids=1,
            roles=["assistant"],
            models=[body["model"]],
            usage_field="null" if request.include_usage else "absent",
        )
        if self.error is not None:
            record.text, record.error = flaky["partial_text"], self.error
            return record
        record.usage = self.usage(body, flaky) if request.include_usage else None
        if self.upstream_usage is not None:
            record.text, record.finish_reasons = flaky["tricky_text"], ["stop"]
            return record
        sim = plan(request)
        record.text, record.finish_reasons = sim.text, [sim.finish_reason]
        if sim.tool_call is not None:
            call_id, name, fragments = sim.tool_call
            record.tool_calls = [{"id": call_id, "name": name, "arguments": "".join(fragments)}]
        return record

    def usage(self, body: dict[str, Any], flaky: dict[str, Any]) -> dict[str, int]:
        """The usage of a completed stream: the sim's, the upstream's, or the estimate."""
        if self.upstream_usage == "reported":
            return dict(flaky["usage"])
        if self.upstream_usage == "estimated":
            request = decode_chat_request(json.dumps(body).encode())
            return usage_of(estimate_prompt_tokens(request), len(flaky["tricky_parts"]))
        sim = sim_plan(body)
        return usage_of(sim.prompt_tokens, sim.completion_tokens)


def sim_plan(body: dict[str, Any]) -> SimPlan:
    return plan(decode_chat_request(json.dumps(body).encode()))


def _upstream_error(status: int, type_: str, code: str | None) -> dict[str, Any]:
    return {"status": status, "type": type_, "code": code, "param": None}


INCLUDE_USAGE = {"stream_options": {"include_usage": True}}
SCENARIOS = [
    Scenario("plain", lambda m: chat_body(m)),
    Scenario("include_usage", lambda m: chat_body(m, **INCLUDE_USAGE)),
    Scenario("max_tokens", lambda m: chat_body(m, max_tokens=5, **INCLUDE_USAGE)),
    Scenario(
        "max_completion_tokens", lambda m: chat_body(m, max_completion_tokens=3, **INCLUDE_USAGE)
    ),
    # The plan for MESSAGES starts "Chunk packet silver packet cedar …": "lver" cuts inside
    # the third token, so the last streamed token is a partial one ("Chunk packet si").
    Scenario("stop", lambda m: chat_body(m, stop=["lver", "zzz"], **INCLUDE_USAGE)),
    Scenario(
        "tool_call", lambda m: chat_body(m, tools=TOOLS, tool_choice="required", **INCLUDE_USAGE)
    ),
    Scenario("seeded", lambda m: chat_body(m, seed=7, max_tokens=8)),
    Scenario(
        "unknown_model",
        lambda m: chat_body("no-such-model"),
        error={
            "status": 404,
            "type": "invalid_request_error",
            "code": "model_not_found",
            "param": "model",
        },
    ),
    Scenario(
        "bad_max_tokens",
        lambda m: chat_body(m, max_tokens=-1),
        error={
            "status": 400,
            "type": "invalid_request_error",
            "code": "invalid_value",
            "param": "max_tokens",
        },
    ),
    Scenario(
        "empty_messages",
        lambda m: chat_body(m, messages=[]),
        error={
            "status": 400,
            "type": "invalid_request_error",
            "code": "invalid_value",
            "param": "messages",
        },
    ),
    Scenario(
        "bad_role",
        lambda m: chat_body(m, messages=[{"role": "wizard", "content": "hi"}]),
        error={
            "status": 400,
            "type": "invalid_request_error",
            "code": "invalid_value",
            "param": "messages[0].role",
        },
    ),
    Scenario(
        "unsupported_n",
        lambda m: chat_body(m, n=2),
        error={
            "status": 400,
            "type": "invalid_request_error",
            "code": "unsupported_value",
            "param": "n",
        },
    ),
    Scenario(
        "upstream_text_needing_escapes",
        lambda m: chat_body(m, user_messages("unicode"), **INCLUDE_USAGE),
        backends=("flaky",),
        upstream_usage="reported",
    ),
    Scenario(
        "upstream_without_usage",
        lambda m: chat_body(m, user_messages("no-usage"), **INCLUDE_USAGE),
        backends=("flaky",),
        upstream_usage="estimated",
    ),
    Scenario(
        "upstream_503_before_first_token",
        lambda m: chat_body(m, user_messages("fail-503")),
        backends=("flaky",),
        error=_upstream_error(503, "server_error", "overloaded"),
    ),
    Scenario(
        "upstream_429_before_first_token",
        lambda m: chat_body(m, user_messages("fail-429")),
        backends=("flaky",),
        error=_upstream_error(429, "rate_limit_error", "rate_limit_exceeded"),
        retry_after_ms=3000,
    ),
    Scenario(
        "upstream_garbage_after_first_token",
        lambda m: chat_body(m, user_messages("mid-garbage")),
        backends=("flaky",),
        error=_upstream_error(502, "api_error", "upstream_error"),
        partial=True,
    ),
    Scenario(
        "upstream_error_chunk_after_first_token",
        lambda m: chat_body(m, user_messages("mid-error")),
        backends=("flaky",),
        error=_upstream_error(502, "api_error", "upstream_error"),
        partial=True,
    ),
    Scenario(
        "upstream_eof_after_first_token",
        lambda m: chat_body(m, user_messages("mid-eof")),
        backends=("flaky",),
        error=_upstream_error(502, "api_error", "upstream_error"),
        partial=True,
    ),
]

CASES = [
    pytest.param(transport, backend, scenario, id=f"{scenario.name}-{backend}-{transport}")
    for scenario in SCENARIOS
    for backend in scenario.backends
    for transport in TRANSPORTS
    if expresses(transport, scenario.body(backend))
]

# SSE records by (backend, scenario): the reference every WebSocket record must equal.
SSE_REFERENCE: dict[tuple[str, str], Observed] = {}


async def sse_reference(gateway: GatewayServer, backend: str, scenario: Scenario) -> Observed:
    key = (backend, scenario.name)
    if key not in SSE_REFERENCE:
        SSE_REFERENCE[key] = await run_sse(gateway, scenario.body(backend))
    return SSE_REFERENCE[key]


async def upstream_cancelled_once(sim_upstream: SimUpstreamServer, before: dict[str, int]) -> None:
    """The upstream request was closed, not left running: one more cancelled stream, and no
    more completed ones."""
    after = before
    for _ in range(100):
        after = await sim_stats(sim_upstream)
        if after["cancelled_streams"] > before["cancelled_streams"]:
            break
        await asyncio.sleep(0.02)
    assert after["cancelled_streams"] == before["cancelled_streams"] + 1
    assert after["completed_streams"] == before["completed_streams"]


async def sim_stats(sim_upstream: SimUpstreamServer) -> dict[str, int]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(sim_upstream.base_url + "/sim/stats") as response,
    ):
        stats: dict[str, int] = await response.json()
        return stats


def scenario_body(name: str, backend: str) -> dict[str, Any]:
    """The chat body of the named scenario."""
    return next(s for s in SCENARIOS if s.name == name).body(backend)
