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
from collections.abc import AsyncIterator
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


def _forced_tool(request: ChatRequest) -> str | None:
    if not request.tools:
        return None
    choice = request.tool_choice
    if isinstance(choice, dict):
        function = choice.get("function")
        if isinstance(function, dict):
            named = function.get("name")
            return named if isinstance(named, str) else None
    if choice == "required":
        first = request.tools[0].get("function", {})
        name = first.get("name") if isinstance(first, dict) else None
        return name if isinstance(name, str) else None
    return None


def plan(request: ChatRequest) -> SimPlan:
    """The exact output the simulator produces for ``request``."""
    rng = random.Random(_seed(request))
    prompt = prompt_tokens(request)
    tool = _forced_tool(request)
    if tool is not None:
        word = rng.choice(_WORDS)
        fragments = ('{"query": ', f'"{word}"', "}")
        call_id = f"call_{rng.getrandbits(48):012x}"
        return SimPlan((), "tool_calls", prompt, (call_id, tool, fragments))
    limit = request.output_limit
    count = limit if limit is not None else DEFAULT_TOKENS
    tokens = []
    for i in range(count):
        word = rng.choice(_WORDS)
        tokens.append(word.capitalize() if i == 0 else " " + word)
    finish: FinishReason = "length" if limit is not None else "stop"
    stops = request.stop_sequences
    if stops:
        text = "".join(tokens)
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            cut = min(cuts)
            kept: list[str] = []
            length = 0
            for token in tokens:
                if length + len(token) > cut:
                    if cut > length:
                        kept.append(token[: cut - length])
                    break
                kept.append(token)
                length += len(token)
            tokens, finish = kept, "stop"
    return SimPlan(tuple(tokens), finish, prompt)


async def run_plan(sim_plan: SimPlan, *, ttft_s: float, itl_s: float) -> AsyncIterator[Event]:
    """Emit a plan's events with the simulated timing."""
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
        return run_plan(plan(call.request), ttft_s=self._ttft_s, itl_s=self._itl_s)

    async def aclose(self) -> None:
        return None
