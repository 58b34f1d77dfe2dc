"""The requests a row sends, the answer the simulator must give, and one stream's state.

Every prompt is distinct (row tag, user, request index). The simulator is deterministic, so
the expected text is ``tokenwire.providers.sim.plan(decode_chat_request(body)).text`` whatever
the model name; a request is *wrong* when its text, finish reason (``length``) or
``usage.completion_tokens`` differ from that plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from tokenwire.bench.metrics import RequestRecord, timeline
from tokenwire.providers.sim import plan
from tokenwire.wire.schema import decode_chat_request


def request_body(
    model: str, tag: str, user: int, index: int, tokens: int, *, stream: bool = True
) -> bytes:
    """A chat request with ``max_tokens = tokens`` and a distinct prompt; streamed ones ask
    for the usage chunk (a JSON answer always has usage)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": f"bench {tag} user {user} request {index}"}],
        "stream": stream,
        "max_tokens": tokens,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return msgspec.json.encode(body)


def expected_text(body: bytes) -> str:
    """What the simulator answers to ``body`` (the model name does not matter)."""
    return plan(decode_chat_request(body)).text


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class StreamMessage(msgspec.Struct):
    """The fields the bench reads from an SSE chunk or a WebSocket message.

    An OpenAI chunk (``choices``, ``usage``), an in-band error (``error``), and in WebSocket
    envelope mode ``type``, ``request_id`` and, on ``chat.completion.done``, ``finish_reason``.
    """

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | None = None
    type: str | None = None
    request_id: str | None = None
    finish_reason: str | None = None


decode_message = msgspec.json.Decoder(StreamMessage).decode


def error_text(error: dict[str, Any]) -> str:
    """A short description of an in-band error object."""
    code = error.get("code") or error.get("type") or "error"
    return f"in-band error {code}: {str(error.get('message', ''))[:120]}"


@dataclass(slots=True)
class StreamState:
    """One request in flight: send stamp, content stamps and what the stream said."""

    user: int
    index: int
    body: bytes
    sent: float = 0.0
    last_seen: float = 0.0  # WebSocket: when the last message for this request arrived
    stamps: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    reads: int = 0
    finish: str | None = None
    usage_tokens: int | None = None
    done: bool = False
    error: str | None = None

    def apply(self, message: StreamMessage, now: float) -> None:
        """Take in one decoded chunk (or envelope message) received at ``now``."""
        if message.error is not None:
            self.error = error_text(message.error)
            return
        for choice in message.choices:
            delta = choice.delta
            if delta is not None and delta.content:
                self.stamps.append(now)
                self.pieces.append(delta.content)
            if choice.finish_reason:
                self.finish = choice.finish_reason
        if message.finish_reason:
            self.finish = message.finish_reason
        if message.usage is not None:
            self.usage_tokens = message.usage.completion_tokens

    @property
    def output_tokens(self) -> int:
        """Tokens delivered: the usage figure, else one per content chunk."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.stamps)

    def wrongness(self, tokens: int) -> str | None:
        """Why the output differs from the simulator's plan, or None when it is right."""
        text = "".join(self.pieces)
        if text != expected_text(self.body):
            return f"text differs from the simulator's after {len(self.stamps)} chunks"
        if self.finish != "length":
            return f"finish_reason {self.finish!r}, expected 'length'"
        if self.usage_tokens != tokens:
            return f"usage.completion_tokens {self.usage_tokens}, expected {tokens}"
        return None

    def record(self, tokens: int, end_marker: str) -> RequestRecord:
        """The reduced record; ``end_marker`` names what a complete stream ends with."""
        error = self.error
        if error is None and not self.done:
            error = f"stream ended without {end_marker}"
        wrong = self.wrongness(tokens) if error is None else None
        line = timeline(self.sent, self.stamps, self.output_tokens)
        return RequestRecord(
            user=self.user,
            index=self.index,
            ttft_s=line.ttft_s,
            e2e_s=line.e2e_s,
            tpot_s=line.tpot_s,
            itl_s=line.itl_s,
            output_tokens=self.output_tokens,
            content_chunks=len(self.stamps),
            reads=self.reads,
            error=error,
            wrong=wrong,
        )
