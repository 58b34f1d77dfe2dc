"""The exceptions the client raises: one tree, mirroring the gateway's error codes.

Names follow the ``openai`` SDK where the idea is the same, so code written for it reads the
same; the gateway's own codes get classes of their own. Every :class:`APIStatusError` carries
the gateway's ``status``, ``type``, ``code``, ``param`` and ``message``.

::

    TokenwireError
    ├── APIConnectionError            the gateway could not be reached (retries exhausted)
    │   └── APITimeoutError           nothing arrived for ``timeout`` seconds
    └── APIStatusError                the gateway answered with an error
        ├── BadRequestError           400 (``param`` names the field)
        │   └── RequestTooLargeError  413
        ├── AuthenticationError       401 (unknown, revoked or expired key)
        ├── InsufficientQuotaError    402 (credits cannot cover the request)
        ├── PermissionDeniedError     403 (e.g. a model the key may not use)
        ├── NotFoundError             404
        │   ├── ModelNotFoundError    404 model_not_found
        │   └── StreamNotFoundError   404 stream_not_found (a resume of an unknown stream)
        ├── ConflictError             409
        │   ├── IdempotencyConflictError    idempotency_key_reused (another body)
        │   └── IdempotencyInProgressError  idempotency_key_in_use (retried by the client)
        ├── StreamGoneError           410 (stream_expired, cursor_out_of_range)
        ├── RateLimitError            429 (``retry_after``: seconds, from the headers)
        └── InternalServerError       5xx
            ├── UpstreamError         502 (the model's provider failed)
            ├── ServiceUnavailableError 503 (provider, database or Redis unavailable)
            └── UpstreamTimeoutError  504
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class TokenwireError(Exception):
    """Base of every error this client raises."""


class APIConnectionError(TokenwireError):
    """The gateway could not be reached, or the connection kept dropping, past the retries."""


class APITimeoutError(APIConnectionError):
    """Nothing arrived from the gateway for ``timeout`` seconds."""


class APIStatusError(TokenwireError):
    """The gateway answered with an error (an HTTP status, or an error event in a stream)."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        self.retry_after = retry_after
        self.body: dict[str, Any] = dict(body or {})

    @property
    def status_code(self) -> int:
        """The HTTP status (the ``openai`` SDK's name for it)."""
        return self.status

    def __str__(self) -> str:
        code = f" {self.code}" if self.code else ""
        return f"{self.status}{code}: {self.message}"


class BadRequestError(APIStatusError):
    """400: the request is invalid; ``param`` names the offending field."""


class RequestTooLargeError(BadRequestError):
    """413: the request body is over the gateway's limit."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing, unknown, revoked or expired."""


class InsufficientQuotaError(APIStatusError):
    """402: the key's credits cannot cover the request's worst-case cost."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this (e.g. use this model)."""


class NotFoundError(APIStatusError):
    """404: no such resource for this key."""


class ModelNotFoundError(NotFoundError):
    """404 ``model_not_found``: the model is not in the gateway's catalog."""


class StreamNotFoundError(NotFoundError):
    """404 ``stream_not_found``: a stream to resume is unknown (or another key's)."""


class ConflictError(APIStatusError):
    """409: the request conflicts with an earlier one."""


class IdempotencyConflictError(ConflictError):
    """409 ``idempotency_key_reused``: this Idempotency-Key went with another body."""


class IdempotencyInProgressError(ConflictError):
    """409 ``idempotency_key_in_use``: the first request with this key is still being
    admitted (the client waits ``Retry-After`` and retries it)."""


class StreamGoneError(APIStatusError):
    """410: the stream's events are no longer kept (retention passed, or evicted)."""


class RateLimitError(APIStatusError):
    """429: a limit was hit; ``retry_after`` says in how many seconds to try again."""


class InternalServerError(APIStatusError):
    """5xx: the gateway or the model's provider failed."""


class UpstreamError(InternalServerError):
    """502: the model's provider failed or refused the gateway."""


class ServiceUnavailableError(InternalServerError):
    """503: the provider is not configured, or a store the gateway needs is down."""


class UpstreamTimeoutError(InternalServerError):
    """504: the model's provider did not answer in time."""


_BY_CODE: dict[str, type[APIStatusError]] = {
    "model_not_found": ModelNotFoundError,
    "stream_not_found": StreamNotFoundError,
    "idempotency_key_reused": IdempotencyConflictError,
    "idempotency_key_in_use": IdempotencyInProgressError,
}
_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientQuotaError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    410: StreamGoneError,
    413: RequestTooLargeError,
    422: BadRequestError,
    429: RateLimitError,
    502: UpstreamError,
    503: ServiceUnavailableError,
    504: UpstreamTimeoutError,
}


def error_class(status: int, code: str | None) -> type[APIStatusError]:
    """The exception class for a gateway error of this status and code."""
    by_code = _BY_CODE.get(code or "")
    if by_code is not None:
        return by_code
    by_status = _BY_STATUS.get(status)
    if by_status is not None:
        return by_status
    if status >= 500:
        return InternalServerError
    if 400 <= status < 500:
        return BadRequestError
    return APIStatusError


def error_from_body(
    status: int,
    body: object,
    *,
    headers: Mapping[str, str] | None = None,
    retry_after: float | None = None,
) -> APIStatusError:
    """The typed error for an OpenAI-style error body (``{"error": {...}}``) or anything else."""
    fields: Mapping[str, Any] = {}
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            fields = inner
    message = fields.get("message")
    if not isinstance(message, str) or not message:
        message = f"The gateway answered HTTP {status}."
    code = fields.get("code")
    cls = error_class(status, code if isinstance(code, str) else None)
    return cls(
        message,
        status=status,
        type=_text(fields.get("type")),
        code=_text(code),
        param=_text(fields.get("param")),
        headers=headers,
        retry_after=retry_after,
        body=body if isinstance(body, Mapping) else None,
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
