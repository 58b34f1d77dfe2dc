"""The HTTP plumbing every upstream provider shares: a pool, a safe POST, the SSE read loop.

Providers that speak HTTP (OpenAI-compatible, Anthropic, Gemini) own one :class:`UpstreamPool`
each and keep only their wire format: request translation, and an :class:`EventTranslator`
that :func:`stream_events` feeds with the reply's SSE events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

import aiohttp
import msgspec
from yarl import URL

from tokenwire.errors import (
    GatewayError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from tokenwire.streams.events import Event
from tokenwire.wire.sse import SSEParser, SSETooLarge

log = logging.getLogger("tokenwire.providers")

CREDENTIAL_STATUSES = frozenset({401, 403})
"""Upstream statuses that mean the gateway's own provider key was refused."""


class UpstreamPool:
    """A lazily created aiohttp session with a large connection pool and the upstream timeouts.

    ``connect_timeout_s`` bounds the TCP connect, ``idle_timeout_s`` the silence between two
    reads of a response (the mid-stream stall guard). The first-token timeout belongs to the
    provider's read loop, which knows what a first token is.
    """

    def __init__(
        self, *, connect_timeout_s: float, idle_timeout_s: float, max_connections: int
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=idle_timeout_s
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}  # parsed once: a provider posts to one or two URLs

    def session(self) -> aiohttp.ClientSession:
        """The session (made in the running loop on first use).

        Its cookie jar keeps nothing: the pool serves every user's requests, so a cookie one
        upstream reply sets must never ride along on another user's request (and not parsing
        or matching cookies saves work on every request).
        """
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    def _url(self, url: str) -> URL:
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) > 1024:  # per-model URLs (Gemini): bounded, not a leak
                self._urls.clear()
            parsed = self._urls[url] = URL(url)
        return parsed

    async def post(
        self, url: str, payload: bytes, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """POST, retrying once when a pooled keep-alive connection turns out to be closed.

        A server may close an idle keep-alive connection just as the pool hands it out
        (uvicorn's default idle timeout is 5 s); the request was then never processed, so one
        retry on a fresh connection is safe. A refused connection is not retried here (the
        router decides about retries).
        """
        session = self.session()
        target = self._url(url)
        try:
            return await session.post(target, data=payload, headers=headers)
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return await session.post(target, data=payload, headers=headers)

    async def aclose(self) -> None:
        """Close the pool's connections."""
        if self._session is not None:
            await self._session.close()


class EventTranslator(Protocol):
    """A provider's wire format: SSE ``data`` in, gateway events out (no I/O)."""

    @property
    def done(self) -> bool:
        """The upstream's final event was seen (the rest of the body is not read)."""
        ...

    def feed(self, data: str) -> list[Event]:
        """The events one SSE event's data carries (raises on a malformed or error event)."""
        ...

    def end(self) -> list[Event]:
        """The body ended before ``done``: closing events, or raise if the stream was cut."""
        ...


ErrorForStatus = Callable[[str, int, bytes, str | None], GatewayError]


def credentials_refused(name: str, error: GatewayError) -> GatewayError:
    """``error``, or an :class:`UpstreamAuthError` when the upstream refused the gateway's key.

    A 401/403 from an upstream is about the operator's provider key, not the client's: the
    client gets a 502, and the operator an ERROR line naming the provider (never the key, nor
    the upstream's message, which may quote part of it).
    """
    if isinstance(error, UpstreamStatusError) and error.http_status in CREDENTIAL_STATUSES:
        code = f", code {error.code}" if error.code else ""
        log.error(
            "upstream %r refused the gateway's credentials (HTTP %d%s): check its API key",
            name,
            error.http_status,
            code,
        )
        return UpstreamAuthError(name, error.http_status)
    if isinstance(error, UpstreamAuthError):
        log.error(
            "upstream %r refused the gateway's credentials (HTTP %d): check its API key",
            name,
            error.upstream_status,
        )
    return error


async def stream_events(
    pool: UpstreamPool,
    *,
    name: str,
    url: str,
    payload: bytes,
    headers: dict[str, str],
    translator: EventTranslator,
    first_token_timeout_s: float,
    error_for_status: ErrorForStatus,
) -> AsyncGenerator[Event, None]:
    """POST ``payload`` and yield the translated events of the SSE reply.

    Everything up to the first event happens under ``first_token_timeout_s`` and without
    yielding, so an error before it keeps its HTTP status (the gateway answers with it); an
    error after events were read is raised after those events. Foreign exceptions become
    gateway errors naming the upstream. Closing the iterator early (a cancel) drops the
    upstream connection; a body read to its end goes back to the pool.
    """
    parser = SSEParser()
    response: aiohttp.ClientResponse | None = None
    complete = False  # the body was read to its end
    try:
        pending: list[Event] = []
        late_error: Exception | None = None
        try:
            async with asyncio.timeout(first_token_timeout_s):
                response = await pool.post(url, payload, headers)
                if response.status >= 400:
                    body = await response.content.read(65536)
                    retry_after = response.headers.get("Retry-After")
                    raise error_for_status(name, response.status, body, retry_after)
                while not pending and late_error is None and not translator.done:
                    data = await response.content.readany()
                    if not data:
                        complete = True
                        pending.extend(translator.end())
                        break
                    for sse in parser.feed(data):
                        try:
                            pending.extend(translator.feed(sse.data))
                        except (GatewayError, msgspec.DecodeError) as exc:
                            if not pending:
                                raise
                            late_error = exc  # report it after the events before it
                            break
                        if translator.done:
                            break
        except TimeoutError:
            raise UpstreamTimeout(
                f"Upstream {name!r} sent no token within {first_token_timeout_s:g} s."
            ) from None
        for event in pending:
            yield event
        if late_error is not None:
            raise late_error
        while not translator.done and not complete:
            data = await response.content.readany()
            if not data:
                complete = True
                for event in translator.end():
                    yield event
                break
            for sse in parser.feed(data):
                for event in translator.feed(sse.data):
                    yield event
                if translator.done:
                    break
    except GatewayError as exc:
        translated = credentials_refused(name, exc)
        if translated is exc:
            raise
        raise translated from None
    except msgspec.DecodeError as exc:
        raise UpstreamError(f"Upstream {name!r} sent a malformed chunk: {exc}") from None
    except SSETooLarge as exc:
        raise UpstreamError(f"Upstream {name!r} sent {exc}; the stream was cut.") from None
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise UpstreamTimeout(f"Upstream {name!r} went silent mid-stream.") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"Upstream {name!r} connection failed: {type(exc).__name__}") from None
    finally:
        if response is not None:
            if translator.done or complete:
                response.release()  # back to the pool when the body is complete
            else:
                response.close()  # cancelled or failed: drop the upstream connection
