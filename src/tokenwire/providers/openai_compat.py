"""Any OpenAI-compatible upstream: OpenAI, DeepSeek, vLLM, Ollama, llama.cpp server, sim-upstream.

The client's original body is passed through (vendor extensions included) with the upstream
model name, ``stream: true`` and ``stream_options.include_usage`` forced, so usage is always
the upstream's own figure, and the admitted token limit added when the client sent none.
The SSE reply is parsed incrementally into typed events; the part of the prompt the upstream
read from its prompt cache (OpenAI's ``prompt_tokens_details.cached_tokens``, DeepSeek's
``prompt_cache_hit_tokens``) is kept apart in the usage, priced at the model's cache-read price.
Connections come from one pool per provider (``providers/connections.py``); closing the event
iterator (a cancel or a client gone) closes the upstream connection at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec

from tokenwire.errors import UpstreamError, UpstreamStatusError
from tokenwire.providers.base import ProviderCall
from tokenwire.providers.connections import UpstreamPool
from tokenwire.providers.http import MAX_TOKEN_COUNT, TokenCount, stream_events
from tokenwire.streams.events import Event, Finish, FinishReason, TextDelta, ToolCallDelta, Usage
from tokenwire.wire.sse import DONE_DATA


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_COUNT)] = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: TokenCount | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0
    prompt_tokens_details: _PromptDetails | None = None  # OpenAI: cached_tokens, read
    prompt_cache_hit_tokens: TokenCount | None = None  # DeepSeek's name for the same

    def event(self) -> Usage:
        """The usage event; prompt tokens read from the provider's cache are a part of them."""
        details = self.prompt_tokens_details
        cached = (details.cached_tokens if details is not None else None) or 0
        cached = cached or self.prompt_cache_hit_tokens or 0
        return Usage(
            self.prompt_tokens,
            self.completion_tokens,
            cache_read_tokens=min(cached, self.prompt_tokens),
        )


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def upstream_error(
    provider: str, status: int, body: bytes, retry_after: str | None
) -> UpstreamStatusError:
    """Translate an upstream's HTTP error reply into a gateway error naming the upstream."""
    message = body[:500].decode("utf-8", "replace").strip() or "(empty body)"
    error_type: str | None = None
    code: str | None = None
    param: str | None = None
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        err = parsed["error"]
        message = str(err.get("message") or message)
        error_type = err.get("type") if isinstance(err.get("type"), str) else None
        code = str(err["code"]) if err.get("code") is not None else None
        param = err.get("param") if isinstance(err.get("param"), str) else None
    return UpstreamStatusError(
        f"Upstream {provider!r} answered HTTP {status}: {message}",
        status=status,
        error_type=error_type,
        code=code,
        param=param,
        retry_after_s=parse_retry_after(retry_after),
    )


def chunk_events(chunk: _Chunk, provider: str) -> list[Event]:
    """The typed events one upstream chunk carries."""
    if chunk.error is not None:
        message = str(chunk.error.get("message") or chunk.error)
        raise UpstreamError(f"Upstream {provider!r} reported an error mid-stream: {message}")
    events: list[Event] = []
    for choice in chunk.choices:
        delta = choice.delta
        if delta is not None:
            if delta.content:
                events.append(TextDelta(delta.content))
            for call in delta.tool_calls or ():
                function = call.function or _Function()
                events.append(
                    ToolCallDelta(
                        index=call.index,
                        id=call.id,
                        name=function.name,
                        arguments=function.arguments or "",
                    )
                )
        if choice.finish_reason:
            events.append(Finish(_FINISH.get(choice.finish_reason, "stop")))
    if chunk.usage is not None:
        events.append(chunk.usage.event())
    return events


class ChunkTranslator:
    """OpenAI ``chat.completion.chunk`` data to events; ``data: [DONE]`` ends the stream."""

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self.done = False

    def feed(self, data: str) -> list[Event]:
        if data == DONE_DATA:
            self.done = True
            return []
        return chunk_events(_chunk_decoder.decode(data), self._provider)

    def end(self) -> list[Event]:
        return []  # no [DONE]: the Generation reports a missing finish reason, if there is none


class OpenAICompatProvider:
    """Streams chat completions from an OpenAI-compatible server over HTTP."""

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
        output_limit_field: str = "max_tokens",
    ) -> None:
        self.name = name
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._output_limit_field = output_limit_field
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._first_token_s = first_token_timeout_s
        self._pool = UpstreamPool(
            connect_timeout_s=connect_timeout_s,
            idle_timeout_s=idle_timeout_s,
            max_connections=max_connections,
            keepalive_timeout_s=keepalive_timeout_s,
        )

    def upstream_body(self, call: ProviderCall) -> dict[str, Any]:
        """The body sent upstream: the client's, with model, streaming and usage forced.

        A request without a token limit gets the admitted one (``output_limit_field``: OpenAI's
        reasoning models take only ``max_completion_tokens``, most other servers
        ``max_tokens``), so no answer outgrows what admission reserved.
        """
        body = dict(call.raw_body)
        body["model"] = call.upstream_model
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        if call.request.output_limit is None and call.max_output_tokens is not None:
            body[self._output_limit_field] = call.max_output_tokens
        return body

    def stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        return stream_events(
            self._pool,
            name=self.name,
            url=self._url,
            payload=msgspec.json.encode(self.upstream_body(call)),
            headers=self._headers,
            translator=ChunkTranslator(self.name),
            first_token_timeout_s=self._first_token_s,
            error_for_status=upstream_error,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
