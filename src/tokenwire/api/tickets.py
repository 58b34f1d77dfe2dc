"""``POST /v1/ws/tickets``: a single-use ticket for a browser WebSocket (accounting/tickets.py)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tokenwire.api.auth import authenticate
from tokenwire.api.errors import json_response
from tokenwire.state import get_state
from tokenwire.wire.ws import SUBPROTOCOL, TICKET_PREFIX


async def create_ticket(request: Request) -> Response:
    """Issue a ticket for the caller's key; offer it as a subprotocol within its lifetime."""
    key = await authenticate(request)
    ticket = await get_state(request).tickets.issue(key.id)
    return json_response(
        {
            "ticket": ticket.value,
            "expires_at": int(ticket.expires_at),
            "subprotocols": [SUBPROTOCOL, TICKET_PREFIX + ticket.value],
        },
        201,
    )
