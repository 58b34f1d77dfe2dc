"""A loopback fake of Anthropic's Messages API (``POST /v1/messages``, streaming only).

It speaks the wire format of Anthropic's streaming docs (``event:`` and ``data:`` lines, JSON
as the docs print it) so the Anthropic provider can be tested, alone or behind a real
gateway, without the network. Two ways to run it::

    async with AnthropicFake() as fake:     # on the running event loop (async clients)
        ...
    with AnthropicFake() as fake:           # on its own thread (sync clients, GatewayServer)
        ...

**Checks**, answered like Anthropic with ``{"type": "error", "error": {"type", "message"}}``:
``x-api-key`` must equal ``api_key`` (else 401), ``anthropic-version`` must be ``2023-06-01``
(else 400); the body must be a valid streaming request: ``model``, ``max_tokens`` >= 1,
``stream: true``, strictly alternating user/assistant turns starting with user, no empty text
blocks, ``tool_result`` blocks first in a user turn and answering a ``tool_use`` of the turn
before, ``temperature`` and ``top_p`` within 0..1, a forced ``tool_choice`` only with ``tools``.

**Reply** (:func:`plan_reply`, pure, so tests can compute it): ``"Echo: "`` and the text of the
last user turn (its tool results when it has no text), one token per whitespace-led word
(trailing whitespace is a token of its own).
``stop_sequences`` cut it (``stop_reason: stop_sequence``); ``max_tokens`` truncates it
(``max_tokens``). With ``tools`` and ``tool_choice`` ``any`` or ``tool``, it calls the tool
instead: the required string properties get the user's text, numbers 42, booleans true;
the input JSON is streamed in 8-character ``input_json_delta`` fragments. Input tokens: 3 per
message plus the whitespace-separated words of the system prompt and of every message.

**Prompt cache**: ``[[cache:W:R]]`` in the last user message makes ``message_start``'s usage
report ``cache_creation_input_tokens: W`` and ``cache_read_input_tokens: R`` besides the
uncached ``input_tokens`` (what Anthropic reports when ``cache_control`` breakpoints write and
hit its prompt cache); the marker is not echoed.

**Faults**, chosen per request by the header ``x-fake-fault: KIND[:N]`` or by
``[[fault:KIND[:N]]]`` in the last user message (N deltas are sent first; default 0, after
``message_start``, ``content_block_start`` and ``ping``):

    500, 529, 429      HTTP error before any byte of stream (429: ``retry-after: N``, default 1)
    hang               never answers (not even headers)
    reset              aborts the TCP connection after N deltas
    stall              sends nothing after N deltas (until the client leaves or the fake closes)
    malformed          a ``data:`` line that is not JSON after N deltas, then the end
    truncate           ends the body cleanly after N deltas, without ``message_stop``
    error              an ``error`` event (``overloaded_error``) after N deltas, then the end

Every request is recorded in :attr:`AnthropicFake.requests`; :attr:`AnthropicFake.stats`
counts connections and streams (a stream the client left early is ``streams_cancelled``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from tokenwire.wire import anthropic as wire
from tokenwire.wire.anthropic import ANTHROPIC_VERSION

FAULT_HEADER = "x-fake-fault"
HTTP_FAULTS = {
    "500": (500, "api_error", "Internal server error"),
    "529": (529, "overloaded_error", "Overloaded"),
    "429": (429, "rate_limit_error", "Number of request tokens has exceeded your rate limit."),
}
STREAM_FAULTS = frozenset({"hang", "reset", "stall", "malformed", "truncate", "error"})
_MARKER = re.compile(r"\[\[fault:([a-z0-9]+)(?::(\d+))?\]\]")
_CACHE = re.compile(r"\[\[cache:(\d{1,9}):(\d{1,9})\]\]")
_TOKEN = re.compile(r"\s*\S+|\s+$")
_FRAGMENT = 8


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault to inject: its kind and how many deltas to send before it."""

    kind: str
    after: int = 0


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A tool call the fake will stream."""

    id: str
    name: str
    input: dict[str, Any]

    @property
    def fragments(self) -> tuple[str, ...]:
        """The ``partial_json`` values, the first empty as Anthropic sends it."""
        text = json.dumps(self.input)
        return ("", *(text[i : i + _FRAGMENT] for i in range(0, len(text), _FRAGMENT)))


@dataclass(frozen=True, slots=True)
class FakePlan:
    """What the fake streams for a request."""

    tokens: tuple[str, ...]
    stop_reason: str
    input_tokens: int
    stop_sequence: str | None = None
    tool_use: ToolUse | None = None
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def output_tokens(self) -> int:
        if self.tool_use is not None:
            return len(self.tool_use.fragments)
        return len(self.tokens)


@dataclass
class RecordedRequest:
    """One request as received: headers, parsed body (``{}`` if not JSON), raw bytes."""

    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes


@dataclass
class FakeStats:
    """Counters; read them from any thread."""

    connections_opened: int = 0
    connections_closed: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0  # the client went away before the end
    streams_faulted: int = 0  # ended by an injected fault

    @property
    def connections_open(self) -> int:
        return self.connections_opened - self.connections_closed

    @property
    def streams_open(self) -> int:
        ended = self.streams_completed + self.streams_cancelled + self.streams_faulted
        return self.streams_started - ended


# -- the reply -----------------------------------------------------------------------------


def _texts(content: Any, *, tool_results: bool = False) -> list[str]:
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif tool_results and block.get("type") == "tool_result":
            texts.extend(_texts(block.get("content", "")))
    return texts


def _last_user(body: dict[str, Any]) -> Any:
    users = [m for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1].get("content", "") if users else ""


def parse_fault(body: dict[str, Any], header: str | None = None) -> Fault | None:
    """The fault a request asks for (header first, then a marker in the last user message)."""
    source = header if header else " ".join(_texts(_last_user(body)))
    match = _MARKER.search(f"[[fault:{source}]]" if header else source)
    if match is None:
        return None
    return Fault(match.group(1), int(match.group(2) or 0))


def _sample(schema: Any, text: str) -> Any:
    kind = schema.get("type") if isinstance(schema, dict) else None
    return {"string": text, "integer": 42, "number": 42, "boolean": True, "array": []}.get(
        str(kind), {}
    )


def _tool_use(body: dict[str, Any], text: str) -> ToolUse | None:
    tools = body.get("tools") or []
    choice = body.get("tool_choice") or {}
    if not tools or choice.get("type") not in ("any", "tool"):
        return None
    name = str(choice["name"] if choice.get("type") == "tool" else tools[0]["name"])
    tool = next(t for t in tools if t["name"] == name)
    schema = tool.get("input_schema") or {}
    properties = schema.get("properties") or {}
    arguments = {key: _sample(properties.get(key), text) for key in schema.get("required", [])}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return ToolUse(f"toolu_fake_{digest[:16]}", name, arguments)


def plan_reply(body: dict[str, Any]) -> FakePlan:
    """What the fake streams for a (valid) request body; see the module docstring."""
    last = _last_user(body)
    said = " ".join(_texts(last)) or " ".join(_texts(last, tool_results=True))
    cache = _CACHE.search(said)
    written, read = (int(cache.group(1)), int(cache.group(2))) if cache else (0, 0)
    said = " ".join(_CACHE.sub(" ", _MARKER.sub(" ", said)).split())
    messages = body.get("messages", [])
    words = len(" ".join(_texts(body.get("system", ""))).split())
    for message in messages:
        words += 3 + len(" ".join(_texts(message.get("content"), tool_results=True)).split())
    tool_use = _tool_use(body, said)
    if tool_use is not None:
        return FakePlan((), "tool_use", words, None, tool_use, written, read)
    text = f"Echo: {said}" if said else "Echo: (nothing)"
    stop_reason, stop_sequence = "end_turn", None
    cuts = [(text.find(s), s) for s in body.get("stop_sequences") or () if s in text]
    if cuts:
        position, stop_sequence = min(cuts)
        text, stop_reason = text[:position], "stop_sequence"
    tokens = tuple(_TOKEN.findall(text))
    if len(tokens) > body["max_tokens"]:
        tokens, stop_reason, stop_sequence = tokens[: body["max_tokens"]], "max_tokens", None
    return FakePlan(tokens, stop_reason, words, stop_sequence, None, written, read)


def stream_frames(plan: FakePlan, model: str) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """The stream for ``plan``: the frames before the deltas, the deltas, the frames after."""
    message_id = "msg_fake_" + hashlib.sha256(repr(plan).encode()).hexdigest()[:20]
    usage = {
        "input_tokens": plan.input_tokens,
        "cache_creation_input_tokens": plan.cache_creation_input_tokens,
        "cache_read_input_tokens": plan.cache_read_input_tokens,
        "output_tokens": 1,
    }
    start = wire.message(message_id, model, [], stop_reason=None, stop_sequence=None, usage=usage)
    deltas: list[bytes]
    if plan.tool_use is not None:
        tool = plan.tool_use
        block: dict[str, Any] = {"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}}
        deltas = [wire.frame(wire.input_json_delta(0, part)) for part in tool.fragments]
    else:
        block = {"type": "text", "text": ""}
        deltas = [wire.frame(wire.text_delta(0, token)) for token in plan.tokens]
    before = [
        wire.frame(wire.message_start(start)),
        wire.frame(wire.content_block_start(0, block)),
        wire.PING_FRAME,
    ]
    after = [
        wire.frame(wire.content_block_stop(0)),
        wire.frame(
            wire.message_delta(
                plan.stop_reason, plan.stop_sequence, {"output_tokens": plan.output_tokens}
            )
        ),
        wire.frame(wire.MESSAGE_STOP),
    ]
    return before, deltas, after


# -- request validation --------------------------------------------------------------------


def _check_turn(index: int, message: Any, previous_tool_ids: set[str]) -> str | None:
    where = f"messages.{index}"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        return f"{where}: role must be 'user' or 'assistant'"
    content = message.get("content")
    if isinstance(content, str):
        return None if content else f"{where}: text content blocks must be non-empty"
    if not isinstance(content, list) or not content:
        return f"{where}: content must be a string or a non-empty list of blocks"
    seen_other = False
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and not block.get("text"):
            return f"{where}.content.{j}: text content blocks must be non-empty"
        if kind == "tool_result":
            if message["role"] != "user" or seen_other:
                return f"{where}.content.{j}: tool_result blocks must come first in a user turn"
            if block.get("tool_use_id") not in previous_tool_ids:
                return f"{where}.content.{j}: unexpected tool_use_id in tool_result blocks"
        else:
            seen_other = True
        if kind == "tool_use" and (message["role"] != "assistant" or "input" not in block):
            return f"{where}.content.{j}: tool_use blocks belong to assistant turns"
        if kind not in ("text", "image", "document", "tool_use", "tool_result"):
            return f"{where}.content.{j}: unknown block type {kind!r}"
    return None


def validate(body: Any) -> str | None:
    """Why Anthropic would refuse this streaming request body, or None."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: field required"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: field required (an integer >= 1)"
    if body.get("stream") is not True:
        return "stream: this fake only answers streaming requests"
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and not (isinstance(value, int | float) and 0 <= value <= 1):
            return f"{name}: must be between 0 and 1"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    tool_ids: set[str] = set()
    for index, message in enumerate(messages):
        problem = _check_turn(index, message, tool_ids)
        if problem is not None:
            return problem
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            return f"messages.{index}: roles must alternate between user and assistant"
        content = message["content"]
        tool_ids = {
            b["id"] for b in content if isinstance(content, list) and b.get("type") == "tool_use"
        }
    choice = body.get("tool_choice")
    names = {t.get("name") for t in body.get("tools") or () if isinstance(t, dict)}
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool") and not names:
        return "tool_choice: requires tools"
    if (
        isinstance(choice, dict)
        and choice.get("type") == "tool"
        and choice.get("name") not in names
    ):
        return f"tool_choice: tool {choice.get('name')!r} not found in tools"
    return None


def error_response(status: int, error_type: str, message: str, **headers: str) -> web.Response:
    """Anthropic's error reply."""
    body = wire.error(error_type, message)
    return web.json_response(body, status=status, headers={"request-id": "req_fake", **headers})


# -- the server ----------------------------------------------------------------------------


class _CountingServer(web.Server):
    """aiohttp's low-level server, counting connections and cancelling handlers on disconnect."""

    def __init__(self, fake: AnthropicFake) -> None:
        super().__init__(fake.handle, handler_cancellation=True)
        self._stats = fake.stats

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self._stats.connections_opened += 1
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._stats.connections_closed += 1
        super().connection_lost(handler, exc)


class AnthropicFake:
    """The fake server. ``base_url`` is ``http://127.0.0.1:PORT`` once started."""

    def __init__(self, *, api_key: str = "test-key", itl_s: float = 0.0) -> None:
        self.api_key = api_key
        self.itl_s = itl_s
        self.requests: list[RecordedRequest] = []
        self.stats = FakeStats()
        self.port = 0
        self._runner: web.ServerRunner | None = None
        self._closing: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on a free loopback port, on the running loop."""
        self._closing = asyncio.Event()
        self._runner = web.ServerRunner(_CountingServer(self), shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Release stalled streams and stop listening."""
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> AnthropicFake:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __enter__(self) -> AnthropicFake:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                await self.start()
                self._loop = asyncio.get_running_loop()
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                ready.set()
            assert self._closing is not None
            await self._closing.wait()
            await self.close()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise RuntimeError("the Anthropic fake could not start") from failure[0]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._closing is not None:
            self._loop.call_soon_threadsafe(self._closing.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request (the aiohttp handler)."""
        if request.method != "POST" or request.path != "/v1/messages":
            return error_response(404, "not_found_error", f"{request.method} {request.path}")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        parsed = body if isinstance(body, dict) else {}
        self.requests.append(RecordedRequest(dict(request.headers), parsed, raw))
        if request.headers.get("x-api-key") != self.api_key:
            return error_response(401, "authentication_error", "invalid x-api-key")
        version = request.headers.get("anthropic-version")
        if version != ANTHROPIC_VERSION:
            message = f"anthropic-version: {version!r} is not a valid version"
            return error_response(400, "invalid_request_error", message)
        problem = validate(body)
        if problem is not None:
            return error_response(400, "invalid_request_error", problem)
        fault = parse_fault(parsed, request.headers.get(FAULT_HEADER))
        if fault is not None and fault.kind in HTTP_FAULTS:
            status, error_type, message = HTTP_FAULTS[fault.kind]
            extra = {"retry-after": str(fault.after or 1)} if status == 429 else {}
            return error_response(status, error_type, message, **extra)
        if fault is not None and fault.kind == "hang":
            assert self._closing is not None
            await self._closing.wait()
            return error_response(529, "overloaded_error", "Overloaded")
        if fault is not None and fault.kind not in STREAM_FAULTS:
            return error_response(400, "invalid_request_error", f"unknown fault {fault.kind!r}")
        return await self._stream(request, plan_reply(parsed), parsed["model"], fault)

    async def _stream(
        self, request: web.BaseRequest, plan: FakePlan, model: str, fault: Fault | None
    ) -> web.StreamResponse:
        before, deltas, after = stream_frames(plan, model)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "request-id": "req_fake",
            }
        )
        stats = self.stats
        stats.streams_started += 1
        outcome = "cancelled"
        try:
            await response.prepare(request)
            for data in before:
                await response.write(data)
            frames: list[bytes | None] = [*deltas, None]  # None: the position after the last
            for position, item in enumerate(frames):
                if fault is not None and position == min(fault.after, len(deltas)):
                    await self._fire(request, response, fault)  # a client leaving: cancelled
                    outcome = "faulted"
                    return response
                if item is not None:
                    if self.itl_s and position:
                        await asyncio.sleep(self.itl_s)
                    await response.write(item)
            for data in after:
                await response.write(data)
            await response.write_eof()
            outcome = "completed"
        except ConnectionResetError:
            outcome = "cancelled"
        finally:
            if outcome == "completed":
                stats.streams_completed += 1
            elif outcome == "faulted":
                stats.streams_faulted += 1
            else:
                stats.streams_cancelled += 1
        return response

    async def _fire(
        self, request: web.BaseRequest, response: web.StreamResponse, fault: Fault
    ) -> None:
        if fault.kind == "reset":
            if request.transport is not None:
                request.transport.abort()
        elif fault.kind == "stall":
            assert self._closing is not None
            await self._closing.wait()
        elif fault.kind == "malformed":
            await response.write(b"event: content_block_delta\ndata: {not json\n\n")
            await response.write_eof()
        elif fault.kind == "error":
            await response.write(wire.frame(wire.error("overloaded_error", "Overloaded")))
            await response.write_eof()
        else:  # truncate
            await response.write_eof()
