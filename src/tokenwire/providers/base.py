"""The provider Protocol: what every upstream adapter implements.

A provider turns a validated :class:`~tokenwire.wire.schema.ChatRequest` into an async
iterator of typed events (``TextDelta``, ``ToolCallDelta``, ``Usage``, ``Finish``). Errors are
raised as :class:`~tokenwire.errors.GatewayError` subclasses; the Generation turns them into a
JSON error (before the first token) or an in-band error event (after). Closing the iterator
(``aclose``) must stop the upstream work promptly: that is how cancellation reaches it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from tokenwire.streams.events import Event
from tokenwire.wire.schema import ChatRequest


@dataclass(frozen=True, slots=True)
class ProviderCall:
    """One completion to run: the request, its original JSON, and the upstream model name.

    Providers read the typed ``request`` only. ``raw_body`` is the client's JSON object as it
    came, for an OpenAI-compatible upstream to receive vendor extensions unchanged; nothing
    may *read* a field from it. ``max_output_tokens`` is the answer's limit that admission
    reserved for (the request's own, or the configured default, capped by the model's):
    providers send it upstream so that no answer is longer than what was paid for.
    """

    request: ChatRequest
    upstream_model: str
    raw_body: dict[str, Any]
    max_output_tokens: int | None = None

    @property
    def output_limit(self) -> int | None:
        """The answer's token limit: the admitted one, else the request's own."""
        if self.max_output_tokens is not None:
            return self.max_output_tokens
        return self.request.output_limit


class Provider(Protocol):
    """An upstream adapter. One module per provider kind."""

    name: str

    def stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        """Run the completion, yielding events as they arrive."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads and models held by the provider."""
        ...
