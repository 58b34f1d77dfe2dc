"""A streamed chat completion that survives dropped connections: :class:`AsyncStream`.

A background task (the *pump*) runs the request: it opens an attempt, hands each new chunk to
the caller through a bounded queue, and when the connection drops it resumes the stream from
the last event number it saw (SSE ``Last-Event-ID``, WebSocket ``chat.completion.resume``),
or, before any event, sends the request again with the same ``Idempotency-Key`` (which
attaches to the generation already running). Event numbers only grow, so the caller gets
every chunk exactly once and the completion is generated, and billed, once.

The pump is separate from the caller's waits so that a caller who stops waiting (a Ctrl-C, a
timeout of its own) does not tear a connection down half-way: :meth:`AsyncStream.close` then
cancels the generation upstream by its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from types import TracebackType

from tokenwire_client._transport import (
    Attempt,
    ChunkFrame,
    Dropped,
    EndFrame,
    StatusAnswer,
    StreamRequest,
    StreamTransport,
    wait_after_answer,
    wait_after_drop,
)
from tokenwire_client.errors import APIConnectionError, APIStatusError
from tokenwire_client.retry import RetryPolicy, RetryState
from tokenwire_client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    CompletionAccumulator,
    CompletionUsage,
)

log = logging.getLogger("tokenwire_client")
QUEUE_CHUNKS = 256  # chunks the pump may read ahead of a slow caller


class _End:
    """The queue's last item: the stream ended normally."""


_END = _End()


class AsyncStream:
    """An async iterator of :class:`ChatCompletionChunk`, resumed across dropped connections.

    ``stream_id`` (the completion id) is known once the gateway sent it; ``usage`` and
    ``finish_reason`` once the stream has ended. ``retries`` counts attempts sent again
    before any event arrived, ``resumes`` the times the stream was resumed mid-answer.
    """

    def __init__(
        self,
        transport: StreamTransport,
        request: StreamRequest,
        policy: RetryPolicy,
        *,
        yield_usage_chunk: bool,
        cancel_timeout_s: float,
    ) -> None:
        self._transport = transport
        self._request = request
        self._policy = policy
        self._yield_usage = yield_usage_chunk
        self._cancel_timeout_s = cancel_timeout_s
        self._queue: asyncio.Queue[ChatCompletionChunk | BaseException | _End] = asyncio.Queue(
            QUEUE_CHUNKS
        )
        self._first = asyncio.Event()  # something (a chunk, the end, an error) was queued
        self._known = asyncio.Event()  # the stream id is known, or the pump has ended
        self._pump: asyncio.Task[None] | None = None
        self._early_error: BaseException | None = None  # raised by ``_start``, not queued
        self._accumulator = CompletionAccumulator()
        self._exhausted = False
        self._closed = False
        self._ended = False  # the gateway said the stream is over
        self.stream_id: str | None = None
        self.usage: CompletionUsage | None = None
        self.finish_reason: str | None = None
        self.retries = 0
        self.resumes = 0

    # -- starting ----------------------------------------------------------------------------

    async def _start(self) -> None:
        """Start the pump; return once the first chunk is there, raise the first error."""
        self._pump = asyncio.get_running_loop().create_task(self._run(), name="tokenwire-stream")
        try:
            await self._first.wait()
        except BaseException:
            await self.close()
            raise
        if self._early_error is not None:
            self._exhausted = True
            raise self._early_error

    # -- the pump ----------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            async with self._transport.slot():
                await self._follow()
            await self._put(_END)
        except (APIStatusError, APIConnectionError) as exc:
            await self._put(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: handed to the caller, not lost in a task
            await self._put(exc)
        finally:
            self._known.set()
            self._first.set()

    async def _put(self, item: BaseException | _End) -> None:
        if isinstance(item, BaseException) and not self._first.is_set():
            self._early_error = item  # before any chunk: ``_start`` raises it
        else:
            await self._queue.put(item)
        self._first.set()

    async def _follow(self) -> None:
        """Attempts until the end: resume after drops, retry refusals, as the policy allows."""
        retry = RetryState(self._policy)
        after = 0
        while True:
            delivered = False
            try:
                attempt = await self._transport.open(self._request, self.stream_id, after)
            except Dropped as exc:
                await self._wait(retry, exc, after=after, delivered=False)
                continue
            except StatusAnswer as answer:
                await self._wait_after_answer(retry, answer, after)
                continue
            try:
                async for frame in attempt.frames():
                    self._learn(attempt)
                    if isinstance(frame, EndFrame):
                        self._finish(frame)
                        return
                    if frame.seq <= after:
                        continue  # already handed on (a replay overlapping what we had)
                    after = frame.seq
                    delivered = True
                    retry.progress()
                    await self._deliver(frame)
                self._learn(attempt)
                raise Dropped("the connection ended before the end of the stream")
            except Dropped as exc:
                self._learn(attempt)
                if attempt.connection_progressed:
                    retry.progress()  # the connection was alive: this loss starts a new run
                await self._wait(
                    retry, exc, after=after, delivered=delivered or attempt.connection_progressed
                )
            except StatusAnswer as answer:
                await self._wait_after_answer(retry, answer, after)
            finally:
                await attempt.aclose()

    def _learn(self, attempt: Attempt) -> None:
        if self.stream_id is None and attempt.stream_id is not None:
            self.stream_id = attempt.stream_id
            self._known.set()

    async def _deliver(self, frame: ChunkFrame) -> None:
        chunk = ChatCompletionChunk.from_dict(frame.data, frame.seq)
        self._accumulator.add(chunk)
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.choices and chunk.choices[0].finish_reason is not None:
            self.finish_reason = chunk.choices[0].finish_reason
        if chunk.usage is not None and not chunk.choices and not self._yield_usage:
            return  # the usage chunk the caller did not ask for (the client always does)
        await self._queue.put(chunk)
        self._first.set()

    def _finish(self, frame: EndFrame) -> None:
        self._ended = True
        if frame.usage is not None:
            self.usage = CompletionUsage.from_dict(frame.usage)
            self._accumulator.usage = self.usage
        if frame.finish_reason is not None:
            self.finish_reason = frame.finish_reason
            self._accumulator.finish_reason = self._accumulator.finish_reason or frame.finish_reason

    async def _wait(self, retry: RetryState, exc: Dropped, *, after: int, delivered: bool) -> None:
        wait = wait_after_drop(retry, exc, after_progress=delivered)
        if after > 0:
            self.resumes += 1
        else:
            self.retries += 1
        log.info(
            "connection lost (%s); %s in %.3f s",
            exc,
            f"resuming {self.stream_id} after event {after}" if after else "sending again",
            wait,
            extra={"tokenwire_retry": {"reason": "connection", "wait_s": wait, "after": after}},
        )
        await asyncio.sleep(wait)

    async def _wait_after_answer(self, retry: RetryState, answer: StatusAnswer, after: int) -> None:
        """Retry an error answer, as a new generation when the first one failed; an answer
        once part of the stream was delivered (the generation failed mid-answer) is final."""
        if after > 0 and answer.generation_failed:
            raise answer.error
        wait = wait_after_answer(retry, answer)
        if answer.generation_failed:
            self._request.renew_idempotency_key()
            self.stream_id = None  # the failed generation is over: the retry starts another
        self.retries += 1
        error = answer.error
        log.info(
            "gateway answered %s; retrying in %.3f s",
            error,
            wait,
            extra={
                "tokenwire_retry": {
                    "reason": "status",
                    "status": error.status,
                    "code": error.code,
                    "retry_after_s": error.retry_after,
                    "wait_s": wait,
                    "request_id": self._request.request_id,
                }
            },
        )
        await asyncio.sleep(wait)

    # -- reading -----------------------------------------------------------------------------

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        if self._exhausted:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, _End):
            self._exhausted = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._exhausted = True
            raise item
        return item

    @property
    def text_stream(self) -> AsyncIterator[str]:
        """The answer's text only, piece by piece."""
        return self._texts()

    async def _texts(self) -> AsyncIterator[str]:
        async for chunk in self:
            if chunk.text:
                yield chunk.text

    async def get_final_completion(self) -> ChatCompletion:
        """Read the stream to its end; the whole completion it adds up to."""
        async for _chunk in self:
            pass
        return self._accumulator.completion()

    # -- ending ------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True once the gateway has said the stream is over."""
        return self._ended

    async def close(self) -> None:
        """Stop reading; a stream that has not ended is cancelled upstream and, within the
        cancel timeout, read to its end, so ``usage`` then says what the cancelled answer
        cost. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._exhausted = True
        pump = self._pump
        try:
            if pump is not None and not pump.done() and not self._ended:
                await self._cancel(pump)
        finally:
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pump

    async def _cancel(self, pump: asyncio.Task[None]) -> None:
        """Cancel upstream, then let the pump read the cancelled stream's end (its usage)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._cancel_timeout_s):
                if self.stream_id is None and self._transport.cancel_needs_stream_id:
                    await self._known.wait()  # the id arrives with the first event
                if self._ended or not await self._transport.cancel(self._request, self.stream_id):
                    return
                while not pump.done():  # drain what the pump queues until it ends
                    getter = asyncio.ensure_future(self._queue.get())
                    try:
                        await asyncio.wait({getter, pump}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        getter.cancel()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_stream(
    transport: StreamTransport,
    request: StreamRequest,
    policy: RetryPolicy,
    *,
    yield_usage_chunk: bool,
    cancel_timeout_s: float,
) -> AsyncStream:
    """Start a stream; returns once its first chunk arrived (raises what came instead)."""
    stream = AsyncStream(
        transport,
        request,
        policy,
        yield_usage_chunk=yield_usage_chunk,
        cancel_timeout_s=cancel_timeout_s,
    )
    await stream._start()
    return stream
