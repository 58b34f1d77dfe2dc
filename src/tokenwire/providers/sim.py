"""The deterministic simulator: exact text, usage and timing, for tests and benchmarks.

The text depends only on the request: words drawn by a PRNG seeded from the messages (and
``seed``). Each word is one token. With a token limit it emits exactly that many tokens and
ends with ``length``; without, :data:`DEFAULT_TOKENS` tokens ending with ``stop``. A ``stop``
sequence cuts the text before it. With ``tools`` and a ``tool_choice`` that forces a call, it
emits a tool call instead. Prompt tokens: 4 per message plus its whitespace-separated words.

:func:`plan` is pure, so clients (``tokenwire bench``, tests) can compute the expected text.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass

import msgspec

from tokenwire.providers.base import ProviderCall
from tokenwire.streams.events import Event, Finish, FinishReason, TextDelta, ToolCallDelta, Usage
from tokenwire.wire.schema import ChatRequest, content_text

DEFAULT_TOKENS = 16
_WORDS = (
    "stream",
    "token",
    "socket",
    "event",
    "gateway",
    "latency",
    "chunk",
    "reply",
    "model",
    "prompt",
    "answer",
    "signal",
    "packet",
    "buffer",
    "cursor",
    "replay",
    "budget",
    "credit",
    "ledger",
    "upstream",
    "river",
    "cloud",
    "bright",
    "quiet",
    "swift",
    "steady",
    "light",
    "wave",
    "signal",
    "north",
    "amber",
    "silver",
    "cedar",
    "harbor",
    "lantern",
    "meadow",
)


@dataclass(frozen=True, slots=True)
class SimPlan:
    """What the simulator will emit for a request."""

    tokens: tuple[str, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    tool_call: tuple[str, str, tuple[str, ...]] | None = None  # (id, name, argument fragments)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def completion_tokens(self) -> int:
        if self.tool_call is not None:
            return len(self.tool_call[2])
        return len(self.tokens)


def prompt_tokens(request: ChatRequest) -> int:
    """The simulator's token count for the prompt."""
    return sum(4 + len(content_text(m.content).split()) for m in request.messages)


def _seed(request: ChatRequest) -> int:
    digest = hashlib.blake2b(msgspec.json.encode(request.messages), digest_size=8)
    if request.seed is not None:
        digest.update(str(request.seed).encode())
    return int.from_bytes(digest.digest(), "big")


def _opening(request: ChatRequest) -> tuple[random.Random, tuple[str, str, tuple[str, ...]] | None]:
    """The request's PRNG and, when ``tool_choice`` forces a function, the call it makes."""
    rng = random.Random(_seed(request))
    tool = request.forced_function
    if tool is None:
        return rng, None
    word = rng.choice(_WORDS)
    fragments = ('{"query": ', f'"{word}"', "}")
    return rng, (f"call_{rng.getrandbits(48):012x}", tool, fragments)


def _words(rng: random.Random, count: int) -> Iterator[str]:
    for i in range(count):
        word = rng.choice(_WORDS)
        yield word.capitalize() if i == 0 else " " + word


def tokens(request: ChatRequest, *, cap: int | None = None) -> Generator[str, None, FinishReason]:
    """The answer's tokens, one at a time (never the whole answer at once); returns the finish.

    ``cap`` (the admitted output limit) bounds a request without ``max_tokens``. A stop
    sequence cuts the text before its first occurrence: a token is released only once no
    stop sequence can start inside it, so the stream never shows text the cut would remove.
    """
    rng, _ = _opening(request)
    limit = request.output_limit
    count = limit if limit is not None else DEFAULT_TOKENS
    if cap is not None:
        count = min(count, cap)
    finish: FinishReason = "length" if limit is not None or count < DEFAULT_TOKENS else "stop"
    stops = request.stop_sequences
    if not stops:
        yield from _words(rng, count)
        return finish
    longest = max(len(stop) for stop in stops)
    pending: list[str] = []  # tokens not yet released; ``text`` is their concatenation
    text = ""
    for word in _words(rng, count):
        pending.append(word)
        text += word
        cut = _earliest(text, stops)
        if cut is not None and len(text) - cut >= longest:  # no earlier match can still come
            yield from _up_to(pending, cut)
            return "stop"
        # release the first pending token once no stop sequence can start inside it
        while pending and len(text) - len(pending[0]) >= longest - 1:
            first = len(pending[0])
            if cut is not None and cut < first:
                break
            yield pending.pop(0)
            text = text[first:]
            cut = None if cut is None else cut - first
    cut = _earliest(text, stops)
    if cut is not None:
        yield from _up_to(pending, cut)
        return "stop"
    yield from pending
    return finish


def _earliest(text: str, stops: list[str]) -> int | None:
    found = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    return min(found) if found else None


def _up_to(pending: list[str], cut: int) -> Iterator[str]:
    """The pending tokens up to ``cut`` characters, the last one shortened."""
    for token in pending:
        if cut <= 0:
            return
        yield token[:cut]
        cut -= len(token)


def plan(request: ChatRequest) -> SimPlan:
    """The exact output the simulator produces for ``request`` (for clients and tests)."""
    _, tool_call = _opening(request)
    prompt = prompt_tokens(request)
    if tool_call is not None:
        return SimPlan((), "tool_calls", prompt, tool_call)
    stream = tokens(request)
    words: list[str] = []
    while True:
        try:
            words.append(next(stream))
        except StopIteration as end:
            return SimPlan(tuple(words), end.value, prompt)


async def run_request(
    request: ChatRequest, *, ttft_s: float, itl_s: float, cap: int | None = None
) -> AsyncIterator[Event]:
    """The simulator's events for ``request``, generated as they are sent (lazily)."""
    sleep = asyncio.sleep
    _, tool_call = _opening(request)
    prompt = prompt_tokens(request)
    await sleep(ttft_s)
    if tool_call is not None:
        async for event in run_plan(SimPlan((), "tool_calls", prompt, tool_call), 0, itl_s):
            yield event
        return
    stream = tokens(request, cap=cap)
    count = 0
    while True:
        try:
            token = next(stream)
        except StopIteration as end:
            finish: FinishReason = end.value
            break
        if count:
            await sleep(itl_s)
        count += 1
        yield TextDelta(token)
    yield Usage(prompt, count)
    yield Finish(finish)


async def run_plan(sim_plan: SimPlan, ttft_s: float, itl_s: float) -> AsyncIterator[Event]:
    """Emit a materialized plan's events with the simulated timing."""
    sleep = asyncio.sleep
    await sleep(ttft_s)
    if sim_plan.tool_call is not None:
        call_id, name, fragments = sim_plan.tool_call
        for i, fragment in enumerate(fragments):
            if i:
                await sleep(itl_s)
            yield ToolCallDelta(
                index=0,
                id=call_id if i == 0 else None,
                name=name if i == 0 else None,
                arguments=fragment,
            )
    else:
        for i, token in enumerate(sim_plan.tokens):
            if i:
                await sleep(itl_s)
            yield TextDelta(token)
    yield Usage(sim_plan.prompt_tokens, sim_plan.completion_tokens)
    yield Finish(sim_plan.finish_reason)


class SimProvider:
    """The simulator as an in-process provider."""

    def __init__(self, name: str, *, ttft_ms: float, itl_ms: float) -> None:
        self.name = name
        self._ttft_s = ttft_ms / 1000
        self._itl_s = itl_ms / 1000

    def stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        return run_request(
            call.request, ttft_s=self._ttft_s, itl_s=self._itl_s, cap=call.max_output_tokens
        )

    async def aclose(self) -> None:
        return None
