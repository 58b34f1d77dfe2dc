"""What the provider tests share: reading a provider's stream to its end."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tokenwire.errors import GatewayError
from tokenwire.streams.events import Event, PromptUsage


async def collect_events(
    stream: AsyncIterator[Event],
) -> tuple[list[Event], GatewayError | None]:
    """The stream's events but PromptUsage (bookkeeping, checked on its own), and the error
    that ended it (None if it ended normally)."""
    events: list[Event] = []
    try:
        async for event in stream:
            if not isinstance(event, PromptUsage):
                events.append(event)
    except GatewayError as exc:
        return events, exc
    return events, None
