"""Starting completions: model → provider → a running :class:`Generation`.

Both transports (SSE and WebSocket) and the JSON path call :meth:`CompletionService.start`;
it is the one place where a validated request becomes a generation. Admission (rate limits,
credits) and settlement (the usage ledger) hook in here.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from tokenwire.accounting.keys import KeyRecord
from tokenwire.providers.base import ProviderCall
from tokenwire.providers.registry import ProviderRegistry
from tokenwire.streams.generation import Generation
from tokenwire.wire.schema import ChatRequest, content_text


def new_completion_id() -> str:
    """A fresh ``chatcmpl-…`` id (also the stream id)."""
    return "chatcmpl-" + secrets.token_urlsafe(18)


def estimate_prompt_tokens(request: ChatRequest) -> int:
    """A rough prompt size (4 characters a token) for when an upstream reports no usage."""
    return sum(4 + len(content_text(m.content)) // 4 for m in request.messages)


class CompletionService:
    """Creates generations and keeps the live ones until they settle."""

    def __init__(self, registry: ProviderRegistry, *, disconnect_grace_s: float) -> None:
        self._registry = registry
        self._grace_s = disconnect_grace_s
        self.live: dict[str, Generation] = {}

    def start(self, key: KeyRecord, request: ChatRequest, raw_body: dict[str, Any]) -> Generation:
        """Resolve the model and start generating; raises before anything runs on bad input."""
        provider, entry = self._registry.resolve(request.model)
        del key  # admission per key arrives with the accounting module
        call = ProviderCall(request=request, upstream_model=entry.upstream_model, raw_body=raw_body)
        generation = Generation(
            completion_id=new_completion_id(),
            model=entry.id,
            events=provider.stream(call),
            prompt_tokens_estimate=estimate_prompt_tokens(request),
            disconnect_grace_s=self._grace_s,
            on_settle=self._settled,
        )
        self.live[generation.id] = generation
        generation.start()
        return generation

    async def _settled(self, generation: Generation) -> None:
        self.live.pop(generation.id, None)

    async def shutdown(self) -> None:
        """Cancel every live generation and wait for them to settle."""
        pending = list(self.live.values())
        for generation in pending:
            generation.cancel("shutdown")
        await asyncio.gather(*(g.wait_settled() for g in pending))
