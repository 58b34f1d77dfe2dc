"""HTTP to the gateway (aiohttp): JSON calls with retries, and streams over SSE.

A streamed request is ``POST /v1/chat/completions`` with an ``Idempotency-Key`` (which makes
it resumable); its events carry ``id:`` lines. A dropped stream is resumed with ``GET
/v1/chat/completions/{stream_id}/stream`` and ``Last-Event-ID``; a stream is stopped with
``POST /v1/chat/completions/{stream_id}/cancel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from tokenwire_client._transport import (
    ChunkFrame,
    Dropped,
    EndFrame,
    Frame,
    StatusAnswer,
    StreamRequest,
    wait_after_answer,
    wait_after_drop,
)
from tokenwire_client.errors import APIStatusError, error_from_body
from tokenwire_client.retry import RetryPolicy, RetryState, retry_after_from_headers
from tokenwire_client.sse import SSEParser, SSETooLarge

log = logging.getLogger("tokenwire_client")
T = TypeVar("T")
USER_AGENT = "tokenwire-client/0.1"
MAX_ERROR_BODY = 1 << 16
_CONNECTION_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError, SSETooLarge)


def api_root(base_url: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1`` → ``http://host:8000/v1``."""
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


class HttpTransport:
    """One aiohttp session (made on first use, on the running loop) for one client."""

    cancel_needs_stream_id = True

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float) -> None:
        self.root = api_root(base_url)
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._api_key}", "User-Agent": USER_AGENT},
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self._timeout_s, sock_read=self._timeout_s
                ),
                connector=aiohttp.TCPConnector(limit=1000),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- JSON calls ----------------------------------------------------------------------------

    async def call_json(self, method: str, path: str, policy: RetryPolicy) -> Any:
        """One JSON call, retried as the policy says; the decoded body of the 2xx answer."""

        async def once() -> Any:
            try:
                async with self.session().request(method, self.root + path) as response:
                    if response.status >= 400:
                        raise StatusAnswer(await _error_of(response), generation_failed=False)
                    if response.status == 204:
                        return None
                    return await response.json(content_type=None)
            except (*_CONNECTION_ERRORS, ValueError) as exc:
                raise _dropped(exc) from exc

        return await with_retries(once, policy)

    # -- streams ---------------------------------------------------------------------------------

    async def open(self, request: StreamRequest, stream_id: str | None, after: int) -> SSEAttempt:
        session = self.session()
        try:
            if stream_id is None:
                response = await session.post(
                    self.root + "/chat/completions",
                    json=request.body,
                    headers={
                        "Idempotency-Key": request.idempotency_key,
                        "X-Tokenwire-Include-Cost": "true",
                        "Accept": "text/event-stream",
                    },
                )
            else:
                response = await session.get(
                    f"{self.root}/chat/completions/{stream_id}/stream",
                    headers={"Last-Event-ID": str(after), "Accept": "text/event-stream"},
                )
        except _CONNECTION_ERRORS as exc:
            raise _dropped(exc) from exc
        if response.status != 200:
            try:
                error = await _error_of(response)
            except _CONNECTION_ERRORS as exc:
                raise _dropped(exc) from exc
            finally:
                response.release()
            raise StatusAnswer(error, generation_failed="x-stream-id" in response.headers)
        return SSEAttempt(response)

    async def cancel(self, request: StreamRequest, stream_id: str | None) -> bool:
        if stream_id is None:
            return False  # not known yet: nothing to name (the caller waited for it)
        try:
            async with self.session().post(
                f"{self.root}/chat/completions/{stream_id}/cancel"
            ) as response:
                if response.status < 300:
                    return True
                log.warning("cancel of %s answered %s", stream_id, response.status)
        except _CONNECTION_ERRORS as exc:
            log.warning("could not cancel %s: %r", stream_id, exc)
        return False

    def slot(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


class SSEAttempt:
    """One SSE response: its ``id:``-numbered chunks, then ``[DONE]``."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.stream_id: str | None = response.headers.get("x-stream-id")
        self.connection_progressed = False

    async def frames(self) -> AsyncIterator[Frame]:
        parser = SSEParser()
        try:
            async for data in self._response.content.iter_any():
                self.connection_progressed = True
                for event in parser.feed(data):
                    if event.data == "[DONE]":
                        yield EndFrame()
                        return
                    frame = _frame(event.data, event.id)
                    if frame is not None:
                        yield frame
        except _CONNECTION_ERRORS as exc:
            raise _dropped(exc) from exc

    async def aclose(self) -> None:
        self._response.close()


def _frame(data: str, event_id: str | None) -> ChunkFrame | None:
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise Dropped(f"unreadable event {data[:80]!r}") from exc
    if not isinstance(payload, dict):
        return None
    if "error" in payload:
        error = payload["error"]
        status = error.get("status") if isinstance(error, dict) else None
        raise error_from_body(status if isinstance(status, int) else 500, payload)
    if event_id is None or not event_id.isdigit():
        raise Dropped("a chunk without an event number")
    return ChunkFrame(int(event_id), payload)


async def _error_of(response: aiohttp.ClientResponse) -> APIStatusError:
    raw = await response.content.read(MAX_ERROR_BODY)
    try:
        body: object = json.loads(raw)
    except ValueError:
        body = {"error": {"message": raw.decode("utf-8", "replace")[:500] or None}}
    headers = dict(response.headers)
    return error_from_body(
        response.status, body, headers=headers, retry_after=retry_after_from_headers(headers)
    )


def _dropped(exc: BaseException) -> Dropped:
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return Dropped(what, timed_out=isinstance(exc, TimeoutError))


async def with_retries(once: Callable[[], Awaitable[T]], policy: RetryPolicy) -> T:
    """Run a call that is safe to repeat (it changes nothing), retrying as the policy says."""
    retry = RetryState(policy)
    while True:
        try:
            return await once()
        except Dropped as exc:
            wait = wait_after_drop(retry, exc, after_progress=False)
        except StatusAnswer as answer:
            wait = wait_after_answer(retry, answer)
        log.info("retrying in %.3f s", wait)
        await asyncio.sleep(wait)
