"""Servers for the transport conformance suite (one set for the whole session).

``conformance_gateway`` serves three models:

* ``sim``: the in-process simulator (instant);
* ``proxied-sim``: ``tokenwire sim-upstream`` over real HTTP (the session's ``sim_upstream``);
* ``instant-sim``: the in-process simulator with no delay between tokens (large outputs);
* ``priced-sim``: ``sim`` at $3 / $15 per 1M tokens (billing);
* ``flaky``: a misbehaving OpenAI-compatible upstream whose behaviour is chosen by the last
  user message (see :func:`flaky_completions`), for upstream failures before and after the
  first token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenwire.testing import (
    FAST_SIM,
    GatewayServer,
    ServerThread,
    SimUpstreamServer,
    priced_model,
)

#: How long the ``hang`` mode waits before its first event.
HANG_S = 3.0
#: The one good chunk the flaky upstream sends before failing mid-stream.
PARTIAL_TEXT = "partial"
_GOOD_CHUNK = {
    "id": "chatcmpl-upstream",
    "object": "chat.completion.chunk",
    "created": 0,
    "model": "flaky",
    "choices": [{"index": 0, "delta": {"content": PARTIAL_TEXT}, "finish_reason": None}],
}


#: ``unicode`` mode: text that needs JSON escaping (quotes, backslash, control characters,
#: U+2028, non-BMP), streamed in three chunks; then a finish chunk and, unless ``no-usage``,
#: this usage.
TRICKY_PARTS = ('Grüße, "world" \\ ', "line\nbreak\ttab \u2028 ", "🚀 done\u0001")
UPSTREAM_USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


def _chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, object]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {**_GOOD_CHUNK, "choices": [choice]}


def _sse(data: object) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def flaky_completions(request: Request) -> Response:
    """An upstream that fails the way the last user message says.

    ``fail-503`` / ``fail-429``: an HTTP error before any token (429 with ``Retry-After: 3``).
    ``mid-garbage``: one good chunk, then a chunk that is not JSON.
    ``mid-error``: one good chunk, then an in-band ``{"error": …}`` chunk.
    ``mid-eof``: one good chunk, then the body ends (no finish reason, no ``[DONE]``).
    ``hang``: a 200 with no event for ``HANG_S`` (a request to cancel before its first token).
    ``unicode`` / ``no-usage``: a complete stream of :data:`TRICKY_PARTS` (without usage).
    """
    body = await request.json()
    mode = body["messages"][-1]["content"]
    if mode == "fail-503":
        error = {"message": "overloaded, try later", "type": "server_error", "code": "overloaded"}
        return JSONResponse({"error": error}, status_code=503)
    if mode == "fail-429":
        error = {"message": "slow down", "type": "rate_limit_error", "code": "rate_limit_exceeded"}
        return JSONResponse({"error": error}, status_code=429, headers={"Retry-After": "3"})

    async def stream() -> AsyncIterator[bytes]:
        if mode in ("unicode", "no-usage"):
            yield _sse(_chunk({"role": "assistant", "content": TRICKY_PARTS[0]}))
            for part in TRICKY_PARTS[1:]:
                yield _sse(_chunk({"content": part}))
            yield _sse(_chunk({}, "stop"))
            if mode == "unicode":
                yield _sse({**_GOOD_CHUNK, "choices": [], "usage": UPSTREAM_USAGE})
            yield b"data: [DONE]\n\n"
            return
        if mode == "hang":
            yield b": waiting\n\n"
            await asyncio.sleep(HANG_S)
        yield _sse(_GOOD_CHUNK)
        if mode == "mid-garbage":
            yield b"data: {this is not json\n\n"
        elif mode == "mid-error":
            yield _sse({"error": {"message": "upstream exploded", "type": "server_error"}})

    return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture(scope="session")
def flaky_script() -> dict[str, Any]:
    """What the flaky upstream sends, for tests to compute expected records from."""
    return {
        "partial_text": PARTIAL_TEXT,
        "tricky_parts": TRICKY_PARTS,
        "tricky_text": "".join(TRICKY_PARTS),
        "usage": UPSTREAM_USAGE,
    }


@pytest.fixture(scope="session")
def flaky_upstream() -> Iterator[ServerThread]:
    app = Starlette(routes=[Route("/v1/chat/completions", flaky_completions, methods=["POST"])])
    with ServerThread(app) as server:
        yield server


@pytest.fixture(scope="session")
def conformance_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    sim_upstream: SimUpstreamServer,
    flaky_upstream: ServerThread,
) -> Iterator[GatewayServer]:
    """One gateway serving ``sim``, ``instant-sim``, ``proxied-sim`` and ``flaky``."""
    overrides = (
        FAST_SIM
        + f"""
[providers.instant]
kind = "sim"
ttft_ms = 0.0
itl_ms = 0.0

[[models]]
id = "instant-sim"
provider = "instant"

[providers.upstream]
kind = "openai"
base_url = "{sim_upstream.base_url}/v1"
first_token_timeout_s = 10.0
idle_timeout_s = 10.0

[providers.flaky]
kind = "openai"
base_url = "{flaky_upstream.base_url}/v1"
first_token_timeout_s = 10.0
idle_timeout_s = 10.0

[[models]]
id = "proxied-sim"
provider = "upstream"
upstream_model = "sim"

[[models]]
id = "flaky"
provider = "flaky"
"""
        + priced_model("priced-sim")
    )
    data_dir = tmp_path_factory.mktemp("conformance")
    with GatewayServer(data_dir, overrides=overrides) as server:
        yield server
