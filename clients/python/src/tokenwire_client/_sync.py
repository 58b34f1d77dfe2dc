"""The synchronous client: :class:`AsyncClient` run on a private event loop in its own thread.

Nothing here re-implements the client: every call is the async method, submitted to the
loop with ``asyncio.run_coroutine_threadsafe`` and waited for. A wait interrupted by the
caller (Ctrl-C: ``KeyboardInterrupt``) cancels the submitted call on the loop and waits for
it to clean up, so an interrupted ``create()`` cancels its request upstream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

from tokenwire_client._client import DEFAULT_TIMEOUT_S, AsyncClient, Transport
from tokenwire_client._stream import AsyncStream
from tokenwire_client.retry import RetryPolicy
from tokenwire_client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    CompletionUsage,
    KeyValidation,
    Model,
    ModelList,
)

T = TypeVar("T")
CLEANUP_WAIT_S = 10.0  # how long an interrupted call may take to cancel its request


class _LoopThread:
    """An event loop running for ever in a daemon thread, until ``stop``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="tokenwire-client", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (or its exception)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():  # the wait was interrupted, not the call
                future.cancel()
                concurrent.futures.wait([future], timeout=CLEANUP_WAIT_S)
            raise

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self.in_loop_thread:  # collected on its own thread: it cannot wait for itself
            self.loop.call_soon(self.loop.stop)
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=CLEANUP_WAIT_S)
        if not self._thread.is_alive():
            self.loop.close()


def _shutdown(runner: _LoopThread, client: AsyncClient) -> None:
    """Close the client's connections, then the loop (also when the client is collected)."""
    if not runner.loop.is_closed() and runner.loop.is_running() and not runner.in_loop_thread:
        try:
            runner.run(client.aclose())
        finally:
            runner.stop()


class Client:
    """A tokenwire gateway client for synchronous code; the arguments are
    :class:`AsyncClient`'s (``base_url``, ``api_key``, ``transport="sse" | "ws"``,
    ``max_retries``, ``timeout``, ...)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: Transport = "sse",
        max_retries: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry_policy: RetryPolicy | None = None,
        ws_ping_interval: float = 20.0,
        ws_max_concurrent_requests: int = 32,
    ) -> None:
        self._async = AsyncClient(
            base_url,
            api_key,
            transport=transport,
            max_retries=max_retries,
            timeout=timeout,
            retry_policy=retry_policy,
            ws_ping_interval=ws_ping_interval,
            ws_max_concurrent_requests=ws_max_concurrent_requests,
        )
        self._runner = _LoopThread()
        self._finalizer = weakref.finalize(self, _shutdown, self._runner, self._async)
        self.base_url = self._async.base_url
        self.transport = transport
        self.chat = Chat(self._async, self._runner)
        self.models = Models(self._async, self._runner)

    def validate_key(self) -> KeyValidation:
        """Whether the gateway accepts the API key, and why not."""
        return self._runner.run(self._async.validate_key())

    def close(self) -> None:
        """Close the connections and stop the client's thread."""
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Chat:
    """``client.chat``."""

    def __init__(self, client: AsyncClient, runner: _LoopThread) -> None:
        self.completions = Completions(client, runner)


class Completions:
    """``client.chat.completions``."""

    def __init__(self, client: AsyncClient, runner: _LoopThread) -> None:
        self._client = client
        self._runner = runner

    @overload
    def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: Literal[True],
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Stream: ...

    @overload
    def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: Literal[False] = False,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> ChatCompletion: ...

    @overload
    def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: bool,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Stream | ChatCompletion: ...

    def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: bool = False,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Stream | ChatCompletion:
        """See :meth:`AsyncCompletions.create`; a stream is a (sync) :class:`Stream`."""
        result = self._runner.run(
            self._client.chat.completions.create(
                model=model,
                messages=messages,
                stream=stream,
                idempotency_key=idempotency_key,
                **params,
            )
        )
        if isinstance(result, AsyncStream):
            return Stream(result, self._runner)
        return result


class Models:
    """``client.models``."""

    def __init__(self, client: AsyncClient, runner: _LoopThread) -> None:
        self._client = client
        self._runner = runner

    def list(self) -> ModelList:
        """The gateway's catalog."""
        return self._runner.run(self._client.models.list())

    def retrieve(self, model: str) -> Model:
        """One model of the catalog."""
        return self._runner.run(self._client.models.retrieve(model))


class Stream:
    """An iterator of :class:`ChatCompletionChunk`: :class:`AsyncStream`, synchronously."""

    def __init__(self, stream: AsyncStream, runner: _LoopThread) -> None:
        self._stream = stream
        self._runner = runner

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        return self

    def __next__(self) -> ChatCompletionChunk:
        try:
            return self._runner.run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    @property
    def text_stream(self) -> Iterator[str]:
        """The answer's text only, piece by piece."""
        for chunk in self:
            if chunk.text:
                yield chunk.text

    def get_final_completion(self) -> ChatCompletion:
        """Read the stream to its end; the whole completion it adds up to."""
        return self._runner.run(self._stream.get_final_completion())

    @property
    def stream_id(self) -> str | None:
        """The completion id, once the gateway sent it."""
        return self._stream.stream_id

    @property
    def usage(self) -> CompletionUsage | None:
        """Tokens and cost, once the stream has ended."""
        return self._stream.usage

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason

    @property
    def finished(self) -> bool:
        return self._stream.finished

    @property
    def retries(self) -> int:
        """Attempts sent again before any event arrived."""
        return self._stream.retries

    @property
    def resumes(self) -> int:
        """Times the stream was resumed mid-answer after a dropped connection."""
        return self._stream.resumes

    def close(self) -> None:
        """Stop reading; a stream that has not ended is cancelled upstream."""
        self._runner.run(self._stream.close())

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
