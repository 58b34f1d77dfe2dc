"""One completion, independent of the transport that reads it.

A :class:`Generation` runs a provider's event stream in its own task and appends each event
to a numbered :class:`~tokenwire.streams.log.MemoryStreamLog`. Readers (the SSE encoder, the
WebSocket encoder, a JSON aggregator) subscribe and read from any sequence number. When the
last reader leaves before the end, the generation is cancelled after a grace period (0 s by
default), which closes the upstream request. It settles exactly once, whoever was listening.

The log always ends in one of two canonical shapes, whatever order the provider used::

    deltas…, Finish(reason), Usage        (completed, or cancelled with reason "cancelled")
    deltas…, StreamError                  (failed; usage so far is on ``Generation.usage``)

Lifecycle (``_TRANSITIONS`` is the whole table; anything else is a bug and raises)::

    PENDING ──first delta──► STREAMING ──► COMPLETED | FAILED | CANCELLED
       └────────────────────────────────► COMPLETED | FAILED | CANCELLED
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Literal

from tokenwire.errors import GatewayError, UpstreamError
from tokenwire.streams.events import (
    Event,
    Finish,
    FinishReason,
    Routed,
    StreamError,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from tokenwire.streams.log import MemoryStreamLog


class GenerationState(enum.Enum):
    PENDING = "pending"
    STREAMING = "streaming"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_TERMINAL = frozenset(
    {GenerationState.COMPLETED, GenerationState.FAILED, GenerationState.CANCELLED}
)
_TRANSITIONS: dict[GenerationState, frozenset[GenerationState]] = {
    GenerationState.PENDING: frozenset({GenerationState.STREAMING}) | _TERMINAL,
    GenerationState.STREAMING: _TERMINAL,
    GenerationState.COMPLETED: frozenset(),
    GenerationState.FAILED: frozenset(),
    GenerationState.CANCELLED: frozenset(),
}

CancelCause = Literal["client_cancelled", "client_disconnected", "shutdown"]
SettleHook = Callable[["Generation"], Awaitable[None]]
GraceHook = Callable[[], Awaitable[float]]
"""Asked when the grace window ends: seconds to wait more (readers elsewhere), or 0 to cancel."""


class Generation:
    """A running (or finished) completion and its event log."""

    def __init__(
        self,
        *,
        completion_id: str,
        model: str,
        events: AsyncIterator[Event],
        prompt_tokens_estimate: int,
        disconnect_grace_s: float = 0.0,
        on_settle: SettleHook | None = None,
        key_id: str = "",
        include_usage: bool = False,
    ) -> None:
        self.id = completion_id
        self.model = model
        self.key_id = key_id  # only this key may read the stream
        self.include_usage = include_usage  # what the creating request asked for
        self.created = int(time.time())
        self.log = MemoryStreamLog()
        self.state = GenerationState.PENDING
        self.usage: Usage | None = None
        self.finish_reason: FinishReason | None = None
        self.error: GatewayError | None = None
        self.cancel_cause: CancelCause | None = None
        self.response_headers: dict[str, str] = {}  # rate-limit headers from admission
        self.provider: str | None = None  # the deployment that served, when routed
        self.started_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self._events = events
        self._prompt_estimate = prompt_tokens_estimate
        self._grace_s = disconnect_grace_s
        self._on_settle = on_settle
        self._readers = 0
        self._deltas = 0
        self._grace_handle: asyncio.TimerHandle | None = None
        self._grace_task: asyncio.Task[None] | None = None
        self.extend_grace: GraceHook | None = None  # set by a shared stream store
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self._settled = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start pulling events from the provider in a task of its own."""
        if self._task is not None:
            raise RuntimeError("generation already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"gen-{self.id}")

    @property
    def finished(self) -> bool:
        return self.state in _TERMINAL

    async def wait_settled(self) -> None:
        """Wait until the generation has ended and its settle hook has run."""
        await self._settled.wait()

    def cancel(self, cause: CancelCause) -> None:
        """Stop generating (closes the upstream request); the log ends with ``cancelled``."""
        if self.finished or self._task is None:
            return
        if self.cancel_cause is None:
            self.cancel_cause = cause
        if self._running:
            self._task.cancel()
        # else: cancelling a task before its first step would skip _run entirely (no finish,
        # no settle, the reservation held for ever); _run sees cancel_cause and ends instead.

    # -- readers ---------------------------------------------------------------------------

    def attach(self) -> None:
        """Register a reader; a pending grace-period cancel is called off."""
        self._readers += 1
        if self._grace_handle is not None:
            self._grace_handle.cancel()
            self._grace_handle = None

    def detach(self) -> None:
        """Unregister a reader; the last one leaving early starts the grace period."""
        self._readers -= 1
        if self._readers > 0 or self.finished:
            return
        if self._grace_s <= 0:
            self.cancel("client_disconnected")
        else:
            self._arm_grace(self._grace_s)

    def _arm_grace(self, delay_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._grace_handle = loop.call_later(delay_s, self._grace_over)

    def _grace_over(self) -> None:
        self._grace_handle = None
        if self._readers > 0 or self.finished:
            return
        if self.extend_grace is None:
            self.cancel("client_disconnected")
            return
        loop = asyncio.get_running_loop()
        self._grace_task = loop.create_task(self._ask_for_more_grace(self.extend_grace))

    async def _ask_for_more_grace(self, extend_grace: GraceHook) -> None:
        try:
            more_s = await extend_grace()
        except Exception:  # noqa: BLE001 - cannot ask: the window is over, as configured
            more_s = 0.0
        if self._readers > 0 or self.finished:
            return
        if more_s > 0:
            self._arm_grace(more_s)
        else:
            self.cancel("client_disconnected")

    # -- the runner ------------------------------------------------------------------------

    def _move(self, new: GenerationState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal generation transition {self.state} -> {new}")
        self.state = new

    async def _run(self) -> None:
        log = self.log
        usage: Usage | None = None
        finish: FinishReason | None = None
        error: GatewayError | None = None
        self._running = True
        try:
            if self.cancel_cause is not None:
                raise asyncio.CancelledError  # cancelled before the first step
            async for event in self._events:
                if isinstance(event, TextDelta | ToolCallDelta):
                    if self._deltas == 0:
                        self.first_token_at = time.perf_counter()
                        self._move(GenerationState.STREAMING)
                    self._deltas += 1
                    log.append(event)
                elif isinstance(event, Usage):
                    usage = event
                elif isinstance(event, Finish):
                    finish = event.reason
                elif isinstance(event, Routed):
                    self.provider = event.provider
                else:
                    error = event.error
                    break
            if error is None and finish is None:
                error = UpstreamError("The upstream ended the stream without a finish reason.")
        except asyncio.CancelledError:
            finish = "cancelled"
            error = None
        except GatewayError as exc:
            error = exc
        finally:
            await _aclose(self._events)
        self._finish(usage, finish, error)
        try:
            if self._on_settle is not None:
                await asyncio.shield(self._on_settle(self))
        finally:
            self._settled.set()

    def _finish(
        self, usage: Usage | None, finish: FinishReason | None, error: GatewayError | None
    ) -> None:
        self.ended_at = time.perf_counter()
        if usage is None or (finish == "cancelled" and usage.completion_tokens < self._deltas):
            usage = Usage(self._prompt_estimate, self._deltas, estimated=True)
        self.usage = usage
        if error is not None:
            self.error = error
            self._move(GenerationState.FAILED)
            self.log.append(StreamError(error))
        else:
            assert finish is not None
            self.finish_reason = finish
            self._move(
                GenerationState.CANCELLED if finish == "cancelled" else GenerationState.COMPLETED
            )
            self.log.append(Finish(finish))
            self.log.append(usage)
        self.log.close()

    def read(
        self, *, after: int = 0, heartbeat_s: float | None = None
    ) -> AsyncGenerator[list[Event] | None, None]:
        """Batches of events after ``after`` (see :func:`read_events`)."""
        return read_events(self, after=after, heartbeat_s=heartbeat_s)


async def _aclose(events: AsyncIterator[Event]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


async def read_events(
    generation: Generation, *, after: int = 0, heartbeat_s: float | None = None
) -> AsyncGenerator[list[Event] | None, None]:
    """Yield batches of events after ``after``; ``None`` when ``heartbeat_s`` passed idle.

    Holds a reader registration while iterating, so closing the iterator early (a client gone)
    lets the generation cancel once no reader is left.
    """
    generation.attach()
    log = generation.log
    seq = after
    try:
        while True:
            if not await log.wait_beyond(seq, heartbeat_s):
                yield None
                continue
            batch = log.read_after(seq)
            if batch:
                seq += len(batch)
                yield batch
            elif log.closed:
                return
    finally:
        generation.detach()
