"""``POST /v1/messages``: Anthropic's Messages API, on the same generations as chat completions.

The body is validated and translated into a chat request (``wire/messages_request.py``), so
any model in the catalog answers, with the same keys, limits, credits, ledger and resumable
streams. The answer is one ``message`` object (``stream: false``) or Anthropic's SSE events
(``wire/messages_stream.py``), and every error has Anthropic's shape,
``{"type": "error", "error": {"type", "message"}}``, with the gateway's status. The key comes
in ``x-api-key`` (as Anthropic's SDKs send it) or ``Authorization: Bearer``;
``anthropic-version`` and ``anthropic-beta`` are accepted and change nothing.

``GET /v1/messages/{id}/stream`` resumes a resumable stream (``X-Tokenwire-Resumable: true``
or an ``Idempotency-Key``) after ``Last-Event-ID``, as ``/v1/chat/completions/{id}/stream``
does for chat.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenwire.accounting.budget import estimate_prompt_tokens
from tokenwire.api.auth import authenticate, client_address
from tokenwire.api.chat import (
    RETRY_MS,
    JSONCompletion,
    asks_resumable,
    idempotency_of,
    kept_for_resume,
    read_body,
)
from tokenwire.api.errors import json_response
from tokenwire.api.sse_stream import SSEStream
from tokenwire.api.streams import cursor
from tokenwire.errors import DatabaseUnavailable, GatewayError, NotFound, unexpected
from tokenwire.state import get_state
from tokenwire.streams.events import Event
from tokenwire.streams.generation import Generation
from tokenwire.streams.source import StreamSource
from tokenwire.wire.messages_request import chat_body, messages_request_from, to_chat_request
from tokenwire.wire.messages_stream import MessageBuilder, MessagesEncoder, error_body
from tokenwire.wire.untrusted import decode_json_value

log = logging.getLogger("tokenwire.api")


def anthropic_error_response(
    error: GatewayError, headers: dict[str, str] | None = None
) -> Response:
    """The error in Anthropic's shape, with its status and headers (``Retry-After``…)."""
    return json_response(
        error_body(error), error.http_status, {**error.headers(), **(headers or {})}
    )


def message_json(source: StreamSource, events: list[Event]) -> Response:
    """The ``message`` object of a finished completion, or its error in Anthropic's shape."""
    builder = MessageBuilder()
    for event in events:
        builder.add(event)
    if builder.error is not None:
        return anthropic_error_response(builder.error, source.response_headers)
    result = builder.build(message_id=source.id, model=source.model)
    return json_response(result, headers=source.response_headers)


def _prompt_tokens(source: StreamSource, estimate: int) -> int:
    """The best prompt count for ``message_start``: the upstream's early one, if it gave one."""
    if isinstance(source, Generation) and source.reported_prompt is not None:
        return source.reported_prompt.prompt_tokens
    return estimate


async def create_message(request: Request) -> ASGIApp:
    """Run a completion from a Messages API body; answer a message or Anthropic's stream."""
    state = get_state(request)
    key = await authenticate(request, x_api_key=True)
    body = await read_body(request, state.settings.server.max_body_bytes)
    raw = decode_json_value(body, what="JSON body of your request")
    chat_request = to_chat_request(messages_request_from(raw))
    generation = await state.completions.start(
        key,
        chat_request,
        chat_body(chat_request),
        "sse" if chat_request.stream else "json",
        resumable=asks_resumable(request),
        idempotency=idempotency_of(request, raw),
        api="messages",
        client=client_address(request),
    )
    if not chat_request.stream:
        return JSONCompletion(generation, message_json)
    estimate = estimate_prompt_tokens(chat_request)
    encoder = MessagesEncoder(
        message_id=generation.id,
        model=generation.model,
        prompt_tokens=lambda: _prompt_tokens(generation, estimate),
    )
    return SSEStream(
        generation,
        encoder,
        heartbeat_s=state.settings.server.sse_heartbeat_s,
        retry_ms=RETRY_MS if kept_for_resume(state, generation) else None,
        render_error=anthropic_error_response,
    )


async def resume_message_stream(request: Request) -> ASGIApp:
    """Replay a Messages stream's events after the cursor, then follow it live.

    The log is read from its start (the encoder's blocks depend on all of it); the frames up
    to the cursor are not sent again.
    """
    state = get_state(request)
    key = await authenticate(request, x_api_key=True)
    after = cursor(request) or 0
    message_id = request.path_params["message_id"]
    if not message_id.startswith("msg_"):
        raise NotFound(f"No stream {message_id!r}.", param="stream_id", code="stream_not_found")
    generation = await state.completions.resume(message_id, key.id, after, "sse")
    encoder = MessagesEncoder(message_id=message_id, model=generation.model, after=after)
    return SSEStream(
        generation,
        encoder,
        heartbeat_s=state.settings.server.sse_heartbeat_s,
        retry_ms=RETRY_MS,
        render_error=anthropic_error_response,
    )


Handler = Callable[[Request], Awaitable[ASGIApp]]


class MessagesEndpoint:
    """An ASGI endpoint that answers every failure in Anthropic's error shape."""

    def __init__(self, handler: Handler, what: str) -> None:
        self._handler = handler
        self._what = what

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response: ASGIApp
        try:
            response = await self._handler(request)
        except GatewayError as exc:
            response = anthropic_error_response(exc)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
            log.error("database unavailable in %s: %r", self._what, exc)
            response = anthropic_error_response(
                DatabaseUnavailable(
                    f"The database is unavailable, so {self._what} is not possible right now; "
                    "retry shortly."
                )
            )
        except Exception as exc:  # noqa: BLE001 - rendered as a 500 without a stack trace
            response = anthropic_error_response(unexpected(exc, log, self._what))
        await response(scope, receive, send)


create_message_endpoint = MessagesEndpoint(create_message, "POST /v1/messages")
resume_message_endpoint = MessagesEndpoint(resume_message_stream, "GET /v1/messages/{id}/stream")
