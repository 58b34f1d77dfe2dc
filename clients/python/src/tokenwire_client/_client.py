"""The asynchronous client, the one implementation (the synchronous ``Client`` wraps it)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Literal, overload

from tokenwire_client._http import HttpTransport
from tokenwire_client._stream import AsyncStream, start_stream
from tokenwire_client._transport import StreamRequest, StreamTransport, new_idempotency_key
from tokenwire_client._ws import WebSocketTransport, ws_url
from tokenwire_client.errors import AuthenticationError, PermissionDeniedError
from tokenwire_client.retry import RetryPolicy
from tokenwire_client.types import ChatCompletion, KeyValidation, Model, ModelList

Transport = Literal["sse", "ws"]
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_CANCEL_TIMEOUT_S = 10.0


class AsyncClient:
    """A tokenwire gateway client for asyncio code.

    ``base_url`` (``TOKENWIRE_BASE_URL``; with or without ``/v1``) and ``api_key``
    (``TOKENWIRE_API_KEY``) say where and who. ``transport`` carries streamed completions over
    SSE (one HTTP request each) or one WebSocket shared by all of the client's requests.
    ``timeout`` bounds connecting and any silence while waiting for data. ``max_retries``
    bounds consecutive failed attempts of one request (``retry_policy`` for the rest; see
    :mod:`tokenwire_client.retry`).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: Transport = "sse",
        max_retries: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry_policy: RetryPolicy | None = None,
        ws_ping_interval: float = 20.0,
        ws_max_concurrent_requests: int = 32,
    ) -> None:
        if transport not in ("sse", "ws"):
            raise ValueError(f"transport must be 'sse' or 'ws', not {transport!r}")
        base = base_url or os.environ.get("TOKENWIRE_BASE_URL") or DEFAULT_BASE_URL
        key = api_key or os.environ.get("TOKENWIRE_API_KEY")
        if not key:
            raise ValueError("an api_key is needed (or set TOKENWIRE_API_KEY)")
        policy = retry_policy or RetryPolicy()
        if max_retries is not None:
            policy = RetryPolicy(
                max_retries=max_retries,
                initial_backoff_s=policy.initial_backoff_s,
                max_backoff_s=policy.max_backoff_s,
                max_retry_time_s=policy.max_retry_time_s,
            )
        self.retry_policy = policy
        self.transport: Transport = transport
        self.timeout = timeout
        self._http = HttpTransport(base, key, timeout_s=timeout)
        self.base_url = self._http.root
        self._streams: StreamTransport = self._http
        self._ws: WebSocketTransport | None = None
        if transport == "ws":
            self._ws = WebSocketTransport(
                ws_url(self._http.root),
                key,
                timeout_s=timeout,
                ping_interval_s=ws_ping_interval,
                max_concurrent=ws_max_concurrent_requests,
            )
            self._streams = self._ws
        self._open_streams: weakref.WeakSet[AsyncStream] = weakref.WeakSet()
        self.chat = AsyncChat(self)
        self.models = AsyncModels(self)

    async def validate_key(self) -> KeyValidation:
        """Whether the gateway accepts the API key, and why not (a revoked key, ...).

        Connection failures and other errors raise as usual: they say nothing about the key.
        """
        try:
            await self._http.call_json("GET", "/models", self.retry_policy)
        except (AuthenticationError, PermissionDeniedError) as exc:
            return KeyValidation(False, exc.message)
        return KeyValidation(True, "The gateway accepts this key.")

    async def aclose(self) -> None:
        """Close the streams still open (cancelled upstream), then the connections."""
        for stream in list(self._open_streams):
            await stream.close()
        if self._ws is not None:
            await self._ws.aclose()
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncChat:
    """``client.chat``."""

    def __init__(self, client: AsyncClient) -> None:
        self.completions = AsyncCompletions(client)


class AsyncCompletions:
    """``client.chat.completions``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    @overload
    async def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: Literal[True],
        idempotency_key: str | None = None,
        **params: Any,
    ) -> AsyncStream: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: Literal[False] = False,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> ChatCompletion: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: bool,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> AsyncStream | ChatCompletion: ...

    async def create(
        self,
        *,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        stream: bool = False,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> AsyncStream | ChatCompletion:
        """A chat completion; ``params`` are the chat-completions fields (``max_tokens``,
        ``temperature``, ``tools``, ``stream_options``, ...).

        With ``stream=True``, an :class:`AsyncStream` of chunks, returned once the first one
        arrived (an error before it raises here); else the whole :class:`ChatCompletion`.
        Either way the request is streamed with an ``Idempotency-Key`` (``idempotency_key``,
        or a random one) and resumed after a dropped connection, so it runs and is billed once.
        """
        options = params.pop("stream_options", None)
        wants_usage = bool(isinstance(options, Mapping) and options.get("include_usage"))
        body: dict[str, Any] = {
            "model": model,
            "messages": [dict(m) for m in messages],
            **params,
            "stream": True,
            "stream_options": {**(options or {}), "include_usage": True},
        }
        request = StreamRequest(body, idempotency_key or new_idempotency_key())
        client = self._client
        started = await start_stream(
            client._streams,
            request,
            client.retry_policy,
            yield_usage_chunk=wants_usage,
            cancel_timeout_s=min(client.timeout, DEFAULT_CANCEL_TIMEOUT_S),
        )
        if stream:
            client._open_streams.add(started)
            return started
        async with started:
            return await started.get_final_completion()


class AsyncModels:
    """``client.models``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self) -> ModelList:
        """The gateway's catalog (``GET /v1/models``)."""
        data = await self._client._http.call_json("GET", "/models", self._client.retry_policy)
        items = data.get("data", []) if isinstance(data, dict) else []
        return ModelList([Model.from_dict(m) for m in items if isinstance(m, dict)])

    async def retrieve(self, model: str) -> Model:
        """One model of the catalog (``GET /v1/models/{id}``)."""
        data = await self._client._http.call_json(
            "GET", f"/models/{model}", self._client.retry_policy
        )
        return Model.from_dict(data if isinstance(data, dict) else {})
