"""What the end-to-end limits and credits modules (``test_rate_limits_e2e.py``,
``test_stream_limits_e2e.py``, ``test_auth_failures_e2e.py``, ``test_credits_e2e.py``) share: the
catalog (``slow-sim`` at 10 ms a token, ``priced-sim`` at $3/$15 per 1M tokens) with a ``[limits]``
window, an SSE client that reads a stream to ``[DONE]`` (``sse``), an envelope request over
``/v1/ws/chat`` (``ws_request``), a KeyStore and Ledger of our own on the gateway's database
(``accounts``, ``settled``), the OpenAI error shape, ``limiter_backend`` (the in-process or a Redis
limiter with a prefix of its own) and the gateways ``short_window`` (2 s window) and
``minute_window`` (60 s), each with both limiters, once per test module. Waiting for a window to
pass is done by polling the observable condition (``poll``, ``wait_for``) with a deadline, never
by sleeping for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from websockets.asyncio.client import ClientConnection

from tokenwire.accounting.keys import KeyStore, load_server_secret
from tokenwire.accounting.ledger import Ledger
from tokenwire.providers.sim import SimPlan, plan
from tokenwire.storage.engine import make_engine
from tokenwire.storage.tables import credit_events, reservations, usage_ledger
from tokenwire.testing import FAST_SIM, GatewayServer, priced_model
from tokenwire.testing_services import delete_keys
from tokenwire.wire.schema import decode_chat_request

CATALOG = (
    FAST_SIM
    + """
[providers.slow]
kind = "sim"
ttft_ms = 0.0
itl_ms = 10.0

[[models]]
id = "slow-sim"
provider = "slow"
upstream_model = "sim"
"""
    + priced_model()
)
SHORT_WINDOW_S = 2.0
REDIS_URL = "redis://127.0.0.1:6379/0"
BACKENDS = ["memory", "redis"]


def overrides(window_s: float, extra: str = "") -> str:
    return CATALOG + f"\n[limits]\nwindow_s = {window_s}\n{extra}\n"


# -- helpers -----------------------------------------------------------------------------------


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(content: str = "Hi", model: str = "sim", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def sim_plan(body: dict[str, Any]) -> SimPlan:
    """What the simulator emits for this body."""
    return plan(decode_chat_request(json.dumps({**body, "stream": True}).encode()))


@dataclass
class Reply:
    """One chat-completions response, streamed or not."""

    status: int
    headers: dict[str, str]
    chunks: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    stream_id: str | None = None

    @property
    def text(self) -> str:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c["choices"]
        )


def lower_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


async def sse(
    session: aiohttp.ClientSession, gw: GatewayServer, key: str, body: dict[str, Any]
) -> Reply:
    """POST a streamed completion and read it to ``[DONE]`` (or its error)."""
    async with session.post(
        gw.base_url + "/v1/chat/completions", json={**body, "stream": True}, headers=bearer(key)
    ) as resp:
        headers = lower_headers(resp.headers)
        if resp.status != 200:
            payload = await resp.json(content_type=None)
            return Reply(
                resp.status, headers, error=payload["error"], stream_id=headers.get("x-stream-id")
            )
        reply = Reply(200, headers, stream_id=headers.get("x-stream-id"))
        done = False
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: ") :]
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                reply.error = chunk["error"]
                continue
            reply.chunks.append(chunk)
        assert done, "the stream ended without [DONE]"
        return reply


async def poll(
    attempt: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], deadline_s: float
) -> tuple[Any, float]:
    """Repeat ``attempt`` until ``ok(result)`` or the deadline; the last result and when it came."""
    end = time.monotonic() + deadline_s
    while True:
        result = await attempt()
        if ok(result) or time.monotonic() > end:
            return result, time.monotonic()
        await asyncio.sleep(0.02)  # the polling interval, not a synchronisation


async def wait_for(predicate: Callable[[], Awaitable[bool]], deadline_s: float) -> bool:
    """Poll an async condition until it holds or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if await predicate():
            return True
        await asyncio.sleep(0.01)
    return await predicate()


@dataclass
class Accounts:
    """A KeyStore and Ledger of our own on the gateway's database (same server secret)."""

    keys: KeyStore
    ledger: Ledger
    engine: Any

    async def open_reservations(self, key_id: str) -> int:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(reservations)
                .where(reservations.c.key_id == key_id)
            )
        return int(value or 0)

    async def credits(self, key_id: str) -> int:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                sa.select(sa.func.sum(credit_events.c.amount_micro)).where(
                    credit_events.c.key_id == key_id
                )
            )
        return int(value or 0)

    async def ledger_charges(self, key_id: str) -> int:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                sa.select(sa.func.sum(usage_ledger.c.charge_micro)).where(
                    usage_ledger.c.key_id == key_id
                )
            )
        return int(value or 0)


@contextlib.asynccontextmanager
async def accounts(gw: GatewayServer) -> AsyncIterator[Accounts]:
    engine = make_engine(gw.settings.database_url)
    try:
        secret = load_server_secret(gw.settings.data_dir, gw.env)
        yield Accounts(KeyStore(engine, secret), Ledger(engine), engine)
    finally:
        await engine.dispose()


async def settled(gw: GatewayServer, acc: Accounts, key_id: str, rows: int) -> bool:
    """No completion is live, none of the key's reservations is open, its ledger has ``rows`` rows."""
    if gw.state.completions.live or await acc.open_reservations(key_id):
        return False
    async with acc.engine.connect() as conn:
        count = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(usage_ledger)
            .where(usage_ledger.c.key_id == key_id)
        )
    return count == rows


def ws_url(gw: GatewayServer) -> str:
    return "ws" + gw.base_url.removeprefix("http") + "/v1/ws/chat"


def create(request_id: str, body: dict[str, Any]) -> str:
    return json.dumps({"type": "chat.completion.create", "request_id": request_id, "body": body})


async def recv_json(ws: ClientConnection, within: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(within):
        message = await ws.recv()
    assert isinstance(message, str)
    parsed = json.loads(message)
    assert isinstance(parsed, dict)
    return parsed


async def ws_request(ws: ClientConnection, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Send one envelope request; return its ``chat.completion.done`` or its ``error``."""
    await ws.send(create(request_id, body))
    while True:
        message = await recv_json(ws)
        if message.get("request_id") != request_id:
            continue
        if message["type"] in {"chat.completion.done", "error"}:
            return message


def check_openai_error(error: dict[str, Any] | None, *, type_: str, code: str) -> None:
    assert error is not None
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["type"] == type_, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]


# -- fixtures ----------------------------------------------------------------------------------


@contextlib.contextmanager
def limiter_backend(backend: str) -> Iterator[str]:
    """``[limits]`` lines selecting ``backend``; Redis gets a prefix of its own, removed afterwards."""
    if backend == "memory":
        yield 'backend = "memory"'
        return
    prefix = f"tokenwire-e2e-{secrets.token_hex(6)}:"
    try:
        yield f'backend = "redis"\nredis_url = "{REDIS_URL}"\nredis_prefix = "{prefix}"'
    finally:
        delete_keys(REDIS_URL, prefix)


@pytest.fixture(scope="module", params=BACKENDS)
def short_window(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    """A gateway whose rate-limit window is 2 s (in-process or Redis limiter)."""
    with (
        limiter_backend(request.param) as backend,
        GatewayServer(
            tmp_path_factory.mktemp("short"), overrides=overrides(SHORT_WINDOW_S, backend)
        ) as gw,
    ):
        yield gw


@pytest.fixture(scope="module", params=BACKENDS)
def minute_window(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    """A gateway with the default 60 s window (tokens barely regenerate during a test)."""
    with (
        limiter_backend(request.param) as backend,
        GatewayServer(tmp_path_factory.mktemp("minute"), overrides=overrides(60.0, backend)) as gw,
    ):
        yield gw


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session
