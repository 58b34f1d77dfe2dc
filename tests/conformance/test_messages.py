"""Messages SSE conformance.

Each scenario the Messages API can express is sent as a Messages body (POST /v1/messages,
stream: true) and as the chat body it translates to (over SSE, with usage), against the same
backends. The Anthropic events are folded into a Record (text, tool calls, finish reason
through the documented stop-reason mapping, usage) that must equal the chat record; an error
has the same HTTP status, or (after the stream began) is an error event of the type Anthropic
gives that status. The Messages API always states max_tokens, so the chat body does too (16
when the scenario has none: the simulator's default answer length).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from tests.conformance.harness import (
    Record,
    run_sse,
)
from tests.conformance.scenarios import (
    INCLUDE_USAGE,
    SCENARIOS,
    Scenario,
    scenario_body,
    sim_stats,
    upstream_cancelled_once,
)

from tokenwire.testing import GatewayServer, SimUpstreamServer
from tokenwire.wire import anthropic as wire

DEFAULT_MAX_TOKENS = 16
NOT_EXPRESSIBLE = {"seeded", "unsupported_n"}  # seed and n have no Messages equivalent
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def messages_body(chat: dict[str, Any]) -> dict[str, Any]:
    """The Messages request that means the chat request ``chat``."""
    system = [m["content"] for m in chat["messages"] if m.get("role") == "system"]
    body: dict[str, Any] = {
        "model": chat["model"],
        "max_tokens": chat.get("max_tokens", chat.get("max_completion_tokens", DEFAULT_MAX_TOKENS)),
        "messages": [m for m in chat["messages"] if m.get("role") != "system"],
        "stream": True,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if "stop" in chat:
        body["stop_sequences"] = chat["stop"]
    if "tools" in chat:
        body["tools"] = [
            {"name": t["function"]["name"], "input_schema": t["function"]["parameters"]}
            for t in chat["tools"]
        ]
        body["tool_choice"] = {"type": "any"}  # the scenarios force a call ("required")
    return body


def chat_reference(chat: dict[str, Any]) -> dict[str, Any]:
    """The chat request a Messages body becomes: a stated token limit, usage reported."""
    body = {k: v for k, v in chat.items() if k != "max_completion_tokens"}
    body["max_tokens"] = chat.get(
        "max_tokens", chat.get("max_completion_tokens", DEFAULT_MAX_TOKENS)
    )
    return {**body, **INCLUDE_USAGE}


async def _anthropic_events(
    content: aiohttp.StreamReader,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """``(event, data)`` per SSE event; the event name must equal the data's ``type``."""
    name, data = "", ""
    async for raw in content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                payload = json.loads(data)
                assert payload["type"] == name, (name, payload)
                yield name, payload
            name, data = "", ""
        elif line.startswith(("id: ", "retry: ")):
            continue
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        else:
            raise AssertionError(f"unexpected SSE line {line!r}")


def _record(events: list[tuple[str, dict[str, Any]]], model: str) -> Record:
    """The chat-suite record of one Anthropic event stream (its order checked on the way)."""
    names = [name for name, _ in events]
    assert names[0] == "message_start", names
    start = events[0][1]["message"]
    assert start["model"] == model and start["content"] == [] and start["stop_reason"] is None
    record = Record(ids=1, roles=["assistant"], models=[model], usage_field="null")
    text: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    for name, data in events[1:]:
        if name == "content_block_start" and data["content_block"]["type"] == "tool_use":
            block = data["content_block"]
            calls[data["index"]] = {"id": block["id"], "name": block["name"], "arguments": ""}
        elif name == "content_block_delta":
            delta = data["delta"]
            if delta["type"] == "text_delta":
                text.append(delta["text"])
            else:
                calls[data["index"]]["arguments"] += delta["partial_json"]
        elif name == "message_delta":
            reverse = {v: k for k, v in STOP_REASONS.items()}
            record.finish_reasons.append(reverse[data["delta"]["stop_reason"]])
            usage = data["usage"]
            prompt, completion = usage["input_tokens"], usage["output_tokens"]
            record.usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        elif name == "error":
            record.error = {"type": data["error"]["type"]}
            assert (name, data) == events[-1], "events after an error"
    if record.error is None:
        assert names[-2:] == ["message_delta", "message_stop"], names
    record.text = "".join(text)
    record.tool_calls = [calls[i] for i in sorted(calls)]
    return record


async def run_messages(gateway: GatewayServer, body: dict[str, Any]) -> tuple[int, Any]:
    """``POST /v1/messages``: (status, the stream's record or the error body)."""
    timeout = aiohttp.ClientTimeout(total=30)
    headers = {"x-api-key": gateway.api_key, "anthropic-version": wire.ANTHROPIC_VERSION}
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(gateway.base_url + "/v1/messages", json=body, headers=headers) as response,
    ):
        if response.status != 200:
            assert response.content_type == "application/json"
            return response.status, await response.json()
        assert response.content_type == "text/event-stream"
        assert response.headers["x-stream-id"].startswith("msg_")
        events = [event async for event in _anthropic_events(response.content)]
        return 200, _record(events, body["model"])


MESSAGES_CASES = [
    pytest.param(backend, scenario, id=f"{scenario.name}-{backend}")
    for scenario in SCENARIOS
    if scenario.name not in NOT_EXPRESSIBLE
    for backend in scenario.backends
]


@pytest.mark.parametrize(("backend", "scenario"), MESSAGES_CASES)
async def test_messages_sse_equals_chat_sse(
    conformance_gateway: GatewayServer, backend: str, scenario: Scenario
) -> None:
    """Same text, tool calls, finish reason, usage and error status as Chat Completions SSE."""
    chat = scenario.body(backend)
    reference = (await run_sse(conformance_gateway, chat_reference(chat))).record
    status, observed = await run_messages(conformance_gateway, messages_body(chat))
    if reference.error is not None and not reference.ids:  # refused before the stream
        assert status == reference.error["status"], observed
        assert observed["type"] == "error"
        error = observed["error"]
        assert error["type"] == wire.error_type(reference.error["status"], reference.error["type"])
        if reference.error["param"] is not None:
            assert error["message"].startswith(reference.error["param"])
        return
    assert status == 200, observed
    if reference.error is not None:  # failed within the stream: the text so far, then error
        expected_type = wire.error_type(reference.error["status"], reference.error["type"])
        reference = Record(**{**reference.__dict__, "error": {"type": expected_type}})
        reference.usage = None
    assert observed == reference


@pytest.mark.parametrize("backend", ["sim", "proxied-sim"])
async def test_leaving_a_messages_stream_cancels_the_upstream(
    conformance_gateway: GatewayServer, sim_upstream: SimUpstreamServer, backend: str
) -> None:
    """A Messages client that disconnects after its first delta: the upstream request closes."""
    body = messages_body(scenario_body("plain", backend))
    body["max_tokens"] = 4000  # about 4 s at 1 ms a token: still running when the client leaves
    before = await sim_stats(sim_upstream)
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(
            conformance_gateway.base_url + "/v1/messages",
            json=body,
            headers={"x-api-key": conformance_gateway.api_key},
        ) as response,
    ):
        async for name, _ in _anthropic_events(response.content):
            if name == "content_block_delta":
                break
    live = conformance_gateway.state.completions.live
    for _ in range(500):  # polling, bounded: the generation ends when its reader left
        if not live:
            break
        await asyncio.sleep(0.01)
    assert not live, "the generation outlived its only reader"
    if backend == "proxied-sim":
        await upstream_cancelled_once(sim_upstream, before)
