"""tokenwire-client: streamed chat completions from a tokenwire gateway, without the fragile
client code (retries, 429 handling, reconnects, resumes, WebSocket framing).

::

    from tokenwire_client import Client

    with Client("http://127.0.0.1:8000", "tw-...", transport="ws") as client:
        with client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "Hello"}], stream=True
        ) as stream:
            for text in stream.text_stream:
                print(text, end="", flush=True)
        print(stream.usage)
"""

from __future__ import annotations

from tokenwire_client._client import AsyncClient
from tokenwire_client._stream import AsyncStream
from tokenwire_client._sync import Client, Stream
from tokenwire_client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    IdempotencyConflictError,
    IdempotencyInProgressError,
    InsufficientQuotaError,
    InternalServerError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    StreamGoneError,
    StreamNotFoundError,
    TokenwireError,
    UpstreamError,
    UpstreamTimeoutError,
)
from tokenwire_client.retry import RetryPolicy
from tokenwire_client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    CompletionUsage,
    KeyValidation,
    Model,
    ModelList,
)

__version__ = "0.1.0"
__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Client",
    "CompletionUsage",
    "ConflictError",
    "IdempotencyConflictError",
    "IdempotencyInProgressError",
    "InsufficientQuotaError",
    "InternalServerError",
    "KeyValidation",
    "Model",
    "ModelList",
    "ModelNotFoundError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTooLargeError",
    "RetryPolicy",
    "ServiceUnavailableError",
    "Stream",
    "StreamGoneError",
    "StreamNotFoundError",
    "TokenwireError",
    "UpstreamError",
    "UpstreamTimeoutError",
]
