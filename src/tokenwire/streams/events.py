"""Typed events that flow from providers through the stream log to the encoders.

A provider yields these; a :class:`~tokenwire.streams.generation.Generation` numbers them and
appends them to its log; the SSE and WebSocket encoders turn them into chunks. They are
frozen msgspec Structs: cheap to build (one per token) and immutable once logged.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from tokenwire.errors import GatewayError

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "cancelled"]


class TextDelta(msgspec.Struct, frozen=True):
    """A piece of assistant text."""

    text: str


class ToolCallDelta(msgspec.Struct, frozen=True):
    """A fragment of a tool call, in OpenAI's streaming shape (index, then id/name/arguments)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Usage(msgspec.Struct, frozen=True):
    """Token usage; ``estimated`` is true when the upstream gave no figures of its own.

    ``prompt_tokens`` counts the whole prompt, as OpenAI does: the two cache counts are parts
    of it, priced on their own (``accounting/pricing.py``). ``cache_write_tokens`` were
    written to the provider's prompt cache (Anthropic's ``cache_creation_input_tokens``),
    ``cache_read_tokens`` read from it (``cache_read_input_tokens``, OpenAI's
    ``cached_tokens``, Gemini's ``cachedContentTokenCount``).

    ``charge_micro`` is what the completion is charged (integer micro-dollars, the ledger row's
    ``charge_micro``), set on the final usage of a request that asked to be told its cost
    (``X-Tokenwire-Include-Cost``; clients see it as ``usage.cost_micro``); None otherwise.
    """

    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    charge_micro: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class PromptUsage(msgspec.Struct, frozen=True):
    """The upstream's prompt token count, reported before the answer (Anthropic's
    ``message_start``, Gemini's first ``usageMetadata``); not logged.

    A generation cancelled or failed before the final :class:`Usage` bills these instead of
    an estimate, and it caps the answer so that its cost stays within the reservation. The
    cache counts are parts of ``prompt_tokens``, as in :class:`Usage`.
    """

    prompt_tokens: int
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0


class Finish(msgspec.Struct, frozen=True):
    """The completion ended normally with this finish reason."""

    reason: FinishReason


class StreamError(msgspec.Struct, frozen=True):
    """The completion failed; ``error`` says how (status, type, code, message)."""

    error: GatewayError


class Routed(msgspec.Struct, frozen=True):
    """Which deployment serves the completion (from the router; not logged).

    It is also the successful upstream attempt: with the :class:`AttemptFailed` events before
    it, the completion's whole routing history (for metrics and its log line).
    """

    provider: str
    upstream_model: str


AttemptOutcome = Literal[
    "rate_limited",
    "server_error",
    "client_error",
    "auth_error",
    "timeout",
    "connect_error",
    "error",
]


class AttemptFailed(msgspec.Struct, frozen=True):
    """An upstream attempt that failed before the first token (from the router; not logged).

    The router may try again, on the same deployment or another; ``outcome`` says how it
    failed (``tokenwire.providers.router.attempt_outcome``).
    """

    provider: str
    upstream_model: str
    outcome: AttemptOutcome


Event = (
    TextDelta | ToolCallDelta | Usage | PromptUsage | Finish | StreamError | Routed | AttemptFailed
)
