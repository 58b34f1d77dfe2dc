"""One completion, independent of the transport that reads it.

A :class:`Generation` runs a provider's event stream in its own task and appends each event
to a numbered :class:`~tokenwire.streams.log.MemoryStreamLog`. Readers (the SSE encoder, the
WebSocket encoder, a JSON aggregator) subscribe and read from any sequence number. When the
last reader leaves before the end, the generation is cancelled after a grace period (0 s by
default), which closes the upstream request. It settles exactly once, whoever was listening.

The log always ends in one of two canonical shapes, whatever order the provider used::

    deltas…, Finish(reason), Usage        (completed, or cancelled with reason "cancelled")
    deltas…, StreamError                  (failed, or interrupted by a drain; usage so far
                                           is on ``Generation.usage``)

**Every generation ends**, however its provider behaves: a gateway error, a cancel, or any
other exception (a bug below us, reported as a logged ``500 internal_error``) all lead to one
``finally`` that ends the log, runs the ``on_end`` hook (limits: the stream slot is free
before a reader sees the end) and then the ``on_settle`` hook (money), each exactly once.

A generation may be given a completion budget: it stops with ``length`` once it has appended
that many deltas, and a :class:`~tokenwire.streams.events.PromptUsage` may lower the budget
(``limit_for_prompt``) so that what it costs stays within what was reserved.

Lifecycle (``_TRANSITIONS`` is the whole table; anything else is a bug and raises)::

    PENDING ──first delta──► STREAMING ──► COMPLETED | FAILED | CANCELLED
       └────────────────────────────────► COMPLETED | FAILED | CANCELLED
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Literal

import msgspec

from tokenwire.errors import GatewayError, UpstreamError, unexpected
from tokenwire.observability.logs import completion_id_var
from tokenwire.streams.events import (
    AttemptFailed,
    Event,
    Finish,
    FinishReason,
    PromptUsage,
    Routed,
    StreamError,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from tokenwire.streams.log import Heartbeat, MemoryStreamLog

_log = logging.getLogger("tokenwire.generation")
END_HOOK_WAIT_S = 0.25
"""How long the end of a stream waits for its limits to be released (see ``Generation._end``)."""


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
EndHook = Callable[["Generation"], Awaitable[None] | None]
"""Run as a generation ends, before readers see the end: None when its work is already done
(nothing to await: the stream's end waits for no task), else what to await."""
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
        on_end: EndHook | None = None,
        on_settle: SettleHook | None = None,
        key_id: str = "",
        include_usage: bool = False,
        completion_limit: int | None = None,
        limit_for_prompt: Callable[[PromptUsage], int] | None = None,
        price: Callable[[Usage], int] | None = None,
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
        self.last_token_at: float | None = None
        self.ended_at: float | None = None
        self.attempts: list[Routed | AttemptFailed] = []  # the router's upstream attempts
        self.reported_prompt: PromptUsage | None = None  # the upstream's early count, if any
        self._events = events
        self._prompt_estimate = prompt_tokens_estimate
        self._grace_s = disconnect_grace_s
        self._on_end = on_end
        self._on_settle = on_settle
        self._completion_limit = completion_limit if completion_limit is not None else 1 << 62
        self._limit_for_prompt = limit_for_prompt
        self._price = price  # set when the request asked for its cost in the final usage
        self._usage_seen: Usage | None = None
        self._readers = 0
        self._deltas = 0
        self._grace_handle: asyncio.TimerHandle | None = None
        self._grace_task: asyncio.Task[None] | None = None
        self.extend_grace: GraceHook | None = None  # set by a shared stream store
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self._ending = False  # the provider loop is over: a cancel has nothing left to stop
        self._interrupt: GatewayError | None = None  # the error a drain ends it with
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

    @property
    def deltas(self) -> int:
        """Text and tool-call deltas appended to the log so far."""
        return self._deltas

    async def wait_settled(self) -> None:
        """Wait until the generation has ended and its settle hook has run."""
        await self._settled.wait()

    def cancel(self, cause: CancelCause) -> None:
        """Stop generating (closes the upstream request); the log ends with ``cancelled``."""
        if self.finished or self._ending or self._task is None:
            return
        if self.cancel_cause is None:
            self.cancel_cause = cause
        if self._running:
            self._task.cancel()
        # else: cancelling a task before its first step would skip _run entirely (no finish,
        # no settle, the reservation held for ever); _run sees cancel_cause and ends instead.

    def interrupt(self, error: GatewayError) -> None:
        """End it now with ``error`` as its last event (a drain's timeout): a cancel whose
        readers see an error, billed like a failure (nothing before the first token)."""
        if self.finished or self._ending or self._task is None:
            return
        self._interrupt = error
        self.cancel("shutdown")

    @property
    def interrupted(self) -> bool:
        """Whether it ended with the error given to :meth:`interrupt`."""
        return self._interrupt is not None and self.error is self._interrupt

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
        """Pull the provider's events; whatever happens, end the log and settle exactly once.

        The provider loop may end normally, by a cancel, by a gateway error, or by any other
        exception (a bug somewhere below): all of them lead to the same ``finally``, which ends
        the log, releases limits and settles. Nothing that raises can skip it.
        """
        usage: Usage | None = None
        finish: FinishReason | None = None
        error: GatewayError | None = None
        self._running = True
        # Lines logged while the provider runs (its errors, ours) carry the completion id; not
        # the hooks' (they name it themselves), nor tasks they may start that outlive it.
        logging_as = completion_id_var.set(self.id)
        try:
            try:
                usage, finish, error = await self._pull()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                usage, finish, error = self._usage_seen, "cancelled", self._interrupt
                if error is not None:
                    finish = None
            except GatewayError as exc:
                usage, error = self._usage_seen, exc
            except Exception as exc:  # noqa: BLE001 - a bug below us: logged, reported as a 500
                usage, error = self._usage_seen, unexpected(exc, _log, f"completion {self.id}")
            finally:
                self._ending = True  # from here on a cancel changes nothing
                await self._close_events()
        finally:
            completion_id_var.reset(logging_as)
            await self._end(usage, finish, error)

    async def _pull(self) -> tuple[Usage | None, FinishReason | None, GatewayError | None]:
        """Append the provider's deltas to the log; the usage, finish and error it reported."""
        log = self.log
        finish: FinishReason | None = None
        if self.cancel_cause is not None:
            raise asyncio.CancelledError  # cancelled before the first step
        async for event in self._events:
            if isinstance(event, TextDelta | ToolCallDelta):
                if self._deltas >= self._completion_limit:
                    return None, "length", None  # one delta beyond the budget: stop here
                self.last_token_at = time.perf_counter()  # ITL, observed once at the end
                if self._deltas == 0:
                    self.first_token_at = self.last_token_at
                    self._move(GenerationState.STREAMING)
                self._deltas += 1
                log.append(event)
            elif isinstance(event, Usage):
                self._usage_seen = event
            elif isinstance(event, PromptUsage):
                self.reported_prompt = event
                if self._limit_for_prompt is not None:
                    limit = self._limit_for_prompt(event)
                    self._completion_limit = min(self._completion_limit, max(0, limit))
                    if self._deltas > self._completion_limit:
                        return None, "length", None
            elif isinstance(event, Finish):
                finish = event.reason
            elif isinstance(event, Routed):
                self.provider = event.provider
                self.attempts.append(event)
            elif isinstance(event, AttemptFailed):
                self.attempts.append(event)
            else:
                return self._usage_seen, None, event.error
        if finish is None:
            error = UpstreamError("The upstream ended the stream without a finish reason.")
            return self._usage_seen, None, error
        return self._usage_seen, finish, None

    async def _close_events(self) -> None:
        """Close the provider's iterator (this closes the upstream request)."""
        try:
            await _aclose(self._events)
        except Exception as exc:  # noqa: BLE001 - closing must not stop the ending
            _log.warning("closing the provider stream of %s failed: %r", self.id, exc)

    async def _end(
        self, usage: Usage | None, finish: FinishReason | None, error: GatewayError | None
    ) -> None:
        """Release limits, end the log (readers see the end), then settle money; in that order.

        Limits are released before readers see the end, so a client that sends its next
        request the moment it reads ``[DONE]`` finds its stream slot free; money settles after.
        A release slower than ``END_HOOK_WAIT_S`` (a limiter store that hangs) goes on in the
        background rather than holding back the end of the stream.
        """
        self.ended_at = time.perf_counter()
        self.usage = self._final_usage(usage, finish, error)
        if self._price is not None and error is None:
            self.usage = msgspec.structs.replace(self.usage, charge_micro=self._price(self.usage))
        try:
            hook = None if self._on_end is None else self._on_end(self)
            if hook is not None:
                await _run_hook(hook, self.id, "releasing the limits of", END_HOOK_WAIT_S)
        finally:
            self._close_log(finish, error)
            try:
                if self._on_settle is not None:
                    await self._on_settle(self)  # awaited here: no cancel reaches an ending task
            except Exception as exc:  # noqa: BLE001 - logged; the generation has ended all the same
                _log.error("settling %s failed", self.id, exc_info=exc)
            finally:
                self._settled.set()

    def _final_usage(
        self, usage: Usage | None, finish: FinishReason | None, error: GatewayError | None
    ) -> Usage:
        """What is billed: the upstream's final figures, else the best we know.

        Without final figures (a cancel, a failure, a stop at the budget, an upstream that
        reports none), the prompt is the upstream's own count when it gave one (early, or
        before failing), else our estimate; the answer is at least the deltas received. Such
        usage is marked ``estimated``.
        """
        if usage is not None and error is None and finish not in (None, "cancelled"):
            return usage
        prompt: Usage | PromptUsage | None = self.reported_prompt
        completion = self._deltas
        if usage is not None and not usage.estimated:
            prompt = usage
            completion = max(completion, usage.completion_tokens)
        if prompt is None:
            return Usage(self._prompt_estimate, completion, True)
        return Usage(
            prompt.prompt_tokens,
            completion,
            True,
            cache_write_tokens=prompt.cache_write_tokens,
            cache_read_tokens=prompt.cache_read_tokens,
        )

    def _close_log(self, finish: FinishReason | None, error: GatewayError | None) -> None:
        assert self.usage is not None
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
            self.log.append(self.usage)
        self.log.close()

    def read(
        self, *, after: int = 0, heartbeat_s: float | None = None
    ) -> AsyncGenerator[list[Event] | None, None]:
        """Batches of events after ``after`` (see :func:`read_events`)."""
        return read_events(self, after=after, heartbeat_s=heartbeat_s)


async def _run_hook(hook: Awaitable[None], completion_id: str, what: str, wait_s: float) -> None:
    """Await a hook (shielded from a cancel) for up to ``wait_s``, after which it goes on in
    the background; log what it raised."""
    task = asyncio.ensure_future(hook)
    task.add_done_callback(partial(_log_hook_failure, completion_id=completion_id, what=what))
    with contextlib.suppress(BaseException):  # its failure is logged by the callback
        await asyncio.wait_for(asyncio.shield(task), wait_s)


def _log_hook_failure(task: asyncio.Future[None], *, completion_id: str, what: str) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error(
            "%s %s failed",
            what,
            completion_id,
            exc_info=task.exception(),
            extra={"fields": {"completion_id": completion_id}},
        )


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
    heartbeat = None if heartbeat_s is None else Heartbeat(heartbeat_s)
    try:
        while True:
            if not await log.wait_beyond(seq, heartbeat):
                yield None
                continue
            batch = log.read_after(seq)
            if batch:
                seq += len(batch)
                yield batch
            elif log.closed:
                return
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        generation.detach()
