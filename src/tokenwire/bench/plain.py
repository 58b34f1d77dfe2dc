"""The JSON client: ``POST /v1/chat/completions`` with ``stream: false`` over aiohttp.

The whole answer arrives at once, so its one stamp (when the body has been read) is both the
first and the last content stamp: TTFT = E2E = the time to the whole answer, and there is no
ITL. The row exists for the gateway's per-request cost (``server CPU ms/req``) without SSE.
"""

from __future__ import annotations

import time

import aiohttp
import msgspec

from tokenwire.bench.sse import post_one
from tokenwire.bench.workload import StreamState, decode_message


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Completion(msgspec.Struct):
    choices: list[_Choice]
    usage: _Usage | None = None


_decode_completion = msgspec.json.Decoder(_Completion).decode


def apply_completion(body: bytes, now: float, state: StreamState) -> None:
    """Record a ``chat.completion`` object received at ``now`` as one content chunk."""
    completion = _decode_completion(body)
    for choice in completion.choices:
        if choice.message.content:
            state.stamps.append(now)
            state.pieces.append(choice.message.content)
        if choice.finish_reason:
            state.finish = choice.finish_reason
    if completion.usage is not None:
        state.usage_tokens = completion.usage.completion_tokens
    state.reads += 1
    state.done = True


async def read_answer(response: aiohttp.ClientResponse, state: StreamState) -> None:
    """Read a 200 answer: a ``chat.completion``, or an in-band error object."""
    body = await response.read()
    now = time.perf_counter()
    error = decode_message(body).error
    if error is not None:
        state.error = f"error object: {str(error.get('message', ''))[:120]}"
        return
    apply_completion(body, now, state)


async def complete_one(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], state: StreamState
) -> None:
    """Send one non-streamed completion and record it in ``state``; never raises."""
    await post_one(session, url, headers, state, read_answer)
