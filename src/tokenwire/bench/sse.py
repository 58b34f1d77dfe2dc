"""The SSE client: ``POST /v1/chat/completions`` with ``stream: true`` over aiohttp.

The body is read as it arrives (``iter_any``: one call per network read), split into lines,
and every ``data:`` line is decoded with msgspec. One ``perf_counter`` stamp per read is given
to every content chunk in that read, so chunks the server coalesced into one write (or the
kernel into one read) share a stamp and show as ITL 0; ``chunks_per_read`` reports how often.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec

from tokenwire.bench.workload import StreamState, decode_message

END_MARKER = "data: [DONE]"


def make_session(*, keep_alive: bool, timeout_s: float) -> aiohttp.ClientSession:
    """A client session with no connection limit; ``keep_alive=False`` closes after each request.

    ``force_close`` makes aiohttp open a new TCP connection for every request and close it
    afterwards (``Connection: close``): the ``sse-new-conn`` scenario.
    """
    connector = aiohttp.TCPConnector(limit=0, force_close=not keep_alive)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


def handle_line(line: bytes, now: float, state: StreamState) -> None:
    """Apply one SSE line (``data: {...}`` or ``data: [DONE]``) to ``state``."""
    if not line.startswith(b"data:"):
        return  # blank separators, id: lines, : pings
    payload = line[5:].strip()
    if payload == b"[DONE]":
        state.done = True
        return
    state.apply(decode_message(payload), now)


async def consume(response: aiohttp.ClientResponse, state: StreamState) -> None:
    """Read the SSE body as it arrives, split it into lines, stamp each read."""
    buffer = b""
    perf_counter = time.perf_counter
    async for data in response.content.iter_any():
        now = perf_counter()
        state.reads += 1
        *lines, buffer = (buffer + data).split(b"\n")
        for line in lines:
            handle_line(line, now, state)
    if buffer.strip():
        handle_line(buffer, time.perf_counter(), state)


ReadAnswer = Callable[[aiohttp.ClientResponse, StreamState], Awaitable[None]]


async def post_one(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    state: StreamState,
    read: ReadAnswer,
) -> None:
    """POST ``state.body``; ``read`` takes a 200 answer, any other status is the request's
    error; stamps the send; never raises."""
    state.sent = time.perf_counter()
    try:
        async with session.post(url, data=state.body, headers=headers) as response:
            if response.status != 200:
                body = await response.read()
                state.error = f"HTTP {response.status}: {body[:200].decode(errors='replace')}"
            else:
                await read(response, state)
    except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError, OSError) as exc:
        state.error = f"{type(exc).__name__}: {exc}"


async def stream_one(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], state: StreamState
) -> None:
    """Send one streamed completion and record its timeline in ``state``; never raises."""
    await post_one(session, url, headers, state, consume)
