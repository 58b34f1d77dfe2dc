"""What a reader (the SSE, WebSocket and JSON encoders) needs from a stream.

Two things satisfy it: a :class:`~tokenwire.streams.generation.Generation` running in this
process, and a :class:`~tokenwire.streams.remote.RemoteStream` that follows, through Redis, a
generation another gateway process runs. Readers cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from tokenwire.errors import GatewayError
from tokenwire.streams.events import Event, FinishReason, Usage
from tokenwire.streams.generation import CancelCause


class StreamSource(Protocol):
    """A completion's identity, its numbered events, and a way to stop it."""

    @property
    def id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def created(self) -> int: ...
    @property
    def include_usage(self) -> bool:
        """What the creating request asked for (a resume answers the same way)."""
        ...

    @property
    def response_headers(self) -> dict[str, str]: ...

    # Known once the stream has ended (a resume may start after its last event).
    @property
    def finish_reason(self) -> FinishReason | None: ...
    @property
    def usage(self) -> Usage | None: ...
    @property
    def error(self) -> GatewayError | None: ...

    def read(
        self, *, after: int = 0, heartbeat_s: float | None = None
    ) -> AsyncGenerator[list[Event] | None, None]:
        """Batches of the events numbered above ``after``; ``None`` after ``heartbeat_s`` idle.

        Iterating holds a reader registration: closing the iterator early (the client left)
        lets the generation cancel once no reader is left and its grace window has passed.
        """
        ...

    def cancel(self, cause: CancelCause) -> None:
        """Stop generating; the log ends with finish reason ``cancelled``."""
        ...
