"""The HTTP plumbing every upstream provider shares: a safe POST and the SSE read loop.

Providers that speak HTTP (OpenAI-compatible, Anthropic, Gemini) own one :class:`UpstreamPool`
each (``providers/connections.py``) and keep only their wire format: request translation, and
an :class:`EventTranslator` that :func:`stream_events` feeds with the reply's SSE events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Annotated, Protocol

import msgspec

from tokenwire.errors import (
    GatewayError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from tokenwire.providers.connections import (
    ConnectFailed,
    ReplyBroken,
    UpstreamPool,
    UpstreamResponse,
)
from tokenwire.streams.events import Event, PromptUsage
from tokenwire.wire.sse import SSEParser, SSETooLarge

log = logging.getLogger("tokenwire.providers")

CREDENTIAL_STATUSES = frozenset({401, 403})
"""Upstream statuses that mean the gateway's own provider key was refused."""

MAX_TOKEN_COUNT = 2**31 - 1
"""The largest token count a reply may report (the ledger's token columns are 32-bit).

A reply translator refuses a count outside ``0..MAX_TOKEN_COUNT`` as a malformed reply: a
negative count would make the completion's cost negative, a refund paid by the upstream.
"""
TokenCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_COUNT)]


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


async def _post(
    pool: UpstreamPool, name: str, url: str, payload: bytes, headers: dict[str, str]
) -> UpstreamResponse:
    """The POST; a connection that could not be made is an error whose request was not sent."""
    try:
        return await pool.post(url, payload, headers)
    except ConnectFailed as exc:
        raise UpstreamError(
            f"Upstream {name!r} could not be reached: {exc}", request_sent=False
        ) from None


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

    Everything up to the first output event happens under ``first_token_timeout_s`` and
    yields nothing but :class:`PromptUsage` (bookkeeping: the router may still retry), so an
    error before it keeps its HTTP status (the gateway answers with it); an error after
    events were read is raised after those events. Foreign exceptions become gateway errors
    naming the upstream; each says whether the request may have reached it. Closing the
    iterator early (a cancel) drops the upstream connection; a body read to its end goes back
    to the pool.
    """
    parser = SSEParser()
    response: UpstreamResponse | None = None
    complete = False  # the body was read to its end
    deadline = asyncio.get_running_loop().time() + first_token_timeout_s
    try:
        pending: list[Event] = []
        late_error: Exception | None = None
        try:
            async with asyncio.timeout_at(deadline):
                response = await _post(pool, name, url, payload, headers)
                if response.status >= 400:
                    body = await response.read(65536)
                    retry_after = response.headers.get("retry-after")
                    raise error_for_status(name, response.status, body, retry_after)
            while not pending and late_error is None and not translator.done:
                async with asyncio.timeout_at(deadline):
                    data = await response.readany()
                if not data:
                    complete = True
                    pending.extend(translator.end())
                    break
                for sse in parser.feed(data):
                    try:
                        pending.extend(translator.feed(sse.data))
                    except (GatewayError, msgspec.DecodeError, RecursionError) as exc:
                        if not pending:
                            raise
                        late_error = exc  # report it after the events before it
                        break
                    if translator.done:
                        break
                while pending and isinstance(pending[0], PromptUsage):
                    yield pending.pop(0)  # bookkeeping: reported at once, commits nothing
        except TimeoutError:
            raise UpstreamTimeout(
                f"Upstream {name!r} sent no token within {first_token_timeout_s:g} s.",
                request_sent=True,
            ) from None
        for event in pending:
            yield event
        if late_error is not None:
            raise late_error
        while not translator.done and not complete:
            data = await response.readany()
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
    except RecursionError:
        raise UpstreamError(f"Upstream {name!r} sent a chunk nested too deeply.") from None
    except SSETooLarge as exc:
        raise UpstreamError(f"Upstream {name!r} sent {exc}; the stream was cut.") from None
    except TimeoutError:
        raise UpstreamTimeout(f"Upstream {name!r} went silent mid-stream.") from None
    except ReplyBroken as exc:
        raise UpstreamError(
            f"Upstream {name!r} connection failed: {exc}", request_sent=True
        ) from None
    finally:
        if response is not None:
            if translator.done or complete:
                response.release()  # back to the pool when the body is complete
            else:
                response.close()  # cancelled or failed: drop the upstream connection
