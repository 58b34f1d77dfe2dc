"""Bearer-key authentication for HTTP routes."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from tokenwire.accounting.keys import KeyRecord
from tokenwire.errors import AuthenticationError
from tokenwire.state import get_state


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
    record = await get_state(connection).keys.authenticate(token)
    if record is None:
        raise AuthenticationError("Incorrect, expired or revoked API key provided.")
    return record
