"""What the resumable-stream loop needs from a transport (SSE over HTTP, or WebSocket).

A transport opens one *connection attempt* of a streamed request: the request itself (the
first time, or again with the same ``Idempotency-Key`` when no event has arrived), or a
resume of a known stream after the last event received. An attempt yields numbered chunk
frames and one end frame; it raises :class:`Dropped` when the connection fails (the loop
resumes), :class:`StatusAnswer` when the gateway answered with an error, or a typed
:class:`~tokenwire_client.errors.APIStatusError` for an error in the middle of the answer.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenwire_client.errors import APIConnectionError, APIStatusError, APITimeoutError
from tokenwire_client.retry import GiveUp, RetryState, is_retryable


@dataclass(frozen=True, slots=True)
class ChunkFrame:
    """A ``chat.completion.chunk`` (its OpenAI fields only) and its event number."""

    seq: int
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class EndFrame:
    """The stream ended normally; the WebSocket's ``done`` carries usage and finish reason."""

    usage: Mapping[str, Any] | None = None
    finish_reason: str | None = None


Frame = ChunkFrame | EndFrame


class Dropped(Exception):
    """The connection failed or was cut; ``timed_out`` when nothing arrived in time."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class StatusAnswer(Exception):
    """The gateway answered the attempt with an error, before any event.

    ``generation_failed`` is true when the error is the outcome of a generation that the
    Idempotency-Key is now bound to (sending the same key again would replay the failure), so
    a retry needs a fresh key.
    """

    def __init__(self, error: APIStatusError, *, generation_failed: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.generation_failed = generation_failed


@dataclass(slots=True)
class StreamRequest:
    """One logical request, across all its attempts."""

    body: dict[str, Any]
    idempotency_key: str
    request_id: str = field(default_factory=lambda: "r-" + secrets.token_hex(8))

    def renew_idempotency_key(self) -> None:
        """A fresh key, for a retry after the first generation failed."""
        self.idempotency_key = new_idempotency_key()


def new_idempotency_key() -> str:
    """A random Idempotency-Key (128 bits)."""
    return "twc-" + secrets.token_urlsafe(16)


class Attempt(Protocol):
    """One connection's worth of a stream."""

    @property
    def stream_id(self) -> str | None:
        """The stream's id once known (SSE: the ``X-Stream-Id`` header; WS: the first chunk)."""
        ...

    def frames(self) -> AsyncIterator[Frame]:
        """The frames this connection delivers; see the module docstring for what it raises."""
        ...

    @property
    def connection_progressed(self) -> bool:
        """Whether the connection delivered anything since the attempt began (for one shared
        by many requests, possibly only others' messages): it was alive, so its loss is a
        fresh failure, not one more of a run."""
        ...

    async def aclose(self) -> None:
        """Release the connection (an SSE response, a WebSocket route)."""
        ...


class StreamTransport(Protocol):
    """Opens attempts of streamed requests and cancels them."""

    cancel_needs_stream_id: bool
    """True when a request can be cancelled only by its stream id (which comes with its
    first event), False when the transport names requests itself (WebSocket request ids)."""

    async def open(self, request: StreamRequest, stream_id: str | None, after: int) -> Attempt:
        """Send the request (``stream_id`` None) or resume the stream after event ``after``."""
        ...

    async def cancel(self, request: StreamRequest, stream_id: str | None) -> bool:
        """Stop the request's generation upstream (best effort; never raises); whether the
        cancel reached the gateway."""
        ...

    def slot(self) -> AbstractAsyncContextManager[Any, Any]:
        """Held for a request's whole life (the WebSocket's per-socket request cap)."""
        ...


def wait_after_drop(retry: RetryState, dropped: Dropped, *, after_progress: bool) -> float:
    """The wait before the next attempt after a dropped connection; raises
    :class:`APIConnectionError` (:class:`APITimeoutError`) when the policy gives up."""
    try:
        return retry.next_wait(after_progress=after_progress)
    except GiveUp as give_up:
        error = APITimeoutError if dropped.timed_out else APIConnectionError
        raise error(f"Connection to the gateway failed ({dropped}); {give_up}.") from dropped


def wait_after_answer(retry: RetryState, answer: StatusAnswer) -> float:
    """The wait before the next attempt after an error answer (never shorter than the gateway
    asked for); raises the error when it is not retryable or the policy gives up."""
    if not is_retryable(answer.error):
        raise answer.error
    try:
        return retry.next_wait(asked_s=answer.error.retry_after)
    except GiveUp:
        raise answer.error from None
