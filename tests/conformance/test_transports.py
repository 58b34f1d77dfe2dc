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
``max_tokens`` and reports usage, so it is held, at the end of this module, to the Chat SSE
record of the chat request it translates to.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tokenwire.accounting.budget import estimate_prompt_tokens
from tokenwire.providers.sim import SimPlan, plan
from tokenwire.testing import GatewayServer, SimUpstreamServer
from tokenwire.wire import anthropic as wire
from tokenwire.wire.schema import decode_chat_request

RECV_TIMEOUT_S = 10.0
ENVELOPE_FIELDS = ("type", "request_id", "sequence_number")
ERROR_FIELDS = ("status", "type", "code", "param", "message")

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a conformance test."},
    {"role": "user", "content": "Say the same thing over every transport"},
]
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


# -- the normalised record -------------------------------------------------------------------


@dataclass
class Record:
    """What a client learns from one request, whatever the transport."""

    text: str = ""
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = None  # the usage chunk (only when include_usage was asked)
    error: dict[str, Any] | None = None  # status, type, code, param, message
    ids: int = 0  # distinct chunk ids: 1 for a stream, 0 when it failed before any chunk
    roles: list[str] = field(default_factory=list)  # every delta.role seen, in order
    models: list[str] = field(default_factory=list)  # distinct chunk models
    usage_field: str = "none"  # "usage" on choice chunks: "null", "absent", or "none" (no chunk)

    def without_message(self) -> Record:
        """The record with the error's human-readable message dropped."""
        if self.error is None:
            return self
        error = {k: v for k, v in self.error.items() if k != "message"}
        return Record(**{**self.__dict__, "error": error})


@dataclass
class Observed:
    """A record plus the transport-specific details the checks need."""

    record: Record
    stream_id: str | None = None  # X-Stream-Id (SSE) or done.stream_id (envelope)
    numbers: list[int] = field(default_factory=list)  # SSE ids / envelope sequence numbers
    finish_number: int | None = None  # SSE id / sequence number of the finish chunk
    done: dict[str, Any] | None = None  # envelope chat.completion.done
    retry_after_ms: int | None = None  # SSE Retry-After header or envelope retry_after_ms
    raw: list[str] = field(default_factory=list)  # canonical finish/usage chunk and error JSON


_ENVELOPE_SUFFIX = re.compile(
    r',"type":"chat\.completion\.chunk","request_id":"[^"]*","sequence_number":\d+}$'
)


def canonical(text: str) -> str:
    """Message text with the per-completion ``id`` and ``created`` blanked out."""
    text = re.sub(r'"id":"chatcmpl-[A-Za-z0-9_-]+"', '"id":"chatcmpl-X"', text)
    return re.sub(r'"created":\d+', '"created":0', text)


def _is_tail(chunk: dict[str, Any]) -> bool:
    """The finish chunk or the usage chunk: never merged, so byte-comparable."""
    choices = chunk["choices"]
    return not choices or choices[0]["finish_reason"] is not None


def normalise_error(error: dict[str, Any], status: int | None = None) -> dict[str, Any]:
    """An error object reduced to the fields every transport must agree on."""
    assert isinstance(error, dict), error
    assert {"message", "type", "param", "code"} <= error.keys(), error
    merged = {**error, "status": error.get("status") if status is None else status}
    return {k: merged[k] for k in ERROR_FIELDS}


def fold(chunks: list[dict[str, Any]], error: dict[str, Any] | None) -> Record:
    """Fold OpenAI ``chat.completion.chunk`` objects (and an error, if any) into a record."""
    record = Record(error=error)
    text: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    ids: set[str] = set()
    models: set[str] = set()
    usage_fields: set[str] = set()
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk", chunk
        assert isinstance(chunk["created"], int), chunk
        ids.add(chunk["id"])
        models.add(chunk["model"])
        choices = chunk["choices"]
        if not choices:  # the trailing usage chunk
            assert record.usage is None, "two usage chunks"
            assert record.finish_reasons and chunk is chunks[-1], "usage chunk not at the end"
            record.usage = chunk["usage"]
            continue
        usage_fields.add("absent" if "usage" not in chunk else "null")
        if "usage" in chunk:
            assert chunk["usage"] is None, chunk
        (choice,) = choices
        assert choice["index"] == 0, chunk
        assert not record.finish_reasons, f"a chunk after the finish chunk: {chunk}"
        delta = choice["delta"]
        if "role" in delta:
            record.roles.append(delta["role"])
        if delta.get("content"):
            text.append(delta["content"])
        for call in delta.get("tool_calls") or ():
            entry = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.get("id") or ""
            entry["name"] += (call.get("function") or {}).get("name") or ""
            entry["arguments"] += (call.get("function") or {}).get("arguments") or ""
        if choice["finish_reason"] is not None:
            record.finish_reasons.append(choice["finish_reason"])
    record.text = "".join(text)
    record.tool_calls = [calls[i] for i in sorted(calls)]
    record.ids = len(ids)
    record.models = sorted(models)
    record.usage_field = "+".join(sorted(usage_fields)) or "none"
    return record


# -- the transports --------------------------------------------------------------------------


def _auth(gateway: GatewayServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {gateway.api_key}"}


def _ws_url(gateway: GatewayServer) -> str:
    return gateway.base_url.replace("http://", "ws://") + "/v1/ws/chat"


async def _sse_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[int | None, str]]:
    """``(id, data)`` for each SSE event (a small independent parser; comments skipped)."""
    event_id: int | None = None
    data: list[str] = []
    async for raw in content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: "):
            data.append(line[6:])
        else:
            raise AssertionError(f"unexpected SSE line {line!r}")
    assert not data, "stream ended inside an event"


async def run_sse(gateway: GatewayServer, body: dict[str, Any]) -> Observed:
    """``POST /v1/chat/completions`` with ``stream: true``."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(
            gateway.base_url + "/v1/chat/completions", json=body, headers=_auth(gateway)
        ) as response,
    ):
        if response.status != 200:
            assert response.content_type == "application/json"
            payload = await response.json()
            assert payload.keys() == {"error"}, payload
            retry_after = response.headers.get("Retry-After")
            return Observed(
                fold([], normalise_error(payload["error"], response.status)),
                retry_after_ms=None if retry_after is None else int(retry_after) * 1000,
            )
        assert response.content_type == "text/event-stream"
        stream_id = response.headers["x-stream-id"]
        events = [event async for event in _sse_events(response.content)]
    assert events, "empty SSE stream"
    assert events[-1] == (None, "[DONE]"), events[-1]
    chunks: list[dict[str, Any]] = []
    numbers: list[int] = []
    error: dict[str, Any] | None = None
    finish_number: int | None = None
    raw: list[str] = []
    for event_id, data in events[:-1]:
        assert data != "[DONE]", "[DONE] twice"
        assert error is None, f"an event after the in-band error: {data}"
        payload = json.loads(data)
        if "error" in payload:
            assert event_id is None, "the in-band error carries no id"
            assert payload.keys() == {"error"}, payload
            error = normalise_error(payload["error"])
            raw.append(canonical(data))
            continue
        assert event_id is not None, f"chunk without id: {data}"
        numbers.append(event_id)
        chunks.append(payload)
        if _is_tail(payload):
            raw.append(canonical(data))
            if payload["choices"]:
                finish_number = event_id
    assert numbers == sorted(set(numbers)), f"SSE ids not increasing: {numbers}"
    assert {c["id"] for c in chunks} <= {stream_id}, "chunk ids differ from X-Stream-Id"
    return Observed(
        fold(chunks, error),
        stream_id=stream_id,
        numbers=numbers,
        finish_number=finish_number,
        raw=raw,
    )


async def recv_text(ws: ClientConnection) -> str:
    message = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
    assert isinstance(message, str), f"binary frame: {message!r}"
    return message


async def assert_nothing_trailing(ws: ClientConnection) -> None:
    """Ping and expect the pong next: nothing else was pending for this socket."""
    await ws.send(json.dumps({"type": "ping"}))
    assert await recv_text(ws) == '{"type":"pong"}'


async def collect_compat(ws: ClientConnection) -> Observed:
    """One compatible-mode reply: chunk JSON, or ``{"error"}``, then ``[DONE]``."""
    chunks: list[dict[str, Any]] = []
    raw: list[str] = []
    error: dict[str, Any] | None = None
    while (text := await recv_text(ws)) != "[DONE]":
        assert error is None, f"a message after the error: {text}"
        payload = json.loads(text)
        if "error" in payload:
            assert payload.keys() == {"error"}, payload
            assert payload["error"].keys() == {"message", "type", "param", "code", "status"}
            error = normalise_error(payload["error"])
            raw.append(canonical(text))
        else:
            assert "type" not in payload and "request_id" not in payload, payload
            chunks.append(payload)
            if _is_tail(payload):
                raw.append(canonical(text))
    ids = {c["id"] for c in chunks}
    return Observed(
        fold(chunks, error), stream_id=next(iter(ids)) if len(ids) == 1 else None, raw=raw
    )


async def run_ws_compat(gateway: GatewayServer, body: dict[str, Any]) -> Observed:
    """Compatible mode: the plain body in; chunk JSON, or ``{"error"}``, then ``[DONE]``."""
    async with connect(_ws_url(gateway), additional_headers=_auth(gateway)) as ws:
        await ws.send(json.dumps(body))
        observed = await collect_compat(ws)
        await assert_nothing_trailing(ws)
    return observed


@dataclass
class _Envelope:
    """One envelope request's messages, as they arrive."""

    chunks: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    finish_number: int | None = None
    error: dict[str, Any] | None = None
    retry_after_ms: int | None = None
    done: dict[str, Any] | None = None

    def observed(self) -> Observed:
        numbers = self.numbers
        assert numbers == sorted(set(numbers)) and all(n >= 1 for n in numbers), numbers
        stream_id: str | None = None
        if self.done is not None:
            stream_id = self.done["stream_id"]
            ids = {c["id"] for c in self.chunks}
            assert ids <= {stream_id}, "chunk ids differ from done.stream_id"
            assert not numbers or self.done["sequence_number"] >= numbers[-1], self.done
        return Observed(
            fold(self.chunks, self.error),
            stream_id=stream_id,
            numbers=numbers,
            finish_number=self.finish_number,
            done=self.done,
            retry_after_ms=self.retry_after_ms,
            raw=self.raw,
        )


OnChunk = Callable[[ClientConnection, str, int], Awaitable[None]]


async def collect_envelopes(
    ws: ClientConnection, request_ids: list[str], on_chunk: OnChunk | None = None
) -> dict[str, Observed]:
    """Demultiplex envelope messages by ``request_id`` until each request has ended."""
    results = {request_id: _Envelope() for request_id in request_ids}
    running = set(request_ids)
    while running:
        text = await recv_text(ws)
        message = json.loads(text)
        request_id = message.get("request_id")
        assert request_id in running, f"message for no running request: {message}"
        result = results[request_id]
        kind = message["type"]
        if kind == "chat.completion.chunk":
            number = message["sequence_number"]
            result.numbers.append(number)
            chunk = {k: v for k, v in message.items() if k not in ENVELOPE_FIELDS}
            result.chunks.append(chunk)
            if _is_tail(chunk):
                # "the OpenAI chunk, fields added, none removed": the SSE bytes plus a suffix.
                assert _ENVELOPE_SUFFIX.search(text), text
                result.raw.append(canonical(_ENVELOPE_SUFFIX.sub("}", text)))
                if chunk["choices"]:
                    result.finish_number = number
            if on_chunk is not None:
                await on_chunk(ws, request_id, len(result.chunks))
        elif kind == "chat.completion.done":
            result.done = message
            running.discard(request_id)
        elif kind == "error":
            assert message.keys() == {"type", "request_id", "error"}, message
            result.retry_after_ms = message["error"].get("retry_after_ms")
            result.error = normalise_error(message["error"])
            running.discard(request_id)
        else:
            raise AssertionError(f"unexpected message {message}")
    return {request_id: result.observed() for request_id, result in results.items()}


def _create(request_id: str, body: dict[str, Any]) -> str:
    return json.dumps({"type": "chat.completion.create", "request_id": request_id, "body": body})


async def run_ws_envelope(
    gateway: GatewayServer, body: dict[str, Any], *, on_chunk: OnChunk | None = None
) -> Observed:
    """Envelope mode: ``chat.completion.create``; chunks, then ``done`` or ``error``."""
    async with connect(_ws_url(gateway), additional_headers=_auth(gateway)) as ws:
        await ws.send(_create("req-1", body))
        observed = await collect_envelopes(ws, ["req-1"], on_chunk)
        await assert_nothing_trailing(ws)  # in particular: no done after an error
    return observed["req-1"]


# -- the Responses API -----------------------------------------------------------------------

#: A Responses error ``param`` as Chat Completions names the same field.
CHAT_PARAMS = {"input": "messages", "input[0].role": "messages[0].role"}
CHAT_PARAMS["max_output_tokens"] = "max_tokens"
FINISH = {"max_output_tokens": "length", "content_filter": "content_filter"}


def responses_body(body: dict[str, Any]) -> dict[str, Any]:
    """A chat body in the Responses API's words (messages become input items, in order)."""
    converted: dict[str, Any] = {
        "model": body["model"],
        "input": [{"role": m["role"], "content": m["content"]} for m in body["messages"]],
    }
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        converted["max_output_tokens"] = limit
    if "tools" in body:
        converted["tools"] = [{"type": "function", **t["function"]} for t in body["tools"]]
    if "tool_choice" in body:
        converted["tool_choice"] = body["tool_choice"]
    return converted


def chat_error(error: dict[str, Any]) -> dict[str, Any]:
    """A Responses error normalised, its ``param`` named as Chat names it."""
    normalised = normalise_error(error)
    normalised["param"] = CHAT_PARAMS.get(normalised["param"], normalised["param"])
    return normalised


def fold_responses(
    events: list[dict[str, Any]], error: dict[str, Any] | None, include_usage: bool
) -> Record:
    """Fold Responses events into the record Chat would give (usage only if Chat asked)."""
    if not events:
        return Record(error=error)
    assert events[0]["type"] == "response.created", events[0]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]
    assert final["type"] in ("response.completed", "response.incomplete", "response.failed")
    response = final["response"]
    assert {e.get("response", response)["id"] for e in events} == {response["id"]}
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    calls = [item for item in response["output"] if item["type"] == "function_call"]
    record = Record(
        text=text,
        tool_calls=[
            {"id": c["call_id"], "name": c["name"], "arguments": c["arguments"]} for c in calls
        ],
        ids=1,
        roles=["assistant"],
        models=[response["model"]],
        usage_field="null" if include_usage else "absent",
    )
    if final["type"] == "response.failed":
        assert error is None
        record.error = chat_error(response["error"])
        return record
    messages = [item for item in response["output"] if item["type"] == "message"]
    assert "".join(p["text"] for m in messages for p in m["content"]) == text
    if response["status"] == "cancelled":
        record.finish_reasons = ["cancelled"]
    elif response["status"] == "incomplete":
        record.finish_reasons = [FINISH[response["incomplete_details"]["reason"]]]
    else:
        record.finish_reasons = ["tool_calls" if calls else "stop"]
    if include_usage:
        usage = response["usage"]
        record.usage = _usage(usage["input_tokens"], usage["output_tokens"])
    return record


async def _named_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str, int, str]]:
    """``(event, id, data)`` for each SSE event of a Responses stream (comments skipped)."""
    fields: dict[str, str] = {}
    async for raw in content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if fields:
                yield fields["event"], int(fields["id"]), fields["data"]
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            assert name in ("event", "id", "data", "retry") and name not in fields, line
            fields[name] = value
    assert not fields, "stream ended inside an event"


async def run_responses_sse(gateway: GatewayServer, body: dict[str, Any]) -> Observed:
    """``POST /v1/responses`` with ``stream: true``."""
    include_usage = bool(body.get("stream_options", {}).get("include_usage"))
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(
            gateway.base_url + "/v1/responses",
            json={**responses_body(body), "stream": True},
            headers=_auth(gateway),
        ) as response,
    ):
        if response.status != 200:
            payload = await response.json()
            assert payload.keys() == {"error"}, payload
            retry_after = response.headers.get("Retry-After")
            return Observed(
                fold([], chat_error({**payload["error"], "status": response.status})),
                retry_after_ms=None if retry_after is None else int(retry_after) * 1000,
            )
        assert response.content_type == "text/event-stream"
        stream_id = response.headers["x-stream-id"]
        events = []
        async for name, number, data in _named_events(response.content):
            event = json.loads(data)
            assert event["type"] == name and event["sequence_number"] == number, data
            events.append(event)
    final = events[-1]["response"]
    assert final["id"] == stream_id
    return Observed(fold_responses(events, None, include_usage), stream_id=stream_id, done=final)


def _responses_ws_url(gateway: GatewayServer) -> str:
    return gateway.base_url.replace("http://", "ws://") + "/v1/responses"


async def collect_responses(ws: ClientConnection, include_usage: bool) -> Observed:
    """One ``response.create``'s events until its end, or its ``error`` event."""
    events: list[dict[str, Any]] = []
    while True:
        message = json.loads(await recv_text(ws))
        if message["type"] == "error":
            assert not events, "an error event after the response began"
            assert message.keys() == {"type", "status", "error"}, message
            headers = message["error"].pop("headers", {})
            error = {**message["error"], "status": message["status"]}
            retry = headers.get("Retry-After")
            return Observed(
                fold([], chat_error(error)),
                retry_after_ms=None if retry is None else int(retry) * 1000,
            )
        assert "stream_id" not in message, message
        events.append(message)
        if message["type"] in ("response.completed", "response.incomplete", "response.failed"):
            final = message["response"]
            record = fold_responses(events, None, include_usage)
            return Observed(record, stream_id=final["id"], done=final)


async def run_responses_ws(gateway: GatewayServer, body: dict[str, Any]) -> Observed:
    """``/v1/responses`` over WebSocket: ``response.create``; its events, or an ``error``."""
    include_usage = bool(body.get("stream_options", {}).get("include_usage"))
    async with connect(_responses_ws_url(gateway), additional_headers=_auth(gateway)) as ws:
        await ws.send(json.dumps({"type": "response.create", **responses_body(body)}))
        observed = await collect_responses(ws, include_usage)
        await assert_nothing_trailing(ws)
    return observed


Runner = Callable[[GatewayServer, dict[str, Any]], Awaitable[Observed]]
TRANSPORTS: dict[str, Runner] = {
    "sse": run_sse,
    "ws-compat": run_ws_compat,
    "ws-envelope": run_ws_envelope,
    "responses-sse": run_responses_sse,
    "responses-ws": run_responses_ws,
}
#: Chat body fields a transport's API has no words for: scenarios using them skip it.
CANNOT_EXPRESS: dict[str, frozenset[str]] = {
    "responses-sse": frozenset({"stop", "seed", "n"}),
    "responses-ws": frozenset({"stop", "seed", "n"}),
}


def expresses(transport: str, body: dict[str, Any]) -> bool:
    """Whether ``transport``'s API can say everything ``body`` asks."""
    return not CANNOT_EXPRESS.get(transport, frozenset()) & body.keys()


# -- the scenarios ---------------------------------------------------------------------------


def _body(model: str, messages: list[dict[str, Any]] = MESSAGES, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": messages, "stream": True, **extra}


def _user(content: str) -> list[dict[str, Any]]:
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
            return _usage(estimate_prompt_tokens(request), len(flaky["tricky_parts"]))
        sim = _plan(body)
        return _usage(sim.prompt_tokens, sim.completion_tokens)


def _plan(body: dict[str, Any]) -> SimPlan:
    return plan(decode_chat_request(json.dumps(body).encode()))


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _upstream_error(status: int, type_: str, code: str | None) -> dict[str, Any]:
    return {"status": status, "type": type_, "code": code, "param": None}


INCLUDE_USAGE = {"stream_options": {"include_usage": True}}
SCENARIOS = [
    Scenario("plain", lambda m: _body(m)),
    Scenario("include_usage", lambda m: _body(m, **INCLUDE_USAGE)),
    Scenario("max_tokens", lambda m: _body(m, max_tokens=5, **INCLUDE_USAGE)),
    Scenario("max_completion_tokens", lambda m: _body(m, max_completion_tokens=3, **INCLUDE_USAGE)),
    # The plan for MESSAGES starts "Chunk packet silver packet cedar …": "lver" cuts inside
    # the third token, so the last streamed token is a partial one ("Chunk packet si").
    Scenario("stop", lambda m: _body(m, stop=["lver", "zzz"], **INCLUDE_USAGE)),
    Scenario("tool_call", lambda m: _body(m, tools=TOOLS, tool_choice="required", **INCLUDE_USAGE)),
    Scenario("seeded", lambda m: _body(m, seed=7, max_tokens=8)),
    Scenario(
        "unknown_model",
        lambda m: _body("no-such-model"),
        error={
            "status": 404,
            "type": "invalid_request_error",
            "code": "model_not_found",
            "param": "model",
        },
    ),
    Scenario(
        "bad_max_tokens",
        lambda m: _body(m, max_tokens=-1),
        error={
            "status": 400,
            "type": "invalid_request_error",
            "code": "invalid_value",
            "param": "max_tokens",
        },
    ),
    Scenario(
        "empty_messages",
        lambda m: _body(m, messages=[]),
        error={
            "status": 400,
            "type": "invalid_request_error",
            "code": "invalid_value",
            "param": "messages",
        },
    ),
    Scenario(
        "bad_role",
        lambda m: _body(m, messages=[{"role": "wizard", "content": "hi"}]),
        error={
            "status": 400,
            "type": "invalid_request_error",
            "code": "invalid_value",
            "param": "messages[0].role",
        },
    ),
    Scenario(
        "unsupported_n",
        lambda m: _body(m, n=2),
        error={
            "status": 400,
            "type": "invalid_request_error",
            "code": "unsupported_value",
            "param": "n",
        },
    ),
    Scenario(
        "upstream_text_needing_escapes",
        lambda m: _body(m, _user("unicode"), **INCLUDE_USAGE),
        backends=("flaky",),
        upstream_usage="reported",
    ),
    Scenario(
        "upstream_without_usage",
        lambda m: _body(m, _user("no-usage"), **INCLUDE_USAGE),
        backends=("flaky",),
        upstream_usage="estimated",
    ),
    Scenario(
        "upstream_503_before_first_token",
        lambda m: _body(m, _user("fail-503")),
        backends=("flaky",),
        error=_upstream_error(503, "server_error", "overloaded"),
    ),
    Scenario(
        "upstream_429_before_first_token",
        lambda m: _body(m, _user("fail-429")),
        backends=("flaky",),
        error=_upstream_error(429, "rate_limit_error", "rate_limit_exceeded"),
        retry_after_ms=3000,
    ),
    Scenario(
        "upstream_garbage_after_first_token",
        lambda m: _body(m, _user("mid-garbage")),
        backends=("flaky",),
        error=_upstream_error(502, "api_error", "upstream_error"),
        partial=True,
    ),
    Scenario(
        "upstream_error_chunk_after_first_token",
        lambda m: _body(m, _user("mid-error")),
        backends=("flaky",),
        error=_upstream_error(502, "api_error", "upstream_error"),
        partial=True,
    ),
    Scenario(
        "upstream_eof_after_first_token",
        lambda m: _body(m, _user("mid-eof")),
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
_SSE_REFERENCE: dict[tuple[str, str], Observed] = {}


async def sse_reference(gateway: GatewayServer, backend: str, scenario: Scenario) -> Observed:
    key = (backend, scenario.name)
    if key not in _SSE_REFERENCE:
        _SSE_REFERENCE[key] = await run_sse(gateway, scenario.body(backend))
    return _SSE_REFERENCE[key]


# -- the tests -------------------------------------------------------------------------------


def test_scenarios_exercise_what_they_claim() -> None:
    """Guard the plan-dependent scenarios: the stop really cuts, the limits really bind."""
    scenarios = {s.name: s for s in SCENARIOS}
    full = _plan(_body("sim"))
    assert full.finish_reason == "stop" and len(full.tokens) == 16
    cut = _plan(scenarios["stop"].body("sim"))
    assert cut.finish_reason == "stop" and 0 < len(cut.text) < len(full.text)
    assert full.text.startswith(cut.text)
    assert full.text[len(cut.text) :].startswith("lver")
    assert cut.tokens[-1] not in full.tokens  # a token cut in the middle
    for name, limit in (("max_tokens", 5), ("max_completion_tokens", 3), ("seeded", 8)):
        limited = _plan(scenarios[name].body("sim"))
        assert limited.finish_reason == "length" and len(limited.tokens) == limit
    assert _plan(scenarios["seeded"].body("sim")).text != _plan(_body("sim", max_tokens=8)).text
    assert _plan(scenarios["tool_call"].body("sim")).tool_call is not None


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
        _SSE_REFERENCE.setdefault((backend, scenario.name), observed)
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
    body = _body(backend, max_tokens=4000, **INCLUDE_USAGE)  # ~4 s at 1 ms a token
    full = _plan(body)
    before = await _sim_stats(sim_upstream)
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
        await _upstream_cancelled_once(sim_upstream, before)


async def test_envelope_cancel_before_the_first_token(conformance_gateway: GatewayServer) -> None:
    """A cancel while the upstream is silent: a ``cancelled`` finish chunk, 0 tokens, ``done``."""
    body = _body("flaky", _user("hang"), **INCLUDE_USAGE)
    async with connect(
        _ws_url(conformance_gateway), additional_headers=_auth(conformance_gateway)
    ) as ws:
        await ws.send(_create("hung", body))
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
        _ws_url(conformance_gateway), additional_headers=_auth(conformance_gateway)
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
        _ws_url(conformance_gateway), additional_headers=_auth(conformance_gateway)
    ) as ws:
        for request_id, (backend, scenario) in cases.items():
            await ws.send(_create(request_id, scenario.body(backend)))
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
    body = _body("instant-sim", max_tokens=20_000, **INCLUDE_USAGE)
    scenario = Scenario("large", lambda _m: body)
    reference = await run_sse(conformance_gateway, body)
    assert reference.record.without_message() == scenario.expected(body, flaky_script)
    url, headers = _ws_url(conformance_gateway), _auth(conformance_gateway)
    async with connect(url, additional_headers=headers, max_queue=1) as ws:
        await ws.send(_create("slow", body))
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


async def _upstream_cancelled_once(sim_upstream: SimUpstreamServer, before: dict[str, int]) -> None:
    """The upstream request was closed, not left running: one more cancelled stream, and no
    more completed ones."""
    after = before
    for _ in range(100):
        after = await _sim_stats(sim_upstream)
        if after["cancelled_streams"] > before["cancelled_streams"]:
            break
        await asyncio.sleep(0.02)
    assert after["cancelled_streams"] == before["cancelled_streams"] + 1
    assert after["completed_streams"] == before["completed_streams"]


async def _sim_stats(sim_upstream: SimUpstreamServer) -> dict[str, int]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(sim_upstream.base_url + "/sim/stats") as response,
    ):
        stats: dict[str, int] = await response.json()
        return stats


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
    body = _body(backend, max_tokens=4000, **INCLUDE_USAGE)  # ~4 s at 1 ms a token
    full = _plan(body)
    before = await _sim_stats(sim_upstream)
    url, headers = _responses_ws_url(conformance_gateway), _auth(conformance_gateway)
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
        await _upstream_cancelled_once(sim_upstream, before)


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
    url, headers = _responses_ws_url(conformance_gateway), _auth(conformance_gateway)
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
    slow = responses_body(_body("flaky", _user("hang")))
    fast = responses_body(_body("sim"))
    url, headers = _responses_ws_url(conformance_gateway), _auth(conformance_gateway)
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
                gateway.base_url + "/v1/usage?limit=1000", headers=_auth(gateway)
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
    body = _body("priced-sim", max_tokens=7, **INCLUDE_USAGE)
    rows = {}
    for transport, run in TRANSPORTS.items():
        observed = await run(conformance_gateway, body)
        assert observed.stream_id is not None, transport
        rows[transport] = await _ledger_row(conformance_gateway, observed.stream_id)
    sim = _plan(body)
    for transport, row in rows.items():
        assert row["api"] == ("responses" if transport.startswith("responses-") else "chat")
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            sim.prompt_tokens,
            sim.completion_tokens,
        ), transport
        assert row["cost_micro"] == 3 * sim.prompt_tokens + 15 * sim.completion_tokens > 0
        assert row["status"] == "completed" and row["finish_reason"] == "length"


# -- Messages SSE ------------------------------------------------------------------------------
#
# Each scenario the Messages API can express is sent as a Messages body (POST /v1/messages,
# stream: true) and as the chat body it translates to (over SSE, with usage), against the same
# backends. The Anthropic events are folded into a Record (text, tool calls, finish reason
# through the documented stop-reason mapping, usage) that must equal the chat record; an error
# has the same HTTP status, or (after the stream began) is an error event of the type Anthropic
# gives that status. The Messages API always states max_tokens, so the chat body does too (16
# when the scenario has none: the simulator's default answer length).

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
    before = await _sim_stats(sim_upstream)
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
        await _upstream_cancelled_once(sim_upstream, before)


def scenario_body(name: str, backend: str) -> dict[str, Any]:
    """The chat body of the named scenario."""
    return next(s for s in SCENARIOS if s.name == name).body(backend)
