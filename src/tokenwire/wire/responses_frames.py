"""The Responses API's output from a generation's events: streaming events as frames on SSE or
WebSocket, and the ``response`` object (sans-I/O).

:class:`ResponsesEncoder` is a :class:`~tokenwire.wire.frames.FrameEncoder`. It keeps the
response's output items as the events arrive (a message with one ``output_text`` part, then a
``function_call`` item per tool call) and emits OpenAI's events, each with a
``sequence_number`` counted from 0::

    response.created, response.in_progress                          start
    response.output_item.added, response.content_part.added         the first text delta
    response.output_text.delta                                      each text delta
    response.output_text.done, response.content_part.done,
    response.output_item.done                                       the message ends
    response.output_item.added, response.function_call_arguments.delta … .done,
    response.output_item.done                                       each tool call
    response.completed | response.incomplete | response.failed      the end, with usage

The numbers are a function of the log alone (were text deltas merged, a merged delta would
advance the count by the deltas it holds; the transports do not merge Responses events, as
OpenAI's numbers have no gaps). A resume therefore replays the log from its start through a
new encoder that skips the frames up to the client's ``starting_after``: ``output_text.done``
and the final response carry everything before them, so an encoder needs the whole log anyway.

With ``framing=None`` the encoder emits nothing and only builds the response (``stream:
false``, and the stored copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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
from tokenwire.wire import sse

_encode = msgspec.json.encode
Framing = Literal["sse", "ws"] | None

_OUTCOMES: dict[str, tuple[str, str | None]] = {
    "stop": ("completed", None),
    "tool_calls": ("completed", None),
    "length": ("incomplete", "max_output_tokens"),
    "content_filter": ("incomplete", "content_filter"),
    "cancelled": ("cancelled", None),
}
"""A finish reason as the response's ``status`` and ``incomplete_details.reason``."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What a response object says besides its output: identity and the request's fields."""

    id: str
    created: int
    model: str
    echo: dict[str, Any]  # instructions, tools, metadata, temperature… (wire/responses_request)


def usage_object(usage: Usage) -> dict[str, Any]:
    """The Responses API's ``usage``."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def error_object(error: GatewayError) -> dict[str, Any]:
    """A failed response's ``error``: OpenAI's ``code`` and ``message``, plus the error's
    ``type``, ``param`` and the HTTP ``status`` it would have had (as Chat's in-band error)."""
    body = error.to_body()["error"]
    return {
        "code": body["code"] or body["type"],
        "message": body["message"],
        "type": body["type"],
        "param": body["param"],
        "status": error.http_status,
    }


def request_error_message(error: GatewayError, stream_id: str | None = None) -> bytes:
    """WebSocket mode's ``error`` event for a request that failed before it began."""
    message: dict[str, Any] = {
        "type": "error",
        "status": error.http_status,
        "error": error.to_body()["error"],
    }
    headers = error.headers()
    if headers:
        message["error"]["headers"] = headers
    if stream_id is not None:
        message["stream_id"] = stream_id
    return _encode(message)


class ResponsesEncoder:
    """One response's events, for one client (or none: ``framing=None``)."""

    __slots__ = (
        "_call_args",
        "_call_index",
        "_delta_head",
        "_error",
        "_finish",
        "_framing",
        "_head",
        "_item",
        "_items",
        "_kind",
        "_last",
        "_seq",
        "_skip",
        "_started",
        "_stream_id",
        "_suffix",
        "_text",
        "_token",
        "_usage",
    )

    def __init__(
        self,
        head: ResponseHead,
        framing: Framing,
        *,
        stream_id: str | None = None,
        starting_after: int = -1,
    ) -> None:
        self._head = head
        self._framing = framing
        self._token = head.id.partition("_")[2] or head.id
        self._stream_id = stream_id
        self._suffix = b"}" if stream_id is None else b',"stream_id":' + _encode(stream_id) + b"}"
        self._skip = starting_after  # frames numbered up to this one were delivered before
        self._seq = 0  # the next frame's sequence_number
        self._last = 0  # the log number of the last event seen
        self._started = False
        self._items: list[dict[str, Any]] = []
        self._item: dict[str, Any] | None = None  # the open output item
        self._kind: str | None = None  # its type: "message" or "function_call"
        self._text: list[str] = []
        self._call_args: list[str] = []
        self._call_index: int | None = None
        self._delta_head = b""
        self._finish: FinishReason | None = None
        self._usage: Usage | None = None
        self._error: GatewayError | None = None

    # -- FrameEncoder ------------------------------------------------------------------------

    def start(self, out: list[bytes]) -> None:
        self._started = True
        response = self.response("in_progress")
        self._frame(out, b"response.created", {"type": "response.created", "response": response})
        self._frame(
            out, b"response.in_progress", {"type": "response.in_progress", "response": response}
        )

    def event(self, event: Event, number: int, out: list[bytes]) -> None:
        held = number - self._last  # more than 1: a merged text delta
        self._last = number
        if type(event) is TextDelta:
            if self._kind != "message":
                self._open_message(out)
            self._text.append(event.text)
            seq = self._seq + held - 1
            self._seq = seq + 1
            if seq > self._skip and self._framing is not None:  # the hot path: one template
                data = b'%s%s,"logprobs":[],"sequence_number":%d%s' % (
                    self._delta_head,
                    _encode(event.text),
                    seq,
                    self._suffix,
                )
                out.append(
                    data
                    if self._framing == "ws"
                    else b"event: response.output_text.delta\nid: %d\ndata: %s\n\n" % (seq, data)
                )
        elif type(event) is ToolCallDelta:
            self._tool_call(event, out)
        elif type(event) is Finish:
            self._finish = event.reason
            done = event.reason in ("stop", "tool_calls")
            self._close(out, "completed" if done else "incomplete")
        elif type(event) is Usage:
            self._usage = event
            status, reason = _OUTCOMES[self._finish or "stop"]
            name = "response.completed" if status == "completed" else "response.incomplete"
            response = self.response(status, reason)
            self._frame(out, name.encode(), {"type": name, "response": response})
        elif type(event) is StreamError:
            self._error = event.error
            if not self._started:  # WebSocket: the request failed before it began
                if self._framing == "ws":
                    out.append(request_error_message(event.error, self._stream_id))
                return
            self._close(out, "incomplete")
            response = self.response("failed")
            self._frame(out, b"response.failed", {"type": "response.failed", "response": response})

    def ping(self, out: list[bytes]) -> None:
        if self._framing == "sse":
            out.append(sse.PING)

    def end(self, out: list[bytes]) -> None:
        return None  # the last event (completed, incomplete or failed) is the end

    # -- the response ------------------------------------------------------------------------

    @property
    def error(self) -> GatewayError | None:
        """The error the response failed with, if it did."""
        return self._error

    def response(self, status: str | None = None, reason: str | None = None) -> dict[str, Any]:
        """The ``response`` object as it stands (its final form once the log has ended)."""
        if status is None:
            if self._error is not None:
                status = "failed"
            elif self._usage is None:
                status = "in_progress"
            else:
                status, reason = _OUTCOMES[self._finish or "stop"]
        head = self._head
        return {
            "id": head.id,
            "object": "response",
            "created_at": head.created,
            "status": status,
            "error": None if self._error is None else error_object(self._error),
            "incomplete_details": None if reason is None else {"reason": reason},
            "model": head.model,
            "output": list(self._items) if status != "in_progress" else [],
            "usage": None if self._usage is None else usage_object(self._usage),
            **head.echo,
        }

    def chat_messages(self) -> list[dict[str, Any]]:
        """The output as Chat Completions messages (for a later ``previous_response_id``)."""
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        for item in self._items:
            if item["type"] == "message":
                text.extend(part["text"] for part in item["content"])
            else:
                function = {"name": item["name"], "arguments": item["arguments"]}
                calls.append({"id": item["call_id"], "type": "function", "function": function})
        if not text and not calls:
            return []
        message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
        if calls:
            message["tool_calls"] = calls
        return [message]

    # -- items -------------------------------------------------------------------------------

    def _frame(self, out: list[bytes], name: bytes, payload: dict[str, Any]) -> None:
        """One event, numbered; skipped when the client has it, or when nobody listens."""
        seq = self._seq
        self._seq = seq + 1
        if seq <= self._skip or self._framing is None:
            return
        data = b'%s,"sequence_number":%d%s' % (_encode(payload)[:-1], seq, self._suffix)
        out.append(data if self._framing == "ws" else sse.event(data, event_id=seq, name=name))

    def _open(self, out: list[bytes], item: dict[str, Any]) -> int:
        index = len(self._items)
        self._items.append(item)
        self._item = item
        self._kind = item["type"]
        added = {"type": "response.output_item.added", "output_index": index, "item": item}
        self._frame(out, b"response.output_item.added", added)
        return index

    def _open_message(self, out: list[bytes]) -> None:
        self._close(out, "completed")
        item_id = f"msg_{self._token}_{len(self._items)}"
        message = {
            "id": item_id,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        index = self._open(out, message)
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._frame(
            out,
            b"response.content_part.added",
            {"type": "response.content_part.added", **where, "part": part},
        )
        self._text = []
        self._delta_head = _encode({"type": "response.output_text.delta", **where, "delta": ""})
        self._delta_head = self._delta_head[: -len(b'""}')]  # …,"delta": then the text

    def _tool_call(self, delta: ToolCallDelta, out: list[bytes]) -> None:
        item = self._item
        if self._kind != "function_call" or delta.index != self._call_index or item is None:
            self._close(out, "completed")
            item = {
                "id": f"fc_{self._token}_{len(self._items)}",
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": delta.id or f"call_{self._token}_{len(self._items)}",
                "name": delta.name or "",
            }
            self._call_index = delta.index
            self._call_args = []
            self._open(out, item)
        else:
            if delta.id is not None:
                item["call_id"] = delta.id
            if delta.name is not None:
                item["name"] += delta.name
        if delta.arguments:
            self._call_args.append(delta.arguments)
            payload = {
                "type": "response.function_call_arguments.delta",
                "item_id": item["id"],
                "output_index": len(self._items) - 1,
                "delta": delta.arguments,
            }
            self._frame(out, b"response.function_call_arguments.delta", payload)

    def _close(self, out: list[bytes], status: str) -> None:
        """End the open item, if any, with its done events."""
        item, kind = self._item, self._kind
        if item is None:
            return
        self._item = self._kind = None
        index = len(self._items) - 1
        item["status"] = status
        if kind == "message":
            text = "".join(self._text)
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item["content"] = [part]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            done = {"type": "response.output_text.done", **where, "text": text, "logprobs": []}
            self._frame(out, b"response.output_text.done", done)
            part_done = {"type": "response.content_part.done", **where, "part": part}
            self._frame(out, b"response.content_part.done", part_done)
        else:
            item["arguments"] = "".join(self._call_args)
            done = {
                "type": "response.function_call_arguments.done",
                "item_id": item["id"],
                "output_index": index,
                "arguments": item["arguments"],
            }
            self._frame(out, b"response.function_call_arguments.done", done)
        item_done = {"type": "response.output_item.done", "output_index": index, "item": item}
        self._frame(out, b"response.output_item.done", item_done)
