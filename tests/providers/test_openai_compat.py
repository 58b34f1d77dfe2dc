"""The OpenAI-compatible provider against a loopback server that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import msgspec
import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tokenwire.errors import UpstreamAuthError, UpstreamError, UpstreamStatusError, UpstreamTimeout
from tokenwire.providers.base import ProviderCall
from tokenwire.providers.openai_compat import OpenAICompatProvider, _Chunk, chunk_events
from tokenwire.streams.events import Event, Finish, TextDelta, ToolCallDelta, Usage
from tokenwire.testing import FAST_SIM, GatewayServer, ServerThread
from tokenwire.wire.schema import ChatRequest, decode_chat_request

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BODY = {"model": "public-name", "messages": [{"role": "user", "content": "hi"}], "vendor_x": 1}


def chunk(
    delta: dict[str, object] | None = None,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
) -> bytes:
    choices = (
        []
        if delta is None and finish is None
        else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    )
    payload: dict[str, object] = {"id": "x", "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        payload["usage"] = usage
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def serve(handler: Handler) -> TestServer:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[Handler], Awaitable[OpenAICompatProvider]]]:
    servers: list[TestServer] = []
    providers: list[OpenAICompatProvider] = []

    async def make(handler: Handler, **options: float) -> OpenAICompatProvider:
        server = await serve(handler)
        servers.append(server)
        provider = OpenAICompatProvider(
            "fake", base_url=str(server.make_url("/v1")), api_key="sk-secret-value", **options
        )
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        await provider.aclose()
    for server in servers:
        await server.close()


def run_request() -> ChatRequest:
    return decode_chat_request(json.dumps(BODY).encode())


async def run(provider: OpenAICompatProvider) -> list[Event]:
    call = ProviderCall(run_request(), "upstream-name", dict(BODY))
    return [event async for event in provider.stream(call)]


async def test_stream_translates_and_forces_usage(
    upstream: Callable[[Handler], Awaitable[OpenAICompatProvider]],
) -> None:
    """Content, tool calls, finish and usage become typed events; the body is passed through."""
    seen: dict[str, object] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.update(await request.json())
        seen["auth"] = request.headers["Authorization"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk({"role": "assistant", "content": "Hel"}))
        await response.write(chunk({"content": "lo"}))
        await response.write(
            chunk(
                {
                    "tool_calls": [
                        {"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}
                    ]
                }
            )
        )
        await response.write(chunk(finish="stop"))
        await response.write(chunk(usage={"prompt_tokens": 3, "completion_tokens": 2}))
        await response.write(b"data: [DONE]\n\n")
        return response

    events = await run(await upstream(handler))
    assert events == [
        TextDelta("Hel"),
        TextDelta("lo"),
        ToolCallDelta(index=0, id="c1", name="f", arguments="{}"),
        Finish("stop"),
        Usage(3, 2),
    ]
    assert seen["model"] == "upstream-name" and seen["stream"] is True
    assert seen["stream_options"] == {"include_usage": True}
    assert seen["vendor_x"] == 1
    assert seen["auth"] == "Bearer sk-secret-value"


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens_details": {"cached_tokens": 1024}}, 1024),  # OpenAI
        ({"prompt_tokens_details": None, "prompt_cache_hit_tokens": 768}, 768),  # DeepSeek
        ({"prompt_tokens_details": {"cached_tokens": None}}, 0),  # vLLM and the like
        ({"prompt_tokens_details": {"cached_tokens": 9999}}, 2000),  # never beyond the prompt
    ],
)
def test_cached_prompt_tokens_are_kept_apart(usage: dict[str, object], expected: int) -> None:
    """The part of the prompt the upstream read from its cache is the usage's cache_read."""
    body = {"choices": [], "usage": {"prompt_tokens": 2000, "completion_tokens": 5, **usage}}
    events = chunk_events(msgspec.json.decode(json.dumps(body), type=_Chunk), "openai")
    assert events == [Usage(2000, 5, cache_read_tokens=expected)]


@pytest.mark.parametrize("status", [400, 429, 500, 503])
async def test_http_errors_keep_status_and_name_the_upstream(
    upstream: Callable[[Handler], Awaitable[OpenAICompatProvider]], status: int
) -> None:
    """An upstream error reply becomes an UpstreamStatusError with its status and message."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = {"error": {"message": "nope", "type": "server_error", "code": "c", "param": None}}
        return web.json_response(body, status=status, headers={"Retry-After": "2"})

    with pytest.raises(UpstreamStatusError) as info:
        await run(await upstream(handler))
    error = info.value
    assert error.http_status == status
    assert "'fake'" in error.message and "nope" in error.message
    assert "sk-secret-value" not in error.message
    assert error.retry_after_s == 2.0
    assert error.to_body()["error"]["type"] == "server_error"


# OpenAI's reply to a wrong key quotes part of it; neither the client nor the log may see it.
REFUSED_KEY_BODY = {
    "error": {
        "message": "Incorrect API key provided: sk-secr*****alue.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_provider_key_is_a_502_upstream_auth_error(
    upstream: Callable[[Handler], Awaitable[OpenAICompatProvider]],
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An upstream 401/403 is the operator's key: a retryable 502 upstream_auth_error, logged at ERROR."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(REFUSED_KEY_BODY, status=status)

    with (
        caplog.at_level(logging.ERROR, logger="tokenwire.providers"),
        pytest.raises(UpstreamAuthError) as info,
    ):
        await run(await upstream(handler))
    error = info.value
    assert error.http_status == 502 and error.retryable and error.upstream_status == status
    body = error.to_body()["error"]
    assert body["code"] == "upstream_auth_error" and body["type"] == "api_error"
    assert "'fake'" in error.message
    assert "sk-secr" not in error.message and "Incorrect API key" not in error.message
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 1
    line = logged[0].getMessage()
    assert "'fake'" in line and str(status) in line
    assert "sk-secr" not in line and "sk-secret-value" not in line


async def refuse_the_key(_request: Request) -> JSONResponse:
    return JSONResponse(REFUSED_KEY_BODY, status_code=401)


@pytest.fixture(scope="module")
def refusing_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """A gateway whose model ``locked`` is served by an upstream that refuses the gateway's key."""
    app = Starlette(routes=[Route("/v1/chat/completions", refuse_the_key, methods=["POST"])])
    with ServerThread(app) as refusing:
        overrides = (
            FAST_SIM
            + f"""
[providers.vendor]
kind = "openai"
base_url = "{refusing.base_url}/v1"

[[models]]
id = "locked"
provider = "vendor"
"""
        )
        with GatewayServer(tmp_path_factory.mktemp("refusing"), overrides=overrides) as gateway:
            yield gateway


@pytest.mark.parametrize("stream", [True, False])
def test_client_gets_502_not_401_when_the_provider_key_is_refused(
    refusing_gateway: GatewayServer, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Over HTTP the client sees 502 upstream_auth_error (its own key is fine); the operator's log names the provider."""
    gateway = refusing_gateway
    with caplog.at_level(logging.ERROR, logger="tokenwire.providers"):
        response = requests.post(
            gateway.base_url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {gateway.api_key}"},
            json={
                "model": "locked",
                "stream": stream,
                "messages": [{"role": "user", "content": "x"}],
            },
            timeout=30,
        )
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_auth_error" and error["type"] == "api_error"
    assert "'vendor'" in error["message"] and "Incorrect API key" not in error["message"]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("'vendor'" in line and "401" in line for line in lines), lines
    assert not any("sk-secr" in line for line in lines)
    # the client's own key still works
    models = requests.get(
        gateway.base_url + "/v1/models",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        timeout=10,
    )
    assert models.status_code == 200


async def test_malformed_chunk_is_an_upstream_error(
    upstream: Callable[[Handler], Awaitable[OpenAICompatProvider]],
) -> None:
    """A chunk that is not JSON ends the stream with UpstreamError after the good events."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk({"content": "ok"}))
        await response.write(b"data: {not json\n\n")
        return response

    provider = await upstream(handler)
    request = decode_chat_request(json.dumps(BODY).encode())
    got: list[Event] = []
    with pytest.raises(UpstreamError, match="malformed"):
        async for event in provider.stream(ProviderCall(request, "m", dict(BODY))):
            got.append(event)
    assert got == [TextDelta("ok")]


async def test_no_token_in_time_is_a_timeout(
    upstream: Callable[[Handler], Awaitable[OpenAICompatProvider]],
) -> None:
    """An upstream that never sends a token hits the first-token timeout."""
    import asyncio

    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await release.wait()
        return response

    provider = await upstream(handler, first_token_timeout_s=0.2)
    try:
        with pytest.raises(UpstreamTimeout):
            await run(provider)
    finally:
        release.set()


async def test_connection_refused_is_an_upstream_error() -> None:
    """Nothing listening: a retryable UpstreamError that names the upstream."""
    provider = OpenAICompatProvider("gone", base_url="http://127.0.0.1:9/v1", api_key=None)
    try:
        with pytest.raises(UpstreamError) as info:
            await run(provider)
        assert info.value.retryable and "'gone'" in info.value.message
    finally:
        await provider.aclose()


async def test_an_endless_upstream_line_is_an_upstream_error(
    upstream: Callable[[Handler], Awaitable[OpenAICompatProvider]],
) -> None:
    """An upstream that sends a line without end (past 1 MiB) fails with UpstreamError, not unbounded memory."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk({"content": "ok"}))
        try:
            for _ in range(40):  # 2.5 MiB, never a newline
                await response.write(b"x" * 65536)
            await release.wait()
        except ConnectionResetError:
            pass  # the gateway hung up: what it should do
        return response

    provider = await upstream(handler, first_token_timeout_s=10.0, idle_timeout_s=10.0)
    got: list[Event] = []
    try:
        with pytest.raises(UpstreamError, match="longer than 1048576 bytes"):
            async for event in provider.stream(ProviderCall(run_request(), "m", dict(BODY))):
                got.append(event)
    finally:
        release.set()
    assert got == [TextDelta("ok")]
