"""The Responses API on top of :class:`~tokenwire.completions.CompletionService`.

A Responses request is a Chat Completions request in other words: its input (and the
conversation of ``previous_response_id``) becomes chat messages, validated into the same
:class:`~tokenwire.wire.schema.ChatRequest`, admitted, billed and streamed by the same
generation as any other completion (``api="responses"`` in the ledger, ids ``resp_…``). What
is particular to it lives here: finding the conversation to continue, and storing the
response when its generation has settled (before the generation leaves ``live``, so a request
chained right after the last event finds it: see :meth:`ResponsesService.conversation`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

from tokenwire.accounting.keys import KeyRecord
from tokenwire.completions import CompletionService
from tokenwire.errors import GatewayError, InvalidRequest, NotFound
from tokenwire.observability.records import Transport
from tokenwire.storage.responses import ResponseStore, not_found
from tokenwire.streams.generation import Generation
from tokenwire.streams.source import StreamSource
from tokenwire.wire.frames import FrameLoop
from tokenwire.wire.responses_frames import ResponseHead, ResponsesEncoder
from tokenwire.wire.responses_request import ResponsesPlan, responses_param
from tokenwire.wire.schema import chat_request_from

log = logging.getLogger("tokenwire.responses")


@dataclass(frozen=True, slots=True)
class StartedResponse:
    """A response's generation, and what its frames and its successors need to know."""

    source: StreamSource
    plan: ResponsesPlan
    history: list[dict[str, Any]]  # the conversation before this turn's input

    @property
    def head(self) -> ResponseHead:
        return head_of(self.source, self.plan)

    def conversation(self, encoder: ResponsesEncoder) -> list[dict[str, Any]]:
        """The conversation through this response's output (``encoder`` has read its log)."""
        return [*self.history, *self.plan.messages, *encoder.chat_messages()]


_OWN_FIELDS = frozenset(
    {"id", "object", "created_at", "status", "error", "incomplete_details", "model", "output"}
    | {"usage"}
)


def head_of(
    source: StreamSource, plan: ResponsesPlan | None, stored: dict[str, Any] | None = None
) -> ResponseHead:
    """A response's identity and echoed request fields: its plan's while it runs here, else a
    stored copy's, else none (a response running in another process, not stored)."""
    if plan is not None:
        echo = plan.echo
    elif stored is not None:
        echo = {name: value for name, value in stored.items() if name not in _OWN_FIELDS}
    else:
        echo = {}
    return ResponseHead(source.id, source.created, source.model, echo)


class ResponsesService:
    """Starts responses, keeps their plans while they run, stores them when they settle."""

    def __init__(self, completions: CompletionService, store: ResponseStore) -> None:
        self._completions = completions
        self.store = store
        self._plans: dict[str, ResponsesPlan] = {}  # running here, for resumes' response objects

    def plan_of(self, response_id: str) -> ResponsesPlan | None:
        """The plan of a response running in this process."""
        return self._plans.get(response_id)

    async def head(self, source: StreamSource, key_id: str) -> ResponseHead:
        """The head of a response to replay (a resume): from its plan, or its stored copy."""
        plan = self._plans.get(source.id)
        if plan is not None:
            return head_of(source, plan)
        try:
            stored = await self.store.get(source.id, key_id)
        except NotFound:
            stored = None
        return head_of(source, None, stored)

    async def start(
        self,
        key: KeyRecord,
        plan: ResponsesPlan,
        transport: Transport,
        *,
        local: dict[str, list[dict[str, Any]]] | None = None,
        resumable: bool = False,
        idempotency: tuple[str, str] | None = None,
        client: str = "",
    ) -> StartedResponse:
        """Admit and start a response; ``local`` holds conversations a WebSocket remembers
        (``previous_response_id`` may name one of them even when it was not stored)."""
        history = await self.conversation(plan, key, local or {})
        chat_body = plan.chat_body(history)
        try:
            request = chat_request_from(chat_body)
            source = await self._completions.start(
                key,
                request,
                chat_body,
                transport,
                resumable=resumable,
                idempotency=idempotency,
                api="responses",
                on_settled=partial(self._settled, key.id, plan, history),
                client=client,
            )
        except InvalidRequest as exc:
            raise _in_responses_terms(exc) from None
        if isinstance(source, Generation) and source.id in self._completions.live:
            self._plans[source.id] = plan
        return StartedResponse(source, plan, history)

    async def conversation(
        self, plan: ResponsesPlan, key: KeyRecord, local: dict[str, list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """The chat messages that ``previous_response_id`` continues (none without one).

        A response that is still settling in this process is waited for: its generation
        leaves ``live`` only after it was stored, so a client that chains the moment it read
        the last event still finds it.
        """
        previous = plan.request.previous_response_id
        if previous is None:
            return []
        if previous in local:
            return local[previous]
        messages = await self.store.conversation(previous, key.id)
        running = self._completions.live.get(previous)
        if messages is None and running is not None and running.key_id == key.id:
            await running.wait_settled()
            messages = await self.store.conversation(previous, key.id)
        if messages is None:
            raise not_found(previous, "previous_response_id")
        return messages

    async def _settled(
        self,
        key_id: str,
        plan: ResponsesPlan,
        history: list[dict[str, Any]],
        generation: Generation,
    ) -> None:
        """Store a settled response (unless ``store`` is false)."""
        try:
            if plan.store:
                encoder = ResponsesEncoder(head_of(generation, plan), None)
                FrameLoop(encoder).frames(generation.log.read_after(0))
                conversation = [*history, *plan.messages, *encoder.chat_messages()]
                await self.store.save(key_id, encoder.response(), conversation)
        finally:
            self._plans.pop(generation.id, None)  # last: start() may have added it meanwhile


def _in_responses_terms(error: InvalidRequest) -> GatewayError:
    """A 400 from validating or admitting the translated body, naming the Responses field."""
    param = responses_param(error.param)
    if param != error.param and error.param is not None and param is not None:
        error.message = error.message.replace(error.param, param)
        error.param = param
    return error
