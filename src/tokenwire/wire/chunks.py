"""OpenAI ``chat.completion.chunk`` and ``chat.completion`` objects from typed events (sans-I/O).

:class:`ChunkEncoder` produces the exact JSON bytes that SSE puts after ``data:`` and that the
WebSocket transport sends as one text message, so both transports carry identical chunks.
Text deltas, the hot path, are one template concatenation around the JSON-escaped text.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tokenwire.errors import GatewayError
from tokenwire.streams.events import (
    Event,
    Finish,
    FinishReason,
    StreamError,
    TextDelta,
    ToolCallDelta,
    Usage,
)

_encode = msgspec.json.encode


def usage_object(usage: Usage) -> dict[str, Any]:
    """OpenAI's ``usage`` object, plus ``cost_micro`` when the request asked for its cost."""
    result: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.charge_micro is not None:
        result["cost_micro"] = usage.charge_micro  # what the key pays: its charge
    return result


class ChunkEncoder:
    """Encodes one completion's events as ``chat.completion.chunk`` JSON bytes."""

    __slots__ = ("_completion_id", "_created", "_head", "_model", "_null_usage", "_role_sent")

    def __init__(
        self, *, completion_id: str, created: int, model: str, include_usage: bool
    ) -> None:
        self._completion_id = completion_id
        self._created = created
        self._model = model
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        # '{"id":..,"model":".."' without the closing brace; choices follow.
        self._head = _encode(head)[:-1]
        self._null_usage = b',"usage":null' if include_usage else b""
        self._role_sent = False

    def _delta(self, delta_json: bytes, finish: bytes = b"null") -> bytes:
        return b"".join(
            (
                self._head,
                b',"choices":[{"index":0,"delta":',
                delta_json,
                b',"logprobs":null,"finish_reason":',
                finish,
                b"}]",
                self._null_usage,
                b"}",
            )
        )

    def _role(self) -> bytes:
        if self._role_sent:
            return b""
        self._role_sent = True
        return b'"role":"assistant",'

    def text(self, text: str) -> bytes:
        """A chunk carrying a piece of content (the first also carries the role)."""
        return self._delta(b"{" + self._role() + b'"content":' + _encode(text) + b"}")

    def tool_call(self, delta: ToolCallDelta) -> bytes:
        """A chunk carrying one tool-call fragment."""
        call: dict[str, Any] = {"index": delta.index}
        function: dict[str, str] = {}
        if delta.id is not None:
            call["id"] = delta.id
            call["type"] = "function"
        if delta.name is not None:
            function["name"] = delta.name
        function["arguments"] = delta.arguments
        call["function"] = function
        return self._delta(b"{" + self._role() + b'"tool_calls":' + _encode([call]) + b"}")

    def finish(self, reason: FinishReason) -> bytes:
        """The last choice chunk, carrying ``finish_reason`` and an empty delta."""
        delta = b"{}" if self._role_sent else b'{"role":"assistant"}'
        self._role_sent = True
        return self._delta(delta, _encode(reason))

    def usage(self, usage: Usage) -> bytes:
        """The trailing usage chunk (``choices: []``), sent only when the client asked."""
        return b"".join((self._head, b',"choices":[],"usage":', _encode(usage_object(usage)), b"}"))

    def encode(self, event: Event, *, include_usage: bool) -> bytes | None:
        """Encode any event as chunk bytes, or None if this client gets nothing for it."""
        if isinstance(event, TextDelta):
            return self.text(event.text)
        if isinstance(event, ToolCallDelta):
            return self.tool_call(event)
        if isinstance(event, Finish):
            return self.finish(event.reason)
        if isinstance(event, Usage):
            return self.usage(event) if include_usage else None
        if isinstance(event, StreamError):
            return error_json(event.error)
        return None  # Routed, AttemptFailed, PromptUsage: bookkeeping, never sent


def error_json(error: GatewayError) -> bytes:
    """An in-band error object; ``status`` says what the HTTP status would have been."""
    body = error.to_body()
    body["error"]["status"] = error.http_status
    return _encode(body)


class CompletionBuilder:
    """Aggregates a completion's events into one ``chat.completion`` object (``stream: false``)."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None
        self.error: GatewayError | None = None

    @property
    def text(self) -> str:
        """The answer's text so far."""
        return "".join(self._text)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The tool calls so far, in OpenAI's shape, in order."""
        return [self._tool_calls[i] for i in sorted(self._tool_calls)]

    def add(self, event: Event) -> None:
        """Fold one event into the result."""
        if isinstance(event, TextDelta):
            self._text.append(event.text)
        elif isinstance(event, ToolCallDelta):
            call = self._tool_calls.setdefault(
                event.index,
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            if event.id is not None:
                call["id"] = event.id
            if event.name is not None:
                call["function"]["name"] += event.name
            call["function"]["arguments"] += event.arguments
        elif isinstance(event, Finish):
            self.finish_reason = event.reason
        elif isinstance(event, Usage):
            self.usage = event
        elif isinstance(event, StreamError):
            self.error = event.error

    def build(self, *, completion_id: str, created: int, model: str) -> dict[str, Any]:
        """The ``chat.completion`` object."""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": self.text if self._text or not self._tool_calls else None,
            "refusal": None,
        }
        if self._tool_calls:
            message["tool_calls"] = self.tool_calls
        result: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
        }
        if self.usage is not None:
            result["usage"] = usage_object(self.usage)
        return result
