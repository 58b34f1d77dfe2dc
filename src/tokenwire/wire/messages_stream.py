"""A completion's events as Anthropic Messages API output (sans-I/O).

:class:`MessagesEncoder` turns the generation's numbered events into Anthropic's stream::

    first event              message_start (no content, stop_reason null)
    TextDelta                content_block_start (text) when no text block is open, then
                             content_block_delta text_delta
    ToolCallDelta            content_block_stop of the open block and content_block_start
                             (tool_use, input {}) for a new call, then
                             content_block_delta input_json_delta for its argument text
    Finish                   content_block_stop of the open block
    Usage                    message_delta (stop_reason, stop_sequence, usage) and
                             message_stop
    StreamError              an ``error`` event; the stream ends there
    Finish(cancelled)        an ``error`` event (``api_error``: Anthropic has no stop reason
                             for an answer cut short by the gateway)

Each group of frames carries the number of the event it encodes as the ``id:`` of its last
frame, so a client that resumes after that number misses nothing and repeats nothing. The
encoder keeps state (the blocks opened so far), so a resumed reader replays the log from the
start through a fresh encoder that writes nothing up to the cursor (``after``).

:class:`MessageBuilder` folds the same events into one ``message`` object (``stream: false``).
:func:`error_body` is Anthropic's error object for any gateway error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from tokenwire.errors import GatewayError, UpstreamStatusError
from tokenwire.streams.events import (
    Event,
    Finish,
    FinishReason,
    StreamError,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from tokenwire.wire import anthropic as wire
from tokenwire.wire.chunks import CompletionBuilder

_encode = msgspec.json.encode

CANCELLED_MESSAGE = "The answer was cut short: the gateway cancelled the completion."
CANCELLED_STATUS = 503


def error_body(error: GatewayError) -> dict[str, Any]:
    """Anthropic's error object for ``error``; the message names the offending field."""
    reported = error.error_type if isinstance(error, UpstreamStatusError) else None
    reported = reported or error.to_body()["error"]["type"]
    message = error.message
    if error.param and not message.startswith(error.param):
        message = f"{error.param}: {message}"
    return wire.error(wire.error_type(error.http_status, reported), message)


def cancelled_error() -> GatewayError:
    """What a Messages client is told about an answer the gateway cancelled."""
    return GatewayError(CANCELLED_MESSAGE, status=CANCELLED_STATUS)


def stop_reason(reason: FinishReason | None) -> str | None:
    """Anthropic's ``stop_reason`` for a finish reason (``None`` for ``cancelled``)."""
    return None if reason is None else wire.STOP_REASONS.get(reason)


class MessagesEncoder:
    """Anthropic SSE frames for one client of one completion (a ``FrameEncoder``).

    ``prompt_tokens`` is asked once, for ``message_start``: the best count known when the
    first event arrives (the exact one follows in ``message_delta``). ``after`` is the
    client's cursor when it resumes: the log is read from its start, and the frames of
    events up to ``after`` (``message_start`` included) only rebuild the encoder's state.
    """

    __slots__ = (
        "_after",
        "_blocks",
        "_delta_head",
        "_finish",
        "_message_id",
        "_model",
        "_open",
        "_prompt_tokens",
        "_text_open",
        "_tools",
    )

    def __init__(
        self,
        *,
        message_id: str,
        model: str,
        prompt_tokens: Callable[[], int] = lambda: 0,
        after: int = 0,
    ) -> None:
        self._message_id = message_id
        self._model = model
        self._prompt_tokens = prompt_tokens
        self._after = after
        self._blocks = 0  # content blocks started so far
        self._open: int | None = None  # the open block's index
        self._text_open = False  # the open block is a text block
        self._tools: dict[int, int] = {}  # tool call index → its block's index
        self._finish: FinishReason | None = None
        self._delta_head = b""

    def start(self, out: list[bytes]) -> None:
        """``message_start`` (already delivered to a client that resumes)."""
        if self._after == 0:
            usage = wire.usage(self._prompt_tokens(), 0)
            start = wire.message(
                self._message_id, self._model, [], stop_reason=None, stop_sequence=None, usage=usage
            )
            out.append(wire.frame(wire.message_start(start)))

    def event(self, event: Event, number: int, out: list[bytes]) -> None:
        """The frames of event ``number``; the last one carries the number as its ``id``."""
        first = len(out)
        if type(event) is TextDelta:  # the hot path: one frame, one concatenation
            if not self._text_open:
                self._start_block(out, {"type": "text", "text": ""})
                self._text_open = True
            out.append(self._delta_head + _encode(event.text) + b"}}\n\n")
        elif type(event) is ToolCallDelta:
            self._tool_call(out, event)
        elif type(event) is Finish:
            self._stop_block(out)
            self._finish = event.reason
            if event.reason == "cancelled":
                out.append(wire.frame(error_body(cancelled_error())))
        elif type(event) is Usage:
            if self._finish != "cancelled":
                self._stop_block(out)
                usage = wire.usage(event.prompt_tokens, event.completion_tokens)
                out.append(wire.frame(wire.message_delta(stop_reason(self._finish), None, usage)))
                out.append(wire.frame(wire.MESSAGE_STOP))
        elif type(event) is StreamError:
            out.append(wire.frame(error_body(event.error)))
        if number <= self._after:
            del out[first:]
        elif len(out) > first and type(event) is not StreamError:  # an error has no id:
            # a resume after it would find nothing new
            out[-1] = b"id: %d\n" % number + out[-1]

    def ping(self, out: list[bytes]) -> None:
        """Anthropic's ``ping`` event, while the log is idle."""
        out.append(wire.PING_FRAME)

    def end(self, out: list[bytes]) -> None:
        """Nothing: ``message_stop`` (or an ``error``) already ended the stream."""
        return None

    def _start_block(self, out: list[bytes], block: dict[str, Any]) -> int:
        self._stop_block(out)
        index = self._open = self._blocks
        self._blocks += 1
        out.append(wire.frame(wire.content_block_start(index, block)))
        # The text delta's frame up to the JSON string: one concatenation per token.
        self._delta_head = (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
            b'"delta":{"type":"text_delta","text":' % index
        )
        return index

    def _stop_block(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(wire.frame(wire.content_block_stop(self._open)))
            self._open = None
            self._text_open = False

    def _tool_call(self, out: list[bytes], delta: ToolCallDelta) -> None:
        index = self._tools.get(delta.index)
        if index is None:
            call_id = delta.id or f"toolu_{self._message_id.removeprefix('msg_')}_{delta.index}"
            block = {"type": "tool_use", "id": call_id, "name": delta.name or "", "input": {}}
            index = self._tools[delta.index] = self._start_block(out, block)
        if delta.arguments:
            # A fragment of a call whose block was closed (calls interleaved upstream) still
            # goes to that call's block, where every client that folds deltas puts it.
            out.append(wire.frame(wire.input_json_delta(index, delta.arguments)))


class MessageBuilder:
    """Folds a completion's events into one Anthropic ``message`` object."""

    def __init__(self) -> None:
        self._completion = CompletionBuilder()

    def add(self, event: Event) -> None:
        """Fold one event into the result."""
        self._completion.add(event)

    @property
    def error(self) -> GatewayError | None:
        """How the completion failed (a cancelled one failed, for an Anthropic client)."""
        if self._completion.finish_reason == "cancelled":
            return cancelled_error()
        return self._completion.error

    def build(self, *, message_id: str, model: str) -> dict[str, Any]:
        """The ``message`` object: a text block (if any text), then the tool calls."""
        completion = self._completion
        content: list[dict[str, Any]] = []
        if completion.text:
            content.append({"type": "text", "text": completion.text})
        for call in completion.tool_calls:
            function = call["function"]
            try:
                arguments = msgspec.json.decode(function["arguments"] or "{}")
            except (msgspec.DecodeError, RecursionError):
                arguments = None
            content.append(
                {
                    "type": "tool_use",
                    "id": call["id"],
                    "name": function["name"],
                    # Arguments that are not a JSON object (a model's mistake) keep their text.
                    "input": arguments
                    if isinstance(arguments, dict)
                    else {"arguments": function["arguments"]},
                }
            )
        usage = completion.usage or Usage(0, 0, estimated=True)
        return wire.message(
            message_id,
            model,
            content,
            stop_reason=stop_reason(completion.finish_reason),
            stop_sequence=None,
            usage=wire.usage(usage.prompt_tokens, usage.completion_tokens),
        )
