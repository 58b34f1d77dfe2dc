"""The one exception tree of tokenwire.

Every error the gateway can report to a client is a :class:`GatewayError`. Each class knows
its HTTP status, its OpenAI error ``type`` and ``code``, and whether a retry against another
upstream could succeed. Services raise these; one handler renders them as a JSON error body
(before response headers are sent) or as an in-band stream event (after).

Foreign exceptions (aiohttp, msgspec, SQLAlchemy, llama.cpp) are translated at the boundary
where they occur and never leave it.

::

    GatewayError                      500 api_error
    ├── InternalError                 500 internal_error        (a bug: logged, never detailed)
    ├── InvalidRequest                400 invalid_request_error
    │   ├── BodyTooLarge              413
    │   └── UnsupportedParameter      400 (a parameter a provider cannot honour)
    ├── AuthenticationError           401 authentication_error
    ├── InsufficientQuota             402 insufficient_quota    (credits cannot cover it)
    ├── PermissionDenied              403 permission_error
    ├── NotFound                      404 invalid_request_error
    │   └── ModelNotFound             404 model_not_found
    ├── IdempotencyConflict           409 idempotency_key_reused (same key, another body)
    ├── IdempotencyInProgress         409 idempotency_key_in_use (Retry-After: 1)
    ├── StreamGone                    410 stream_expired / cursor_out_of_range
    ├── RateLimited                   429 rate_limit_exceeded   (retry_after_s)
    ├── ProviderUnavailable           503 provider_unavailable  (not configured / not built)
    ├── PlanUnavailable               503 plan_unavailable      (the key's plan is not configured)
    ├── StreamStoreUnavailable        503 stream_store_unavailable (Redis, for shared streams)
    ├── DatabaseUnavailable           503 database_unavailable  (keys and credits cannot be read)
    ├── LimiterUnavailable            503 rate_limiter_unavailable (Redis, for shared limits)
    ├── TicketStoreUnavailable        503 ticket_store_unavailable (Redis, for shared tickets)
    ├── ServerShuttingDown            503 server_shutting_down  (draining: retry elsewhere;
    │                                     in-band when a drain ends a running stream)
    ├── UpstreamError                 502 upstream_error        (retryable)
    │   ├── UpstreamTimeout           504 upstream_timeout
    │   ├── UpstreamAuthError         502 upstream_auth_error   (the operator's provider key
    │   │                                 was refused; retryable on another deployment)
    │   └── UpstreamStatusError       the upstream's own status and body
    └── RecordedError                 an error another gateway process logged, as it was
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar


class GatewayError(Exception):
    """Base of every error tokenwire reports to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    default_code: ClassVar[str | None] = None
    retryable: ClassVar[bool] = False
    retry_after_header: ClassVar[str | None] = None  # a fixed Retry-After, e.g. "1"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.status_override = status

    @property
    def http_status(self) -> int:
        """The HTTP status this error is reported with."""
        return self.status_override if self.status_override is not None else self.status

    def to_body(self) -> dict[str, Any]:
        """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        """Extra response headers this error carries (e.g. ``Retry-After``)."""
        return {} if self.retry_after_header is None else {"Retry-After": self.retry_after_header}


class InternalError(GatewayError):
    """Something unexpected failed inside the gateway: the client sees a generic 500.

    The exception that caused it goes to the log (with its trace), never to the client.
    """

    default_code = "internal_error"

    def __init__(self, message: str = "", *, reference: str | None = None) -> None:
        text = message or "The server had an internal error; it has been logged."
        if reference:
            text += f" Reference: {reference}."
        super().__init__(text)


def unexpected(exc: BaseException, log: logging.Logger, what: str) -> InternalError:
    """An exception outside the tree, logged with its trace, as the ``InternalError`` to report.

    ``what`` names the failing work for the operator (e.g. ``"completion chatcmpl-…"``); the
    client sees only a generic message with that reference.
    """
    log.error("unexpected error in %s", what, exc_info=exc)
    return InternalError(reference=what)


class InvalidRequest(GatewayError):
    """The request is malformed or violates the schema."""

    status = 400
    type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    """The request body exceeds the configured limit."""

    status = 413
    default_code = "request_too_large"


class UnsupportedParameter(InvalidRequest):
    """A parameter is valid OpenAI but the chosen provider cannot honour it."""

    default_code = "unsupported_parameter"


class AuthenticationError(GatewayError):
    """Missing, unknown, expired or revoked API key."""

    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class InsufficientQuota(GatewayError):
    """The key's credit balance cannot cover the request's worst-case cost."""

    status = 402
    type = "insufficient_quota"
    default_code = "insufficient_quota"


class PermissionDenied(GatewayError):
    """The key is valid but may not do this."""

    status = 403
    type = "permission_error"
    default_code = "permission_denied"


class NotFound(GatewayError):
    """The addressed resource does not exist (or is not visible to this key)."""

    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    """The requested model is not in the catalog."""

    default_code = "model_not_found"


class RateLimited(GatewayError):
    """A limit was hit; ``retry_after_s`` tells when to try again."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    retryable = True

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, int(-(-self.retry_after_s // 1))))}


class StreamGone(GatewayError):
    """The stream existed but its events (or the ones asked for) are no longer kept."""

    status = 410
    type = "invalid_request_error"
    default_code = "stream_expired"


class IdempotencyConflict(GatewayError):
    """The same Idempotency-Key was used with a different request body."""

    status = 409
    type = "invalid_request_error"
    default_code = "idempotency_key_reused"


class IdempotencyInProgress(GatewayError):
    """A request with this Idempotency-Key is being admitted right now; retry in a moment."""

    status = 409
    type = "invalid_request_error"
    default_code = "idempotency_key_in_use"
    retry_after_header = "1"


class StreamStoreUnavailable(GatewayError):
    """Redis, which holds the shared stream logs, cannot be reached."""

    status = 503
    type = "api_error"
    default_code = "stream_store_unavailable"


class DatabaseUnavailable(GatewayError):
    """The database that holds keys and credits cannot be reached (or refuses the work)."""

    status = 503
    type = "api_error"
    default_code = "database_unavailable"
    retryable = True
    retry_after_header = "1"


class LimiterUnavailable(GatewayError):
    """The shared rate-limit store (Redis) cannot be reached."""

    status = 503
    type = "api_error"
    default_code = "rate_limiter_unavailable"


class TicketStoreUnavailable(GatewayError):
    """The shared WebSocket ticket store (Redis) cannot be reached."""

    status = 503
    type = "api_error"
    default_code = "ticket_store_unavailable"
    retry_after_header = "1"


class ServerShuttingDown(GatewayError):
    """This gateway process is draining before it exits (docs/operations.md, "Drain").

    Before a request runs, it is refused with this (503, ``Retry-After: 1``): another
    instance behind the same load balancer takes the retry. A stream still running when the
    drain timeout ends is ended with it in-band; ``stream_id`` and ``resumable`` then say
    whether its events can be read again on another instance (a shared stream store).
    """

    status = 503
    type = "api_error"
    default_code = "server_shutting_down"
    retryable = True
    retry_after_header = "1"
    retry_after_s = 1.0  # over WebSocket: retry_after_ms

    def __init__(
        self, message: str, *, stream_id: str | None = None, resumable: bool = False
    ) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.resumable = resumable

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        if self.stream_id is not None:
            body["error"]["stream_id"] = self.stream_id
            body["error"]["resumable"] = self.resumable
        return body


class ProviderUnavailable(GatewayError):
    """The model's provider is not configured or not available in this build."""

    status = 503
    type = "api_error"
    default_code = "provider_unavailable"


class PlanUnavailable(GatewayError):
    """The key's plan is not in this gateway's configuration (it was removed or renamed)."""

    status = 503
    type = "api_error"
    default_code = "plan_unavailable"


class UpstreamError(GatewayError):
    """The upstream failed (connection error, bad response).

    ``request_sent`` is False only when the request provably never reached the upstream (the
    connection could not be made): only then may it be sent again, here or elsewhere, without
    risking a second generation billed upstream.
    """

    status = 502
    type = "api_error"
    default_code = "upstream_error"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        request_sent: bool = True,
    ) -> None:
        super().__init__(message, param=param, code=code, status=status)
        self.request_sent = request_sent


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time."""

    status = 504
    default_code = "upstream_timeout"


class UpstreamAuthError(UpstreamError):
    """The upstream refused the gateway's own credentials (HTTP 401/403, or a bad-key reply).

    The client's key is fine: this is the operator's provider key, so the client gets a 502
    (never a 401 that would blame its key) and the operator an ERROR log line naming the
    provider. Retryable: another deployment, with another key, may accept the request; the
    refusal counts toward the deployment's circuit breaker.
    """

    default_code = "upstream_auth_error"

    def __init__(self, provider: str, upstream_status: int) -> None:
        super().__init__(
            f"Upstream {provider!r} refused the gateway's credentials (HTTP {upstream_status}); "
            "the gateway operator has to fix its provider API key.",
            request_sent=False,  # refused, not processed: another deployment may take it
        )
        self.provider = provider
        self.upstream_status = upstream_status


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an HTTP error; its status is kept."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, param=param)
        self.error_type = error_type
        self.retry_after_s = retry_after_s

    @property
    def is_retryable(self) -> bool:
        """429 and 5xx may succeed on another attempt or deployment."""
        return self.http_status == 429 or self.http_status >= 500

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        if self.error_type:
            body["error"]["type"] = self.error_type
        return body

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, int(-(-self.retry_after_s // 1))))}


class RecordedError(GatewayError):
    """An error read back from a shared stream log, reported exactly as it was first reported.

    A stream generated by another gateway process ends its log with the error that process
    reported; this carries its status, type, code, message and param unchanged.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_type: str,
        code: str | None,
        param: str | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, param=param)
        self.error_type = error_type
        self.extra = extra or {}  # fields beyond OpenAI's four (e.g. a drain's stream_id)

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        body["error"]["type"] = self.error_type
        body["error"].update(self.extra)
        return body
