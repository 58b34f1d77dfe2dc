"""Anthropic's Messages API (``POST /v1/messages``, always streamed) behind the OpenAI chat API.

Request (:func:`to_anthropic`, pure)::

    system / developer messages     top-level ``system``, their texts joined by a blank line
    user text / image_url parts     ``text`` blocks; ``image`` blocks: a ``data:`` URL becomes
                                    ``{"type": "base64", "media_type", "data"}``, an http(s)
                                    URL ``{"type": "url", "url"}``; ``detail`` is dropped
    user file part (PDF data URL)   ``document`` block (base64); other files and audio: 400
    assistant content / tool_calls  ``text`` block, then one ``tool_use`` block per call
                                    (``arguments`` parsed as JSON; not an object: 400)
    tool messages                   ``tool_result`` blocks in a user turn
    consecutive same-role turns     merged into one turn; ``tool_result`` blocks first
    max_completion_tokens           ``max_tokens`` (required by Anthropic; default 4096)
      or max_tokens
    stop                            ``stop_sequences``
    temperature                     clamped to 1.0 (OpenAI allows 0..2, Anthropic 0..1:
                                    clamping keeps 0..1 exact; scaling would change every value)
    top_p, top_k                    ``top_p``, ``top_k``
    tools (function tools)          ``{"name", "description", "input_schema"}``
    tool_choice                     auto→auto, required→any, none→none (tools kept: Anthropic
                                    needs them to read tool_use history), {function}→tool
    parallel_tool_calls: false      ``tool_choice.disable_parallel_tool_use: true``
    user                            ``metadata.user_id``
    seed, service_tier, store,      ignored (no Anthropic equivalent that changes the output)
      metadata, message ``name``s
    presence/frequency_penalty≠0,   refused with 400 ``unsupported_parameter`` naming the param
      logprobs, top_logprobs,
      logit_bias, response_format
      (not text), audio

Empty text blocks and empty turns are dropped (Anthropic rejects them). A trailing assistant
message is sent as is, so Anthropic continues it (prefill).

Stream (:class:`StreamTranslator`, sans-I/O)::

    message_start                   PromptUsage(usage.input_tokens + cache creation/read tokens,
                                    with the two cache counts apart): billed if the stream is
                                    cut before message_stop
    content_block_start text        TextDelta of its initial text, if any
    content_block_start tool_use    ToolCallDelta(index=<n-th tool call>, id, name, "")
    content_block_delta text_delta  TextDelta
      input_json_delta              ToolCallDelta(index, arguments=partial_json)
    content_block_stop              a tool call whose arguments were all empty gets "{}"
    message_delta                   stop_reason; usage (cumulative) updated
    message_stop                    Usage(prompt, completion, cache write/read) then Finish
    ping, thinking, unknown types   ignored
    error                           UpstreamStatusError with the status Anthropic uses for
                                    that error type (overloaded_error → 529, retryable)

stop_reason: end_turn, stop_sequence, pause_turn → stop; max_tokens,
model_context_window_exceeded → length; tool_use → tool_calls; refusal → content_filter.
A stream that ends without ``message_stop`` is an :class:`UpstreamError`. HTTP errors keep
their status and Anthropic's error type and message; ``retry-after`` is honoured. The API key
travels only in the ``x-api-key`` header, never in an error message.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from tokenwire.errors import (
    InvalidRequest,
    UnsupportedParameter,
    UpstreamError,
    UpstreamStatusError,
)
from tokenwire.providers.base import ProviderCall
from tokenwire.providers.connections import UpstreamPool
from tokenwire.providers.http import MAX_TOKEN_COUNT, stream_events
from tokenwire.providers.openai_compat import upstream_error
from tokenwire.streams.events import (
    Event,
    Finish,
    PromptUsage,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from tokenwire.wire import schema
from tokenwire.wire.anthropic import (
    ANTHROPIC_VERSION,
    ERROR_STATUS,
    FINISH_REASONS,
    IMAGE_TYPES,
)
from tokenwire.wire.schema import (
    AssistantMessage,
    ChatRequest,
    ToolMessage,
    UserMessage,
    content_text,
)

Block = dict[str, Any]

_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.DOTALL)


# -- request translation -------------------------------------------------------------------


def _unsupported(param: str, what: str) -> UnsupportedParameter:
    return UnsupportedParameter(f"{what} is not supported by Anthropic models.", param=param)


def _refuse_unsupported(request: ChatRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise _unsupported(name, f"A non-zero '{name}'")
    for name, value in (
        ("logprobs", request.logprobs),
        ("top_logprobs", request.top_logprobs is not None),
        ("logit_bias", request.logit_bias),
        ("audio", request.audio),
        ("prediction", request.prediction),
    ):
        if value:
            raise _unsupported(name, f"'{name}'")
    if request.response_format is not None and not isinstance(
        request.response_format, schema.TextFormat
    ):
        raise _unsupported("response_format", "A 'response_format' other than text")


def _data_url(url: str, param: str) -> tuple[str, str]:
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise InvalidRequest("Expected a base64 data URL (data:<type>;base64,...).", param=param)
    return match.group(1), match.group(2)


def _user_block(part: schema.UserPart, param: str) -> Block | None:
    if isinstance(part, schema.TextPart):
        return {"type": "text", "text": part.text} if part.text else None
    if isinstance(part, schema.ImageUrlPart):
        url = part.image_url.url
        if url.startswith(("http://", "https://")):
            return {"type": "image", "source": {"type": "url", "url": url}}
        media_type, data = _data_url(url, f"{param}.image_url.url")
        if media_type not in IMAGE_TYPES:
            raise _unsupported(f"{param}.image_url.url", f"Image type {media_type!r}")
        source = {"type": "base64", "media_type": media_type, "data": data}
        return {"type": "image", "source": source}
    if isinstance(part, schema.FilePart):
        file_data = part.file.file_data
        if file_data is not None:
            media_type, data = _data_url(file_data, f"{param}.file.file_data")
            if media_type == "application/pdf":
                source = {"type": "base64", "media_type": media_type, "data": data}
                return {"type": "document", "source": source}
        raise _unsupported(param, "A file part other than an inline PDF (file_data)")
    raise _unsupported(param, "Audio input")


def _user_blocks(message: UserMessage, param: str) -> list[Block]:
    if isinstance(message.content, str):
        return [{"type": "text", "text": message.content}] if message.content else []
    blocks = (_user_block(part, f"{param}[{j}]") for j, part in enumerate(message.content))
    return [block for block in blocks if block is not None]


def _assistant_blocks(message: AssistantMessage, index: int) -> list[Block]:
    text = content_text(message.content)
    blocks: list[Block] = [{"type": "text", "text": text}] if text else []
    for j, tool_call in enumerate(message.tool_calls or ()):
        arguments = tool_call.function.arguments
        try:
            parsed = msgspec.json.decode(arguments) if arguments.strip() else {}
        except (msgspec.DecodeError, RecursionError):  # not JSON, or nested beyond the parser
            parsed = None
        if not isinstance(parsed, dict):
            raise InvalidRequest(
                "Tool call arguments must be a JSON object.",
                param=f"messages[{index}].tool_calls[{j}].function.arguments",
                code="invalid_value",
            )
        blocks.append(
            {
                "type": "tool_use",
                "id": tool_call.id,
                "name": tool_call.function.name,
                "input": parsed,
            }
        )
    return blocks


def _messages(call: ProviderCall) -> tuple[list[str], list[Block]]:
    system: list[str] = []
    turns: list[Block] = []
    for i, message in enumerate(call.request.messages):
        if isinstance(message, schema.SystemMessage | schema.DeveloperMessage):
            text = content_text(message.content)
            if text:
                system.append(text)
            continue
        if isinstance(message, UserMessage):
            role, blocks = "user", _user_blocks(message, f"messages[{i}].content")
        elif isinstance(message, ToolMessage):
            result = {"type": "tool_result", "tool_use_id": message.tool_call_id}
            text = content_text(message.content)
            role, blocks = "user", [{**result, "content": text} if text else result]
        else:
            role, blocks = "assistant", _assistant_blocks(message, i)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        if turn["role"] == "user":  # Anthropic wants tool results before any other block
            turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    if not turns:
        raise InvalidRequest(
            "'messages' needs at least one non-empty user or assistant message.",
            param="messages",
        )
    return system, turns


def _tools(tools: list[schema.Tool]) -> list[Block]:
    result: list[Block] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, schema.FunctionTool):
            raise _unsupported(f"tools[{i}].type", "A tool other than a function")
        function = tool.function
        input_schema = dict(function.parameters) if function.parameters else {"properties": {}}
        entry: Block = {"name": function.name}
        if function.description:
            entry["description"] = function.description
        entry["input_schema"] = {"type": "object", **input_schema}
        result.append(entry)
    return result


_CHOICES = {"auto": "auto", "required": "any", "none": "none"}


def _tool_choice(choice: schema.ToolChoice | None) -> Block | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        return {"type": _CHOICES[choice]}
    if isinstance(choice, schema.FunctionChoice):
        return {"type": "tool", "name": choice.function.name}
    raise _unsupported(
        "tool_choice", "A 'tool_choice' other than auto, required, none or a function"
    )


def to_anthropic(call: ProviderCall, *, default_max_tokens: int = 4096) -> dict[str, Any]:
    """The Messages API body for ``call``, or InvalidRequest / UnsupportedParameter (400)."""
    request = call.request
    _refuse_unsupported(request)
    system, turns = _messages(call)
    body: dict[str, Any] = {
        "model": call.upstream_model,
        "max_tokens": call.output_limit or default_max_tokens,
        "messages": turns,
        "stream": True,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if request.stop_sequences:
        body["stop_sequences"] = request.stop_sequences
    if request.temperature is not None:
        body["temperature"] = min(request.temperature, 1.0)
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.top_k is not None:
        body["top_k"] = request.top_k
    choice = _tool_choice(request.tool_choice)
    if request.tools:
        body["tools"] = _tools(request.tools)
        if request.parallel_tool_calls is False and choice != {"type": "none"}:
            choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
        if choice is not None:
            body["tool_choice"] = choice
    elif choice is not None and choice["type"] in ("any", "tool"):
        raise InvalidRequest("'tool_choice' needs 'tools'.", param="tool_choice")
    if request.user:
        body["metadata"] = {"user_id": request.user}
    return body


# -- stream translation --------------------------------------------------------------------


class _Block(msgspec.Struct):
    type: str
    id: str | None = None
    name: str | None = None
    text: str | None = None


class _Delta(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None


class _Error(msgspec.Struct):
    type: str = "api_error"
    message: str = ""


class _Event(msgspec.Struct):
    type: str
    index: int = 0
    message: dict[str, Any] | None = None
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: dict[str, Any] | None = None
    error: _Error | None = None


_event_decoder = msgspec.json.Decoder(_Event)


def stream_error(provider: str, error_type: str, message: str) -> UpstreamStatusError:
    """An ``error`` event as a gateway error with the status Anthropic uses for its type."""
    return UpstreamStatusError(
        f"Upstream {provider!r} reported {error_type} mid-stream: {message or '(no message)'}",
        status=ERROR_STATUS.get(error_type, 502),
        error_type=error_type,
    )


class StreamTranslator:
    """Turns the ``data`` of Anthropic stream events into gateway events (no I/O).

    ``feed`` raises ``msgspec.DecodeError`` for a malformed event and
    :class:`UpstreamStatusError` for an ``error`` event; ``done`` is set by ``message_stop``.
    """

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.done = False
        self.stop_reason: str | None = None
        self.usage: dict[str, int] = {}  # Anthropic's usage fields, latest (cumulative) values
        self._tool_of_block: dict[int, int] = {}  # content block index → tool call index
        self._tool_has_args: set[int] = set()

    def _take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for name, value in usage.items():
                if type(value) is not int:
                    continue
                if not 0 <= value <= MAX_TOKEN_COUNT:
                    raise UpstreamError(
                        f"Upstream {self.provider!r} reported an impossible {name}: {value}."
                    )
                self.usage[name] = value

    def result(self) -> Usage:
        """Usage so far; prompt tokens include cache writes and reads, as OpenAI counts them,
        and the two cache counts are kept apart for pricing."""
        get = self.usage.get
        written = get("cache_creation_input_tokens", 0)
        read = get("cache_read_input_tokens", 0)
        prompt = get("input_tokens", 0) + written + read
        if prompt > MAX_TOKEN_COUNT:
            raise UpstreamError(f"Upstream {self.provider!r} reported {prompt} prompt tokens.")
        return Usage(
            prompt,
            get("output_tokens", 0),
            cache_write_tokens=written,
            cache_read_tokens=read,
        )

    def end(self) -> list[Event]:
        """The body ended: fine after ``message_stop``, a cut stream before it."""
        if not self.done:
            raise UpstreamError(f"Upstream {self.provider!r} ended the stream before message_stop.")
        return []

    def feed(self, data: str) -> list[Event]:
        """The gateway events one stream event's JSON ``data`` carries."""
        if self.done:
            return []
        event = _event_decoder.decode(data)
        kind = event.type
        if kind == "content_block_delta":
            delta = event.delta
            if delta is None:
                return []
            if delta.type == "text_delta" and delta.text:
                return [TextDelta(delta.text)]
            tool = self._tool_of_block.get(event.index)
            if delta.type == "input_json_delta" and tool is not None and delta.partial_json:
                self._tool_has_args.add(tool)
                return [ToolCallDelta(index=tool, arguments=delta.partial_json)]
            return []
        if kind == "content_block_start":
            block = event.content_block
            if block is None:
                return []
            if block.type == "text" and block.text:
                return [TextDelta(block.text)]
            if block.type == "tool_use":
                tool = len(self._tool_of_block)
                self._tool_of_block[event.index] = tool
                return [ToolCallDelta(index=tool, id=block.id, name=block.name, arguments="")]
            return []
        if kind == "content_block_stop":
            tool = self._tool_of_block.get(event.index)
            if tool is not None and tool not in self._tool_has_args:
                self._tool_has_args.add(tool)
                return [ToolCallDelta(index=tool, arguments="{}")]  # a call without arguments
            return []
        if kind == "message_start":
            self._take_usage((event.message or {}).get("usage"))
            if self.usage:
                usage = self.result()
                return [
                    PromptUsage(
                        usage.prompt_tokens,
                        cache_write_tokens=usage.cache_write_tokens,
                        cache_read_tokens=usage.cache_read_tokens,
                    )
                ]
        elif kind == "message_delta":
            if event.delta is not None and event.delta.stop_reason:
                self.stop_reason = event.delta.stop_reason
            self._take_usage(event.usage)
        elif kind == "message_stop":
            self.done = True
            reason = FINISH_REASONS.get(self.stop_reason or "end_turn", "stop")
            return [self.result(), Finish(reason)]
        elif kind == "error":
            error = event.error or _Error()
            raise stream_error(self.provider, error.type, error.message)
        return []


# -- the provider --------------------------------------------------------------------------


class AnthropicProvider:
    """Streams Anthropic Messages API completions as OpenAI-style events."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None,
        connect_timeout_s: float = 10.0,
        first_token_timeout_s: float = 120.0,
        idle_timeout_s: float = 60.0,
        max_connections: int = 2048,
        keepalive_timeout_s: float = 4.0,
        default_max_tokens: int = 4096,
    ) -> None:
        self.name = name
        base = base_url.rstrip("/")
        self._url = base + ("/messages" if base.endswith("/v1") else "/v1/messages")
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "anthropic-version": ANTHROPIC_VERSION,
        }
        if api_key:
            self._headers["x-api-key"] = api_key
        self._default_max_tokens = default_max_tokens
        self._first_token_s = first_token_timeout_s
        self._pool = UpstreamPool(
            connect_timeout_s=connect_timeout_s,
            idle_timeout_s=idle_timeout_s,
            max_connections=max_connections,
            keepalive_timeout_s=keepalive_timeout_s,
        )

    def stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        return self._stream(call)

    async def _stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        # Translated here, not in stream(), so a 400 surfaces from the iterator like any error.
        body = to_anthropic(call, default_max_tokens=self._default_max_tokens)
        events = stream_events(
            self._pool,
            name=self.name,
            url=self._url,
            payload=msgspec.json.encode(body),
            headers=self._headers,
            translator=StreamTranslator(self.name),
            first_token_timeout_s=self._first_token_s,
            error_for_status=upstream_error,
        )
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    async def aclose(self) -> None:
        await self._pool.aclose()
