"""Bearer-key authentication for HTTP routes."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from tokenwire.accounting.keys import KeyRecord
from tokenwire.errors import AuthenticationError, RateLimited
from tokenwire.state import AppState, get_state


def bearer_token(connection: HTTPConnection) -> str | None:
    """The token from ``Authorization: Bearer <token>``, or None if absent."""
    header = connection.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "Malformed Authorization header; use 'Authorization: Bearer <key>'.",
            code="invalid_authorization_header",
        )
    return token.strip()


async def authenticate(connection: HTTPConnection) -> KeyRecord:
    """The caller's active key, or ``AuthenticationError`` (401)."""
    token = bearer_token(connection)
    if token is None:
        raise AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    client = connection.client.host if connection.client is not None else "unknown"
    return await authenticate_token(get_state(connection), token, client)


async def authenticate_token(state: AppState, token: str, client: str) -> KeyRecord:
    """The active key for ``token``; repeated failures from ``client`` are throttled (429)."""
    blocked_for = await state.limiter.auth_blocked(client)
    if blocked_for is not None:
        raise RateLimited(
            "Too many failed authentications from this address; try again later.",
            retry_after_s=blocked_for,
            code="too_many_failed_authentications",
        )
    record = await state.keys.authenticate(token)
    if record is None:
        await state.limiter.auth_failed(client)
        raise AuthenticationError("Incorrect, expired or revoked API key provided.")
    return record
