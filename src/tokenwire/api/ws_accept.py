"""Accepting a WebSocket: the origin check, authentication at the upgrade (an
``Authorization`` header or a ticket; else the session waits for an ``auth`` message), then
a session of the socket's protocol (:class:`~tokenwire.api.ws_session.WSSession`).

A socket refused here is accepted and closed at once with a close code that says why
(:func:`close_code`): browsers see no HTTP status of a failed upgrade.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket

from tokenwire.accounting.keys import KeyRecord
from tokenwire.api.auth import authenticate_token, bearer_token, client_address
from tokenwire.errors import AuthenticationError, GatewayError
from tokenwire.state import get_state
from tokenwire.wire import ws as proto

if TYPE_CHECKING:
    from tokenwire.api.ws_session import WSSession

log = logging.getLogger("tokenwire.ws")


def close_code(error: GatewayError) -> int:
    """The close code for an error that ends a socket before it is authenticated."""
    if isinstance(error, AuthenticationError):
        return proto.CLOSE_UNAUTHORIZED
    if error.http_status == 403:
        return proto.CLOSE_FORBIDDEN
    if error.http_status in (429, 503):  # throttled, or a store it needs is down for now
        return proto.CLOSE_TRY_AGAIN_LATER
    return proto.CLOSE_INTERNAL


def _origin_allowed(websocket: WebSocket, allowed: list[str]) -> bool:
    origin = websocket.headers.get("origin")
    if origin is None or "*" in allowed or origin in allowed:
        return True
    host = websocket.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


async def serve_socket(websocket: WebSocket, session: type[WSSession]) -> None:
    """Check the origin, authenticate (header, ticket, or later an ``auth`` message) and run
    a ``session`` of the socket's protocol."""
    state = get_state(websocket)
    offered = list(websocket.scope.get("subprotocols") or [])
    subprotocol = proto.SUBPROTOCOL if proto.SUBPROTOCOL in offered else None
    notice = state.drain.notice
    if notice is not None:  # an upgrade on a connection still open during a drain
        await websocket.accept(subprotocol)
        await websocket.close(notice.close_code, notice.close_reason)
        return
    if not _origin_allowed(websocket, state.settings.server.ws_allowed_origins):
        await websocket.accept(subprotocol)
        await websocket.close(proto.CLOSE_POLICY, "origin not allowed")
        return
    ticket = next(
        (p[len(proto.TICKET_PREFIX) :] for p in offered if p.startswith(proto.TICKET_PREFIX)), None
    )
    key: KeyRecord | None = None
    client = client_address(websocket)
    try:
        token = bearer_token(websocket)
        if token is not None:
            key = await authenticate_token(state, token, client)
        elif ticket is not None:
            key_id = await state.tickets.redeem(ticket)
            key = None if key_id is None else await state.keys.get(key_id)
            if key is None or not key.is_active(time.time()):
                raise AuthenticationError("invalid or expired ticket")
    except GatewayError as exc:  # a bad key, throttled, or Redis (the throttle's store) down
        await websocket.accept(subprotocol)
        await websocket.close(close_code(exc), exc.message[:120])
        return
    except Exception as exc:  # e.g. the database is down: a clean 1011, never a 500
        log.error("WebSocket authentication failed", exc_info=exc)
        await websocket.accept(subprotocol)
        await websocket.close(proto.CLOSE_INTERNAL, "internal error; try again later")
        return
    await websocket.accept(subprotocol)
    await session(websocket, state, key, envelope=subprotocol is not None).run()
