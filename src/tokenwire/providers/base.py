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
    """One completion to run: the request, its original JSON, and the upstream model name."""

    request: ChatRequest
    upstream_model: str
    raw_body: dict[str, Any]


class Provider(Protocol):
    """An upstream adapter. One module per provider kind."""

    name: str

    def stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        """Run the completion, yielding events as they arrive."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads and models held by the provider."""
        ...
