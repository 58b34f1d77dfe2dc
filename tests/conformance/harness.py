"""The transport conformance harness: runners that send one request over each transport and
fold what comes back into one :class:`Record` (the scenarios are in ``scenarios.py``).

``test_transports.py`` holds every transport to Chat SSE's record; ``test_messages.py`` holds
the Messages API to the Chat SSE record of the chat request it translates to.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection, connect

from tokenwire.testing import GatewayServer

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


def usage_of(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI's usage object for these counts."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# -- the transports --------------------------------------------------------------------------


def auth_headers(gateway: GatewayServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {gateway.api_key}"}


def ws_url(gateway: GatewayServer) -> str:
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
            gateway.base_url + "/v1/chat/completions", json=body, headers=auth_headers(gateway)
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
    async with connect(ws_url(gateway), additional_headers=auth_headers(gateway)) as ws:
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


def create_message(request_id: str, body: dict[str, Any]) -> str:
    return json.dumps({"type": "chat.completion.create", "request_id": request_id, "body": body})


async def run_ws_envelope(
    gateway: GatewayServer, body: dict[str, Any], *, on_chunk: OnChunk | None = None
) -> Observed:
    """Envelope mode: ``chat.completion.create``; chunks, then ``done`` or ``error``."""
    async with connect(ws_url(gateway), additional_headers=auth_headers(gateway)) as ws:
        await ws.send(create_message("req-1", body))
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
        record.usage = usage_of(usage["input_tokens"], usage["output_tokens"])
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
            headers=auth_headers(gateway),
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


def responses_ws_url(gateway: GatewayServer) -> str:
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
    async with connect(responses_ws_url(gateway), additional_headers=auth_headers(gateway)) as ws:
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
