"""Rendering errors as OpenAI-style JSON, and the app's exception handlers.

Services raise :class:`~tokenwire.errors.GatewayError`; these handlers are the one place that
turns an exception into a response. Anything else becomes a generic 500 with no stack trace
(the trace goes to the log).
"""

from __future__ import annotations

import logging

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from tokenwire.errors import DatabaseUnavailable, GatewayError, unexpected

log = logging.getLogger("tokenwire.api")

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}

API_SECURITY_HEADERS = {
    # OWASP's REST set: no content sniffing (a JSON body is never read as HTML), never
    # framed, never stored by a cache (answers may hold a new key's plaintext)
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
"""Headers on every JSON answer of the API (the web pages have their own, tokenwire.web)."""


def json_response(
    payload: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response encoded with msgspec, with :data:`API_SECURITY_HEADERS`."""
    return Response(
        msgspec.json.encode(payload),
        status_code=status,
        headers=API_SECURITY_HEADERS if headers is None else {**API_SECURITY_HEADERS, **headers},
        media_type="application/json",
    )


def error_response(error: GatewayError, headers: dict[str, str] | None = None) -> Response:
    """The JSON error body and status for ``error``."""
    return json_response(error.to_body(), error.http_status, {**error.headers(), **(headers or {})})


async def handle_gateway_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def handle_http_exception(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    body = {
        "error": {
            "message": str(exc.detail),
            "type": _HTTP_TYPES.get(exc.status_code, "invalid_request_error"),
            "param": None,
            "code": code,
        }
    }
    return json_response(body, exc.status_code, dict(exc.headers or {}))


async def handle_database_error(request: Request, exc: Exception) -> Response:
    """A database outage in any route: 503 ``database_unavailable``, not a 500."""
    log.error("database unavailable in %s %s: %r", request.method, request.url.path, exc)
    what = f"{request.method} {request.url.path}"
    return error_response(
        DatabaseUnavailable(
            f"The database is unavailable, so {what} is not possible right now; retry shortly."
        )
    )


def internal_error_response(exc: Exception, what: str) -> Response:
    """A generic 500 body; the exception and its trace go to the log only."""
    return error_response(unexpected(exc, log, what))


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    return internal_error_response(exc, f"{request.method} {request.url.path}")
