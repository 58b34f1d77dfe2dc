"""API-key authentication for HTTP routes: ``Authorization: Bearer`` (and ``x-api-key``)."""

from __future__ import annotations

from typing import NoReturn

from starlette.requests import HTTPConnection

from tokenwire.accounting.keys import KeyRecord
from tokenwire.errors import AuthenticationError, GatewayError, RateLimited
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


def client_address(connection: HTTPConnection) -> str:
    """The client's address, as the failed-authentication throttle counts it.

    The ASGI ``client`` of the connection: the TCP peer, or, when that peer is one of
    ``server.trusted_proxies``, the address its ``X-Forwarded-For`` names (the app rewrites
    ``client`` in :class:`tokenwire.app.Gateway`; nothing else reads forwarding headers).
    """
    return connection.client.host if connection.client is not None else "unknown"


async def authenticate(connection: HTTPConnection, *, x_api_key: bool = False) -> KeyRecord:
    """The caller's active key, or ``AuthenticationError`` (401).

    With ``x_api_key`` (Anthropic's Messages API), an ``x-api-key`` header is read first.
    """
    token = connection.headers.get("x-api-key") if x_api_key else None
    if token is None:
        token = bearer_token(connection)
    if not token:
        how = "'x-api-key: <key>' or " if x_api_key else ""
        raise AuthenticationError(
            f"You didn't provide an API key. Send it as {how}'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    return await authenticate_token(get_state(connection), token, client_address(connection))


async def authenticate_token(state: AppState, token: str, client: str) -> KeyRecord:
    """The active key for ``token``; repeated failures from ``client`` are throttled (429).

    The key is checked first (a cached HMAC lookup), so a valid key is never refused, even
    from an address that others' failures have blocked. Only an invalid key from a blocked
    address gets 429; an invalid key otherwise gets 401 and counts as a failure.
    """
    record = await state.keys.authenticate(token)
    if record is not None:
        return record
    await refuse_failed_attempt(
        state, client, AuthenticationError("Incorrect, expired or revoked API key provided.")
    )


async def refuse_failed_attempt(state: AppState, client: str, error: GatewayError) -> NoReturn:
    """Refuse a failed credential (a bad key, a wrong invite code) from ``client``: ``error``,
    and one more failure counted; or 429 once the address has too many."""
    blocked_for = await state.limiter.auth_blocked(client)
    if blocked_for is not None:
        state.metrics.limit_refused("auth_failures")
        raise RateLimited(
            "Too many failed authentications from this address; try again later.",
            retry_after_s=blocked_for,
            code="too_many_failed_authentications",
        )
    await state.limiter.auth_failed(client)
    raise error
