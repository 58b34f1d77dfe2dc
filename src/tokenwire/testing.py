"""Test helpers that ship with the package: real servers on loopback ports, in a thread.

``GatewayServer`` runs the tokenwire app (uvicorn, uvloop, httptools, as ``tokenwire serve``
does) on a free port, with a fresh database and two keys; ``SimUpstreamServer`` runs
``tokenwire sim-upstream``. Both are context managers and work with sync clients (the
``openai`` SDK, ``requests``, Node subprocesses) and async ones alike, since the server has
its own thread and event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp

from tokenwire.accounting.keys import KeyStore, load_server_secret
from tokenwire.accounting.ledger import LedgerRow
from tokenwire.app import create_app, server_options
from tokenwire.config import Settings, load_settings
from tokenwire.drain import DrainReason
from tokenwire.providers.sim import SimPlan, plan
from tokenwire.server import DrainingServer
from tokenwire.simupstream.app import create_sim_app
from tokenwire.state import AppState
from tokenwire.storage.engine import make_engine, migrate
from tokenwire.wire.schema import decode_chat_request

FAST_SIM = """
[providers.sim]
kind = "sim"
ttft_ms = 0.0
itl_ms = 1.0
"""


async def eventually(predicate: Callable[[], bool], deadline_s: float = 5.0) -> bool:
    """Poll an observable condition (one no event signals) until it holds or the deadline
    passes; whether it held."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def priced_model(model_id: str = "priced-sim", provider: str = "sim", *, extra: str = "") -> str:
    """TOML for a model priced like Claude Sonnet ($3 / $15 per 1M tokens: 3 and 15
    micro-dollars a token) that a ``sim`` provider serves: what credit tests run on."""
    return f"""
[[models]]
id = "{model_id}"
provider = "{provider}"
upstream_model = "sim"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "15.00"
{extra}
"""


def ledger_row(key_id: str, completion_id: str, **fields: Any) -> LedgerRow:
    """A completed ledger row (``priced-sim`` on ``sim`` over SSE, 10 prompt and 20 completion
    tokens, no cost or charge, plan ``standard``, made now) with ``fields`` changed."""
    row = LedgerRow(
        completion_id=completion_id,
        key_id=key_id,
        model="priced-sim",
        provider="sim",
        transport="sse",
        prompt_tokens=10,
        completion_tokens=20,
        usage_estimated=False,
        cost_micro=0,
        charge_micro=0,
        plan="standard",
        ttft_ms=1,
        duration_ms=2,
        finish_reason="stop",
        status="completed",
        created_at=int(time.time() * 1000),
    )
    return dataclasses.replace(row, **fields)


def paced_sim(name: str = "paced", *, ttft_ms: float = 5.0, itl_ms: float = 15.0) -> str:
    """TOML for a sim provider whose answers take real time (for load under faults)."""
    return f"""
[providers.{name}]
kind = "sim"
ttft_ms = {ttft_ms}
itl_ms = {itl_ms}
"""


def sim_plan(body: dict[str, Any]) -> SimPlan:
    """What the simulator answers to this chat-completions body (any model name)."""
    return plan(decode_chat_request(json.dumps(body).encode()))


@dataclass
class SSEAnswer:
    """What a client read from one streamed chat completion."""

    text: str = ""
    done: bool = False  # ``data: [DONE]`` arrived
    errors: list[dict[str, Any]] = field(default_factory=list)  # in-band ``{"error": …}``


async def read_sse_answer(lines: AsyncIterator[bytes]) -> SSEAnswer:
    """Read a chat-completions SSE body (e.g. an aiohttp ``response.content``) to its end."""
    answer = SSEAnswer()
    async for line in lines:
        data = line.decode().strip().removeprefix("data: ")
        if data == "[DONE]":
            answer.done = True
        elif data.startswith("{"):
            chunk = json.loads(data)
            if "error" in chunk:
                answer.errors.append(chunk["error"])
            elif chunk["choices"]:
                answer.text += chunk["choices"][0]["delta"].get("content") or ""
    return answer


@dataclass
class Scrape:
    """A parsed ``GET /metrics`` answer (``prometheus_client``'s own parser)."""

    samples: list[tuple[str, dict[str, str], float]]
    families: set[str]  # metric names as declared by # TYPE (counters without ``_total``)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: list[tuple[str, dict[str, str], float]] = []
        families: set[str] = set()
        for family in text_string_to_metric_families(text):
            families.add(family.name)
            samples.extend((s.name, dict(s.labels), float(s.value)) for s in family.samples)
        return cls(samples, families)

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(
            value
            for sample, sample_labels, value in self.samples
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def names(self) -> set[str]:
        """Every sample name present (``x_total``, ``x_bucket``, ``x_count``, ``x_sum``…)."""
        return {name for name, _, _ in self.samples}


class ServerThread:
    """Runs an ASGI app under uvicorn on 127.0.0.1 and a free port, in a daemon thread.

    The server is ``tokenwire serve``'s :class:`~tokenwire.server.DrainingServer`:
    :meth:`begin_drain` does what SIGTERM does to ``serve``; :meth:`stop` drains with no
    timeout (running streams end in-band at once) and waits for the thread.
    """

    def __init__(self, app: ASGIApp, *, drain_timeout_s: float = 0.0, **options: Any) -> None:
        self.app = app
        settings: dict[str, Any] = {
            "loop": "uvloop",
            "http": "httptools",
            "ws": "websockets-sansio",
            "timeout_graceful_shutdown": 5,
            **options,
        }
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, access_log=False, log_level="warning", **settings
        )
        self._server = DrainingServer(config, drain_timeout_s=drain_timeout_s)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=self._server.config.get_loop_factory()) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self._server.serve()

    def loop_of_server(self) -> asyncio.AbstractEventLoop:
        """The server's event loop (for ``asyncio.run_coroutine_threadsafe`` from tests)."""
        assert self.loop is not None
        return self.loop

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        deadline = threading.Event()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("server thread died during start-up")
            deadline.wait(0.01)
        sockets = self._server.servers[0].sockets
        self.port = int(sockets[0].getsockname()[1])

    def begin_drain(self, reason: DrainReason = "shutdown") -> None:
        """Drain and exit as ``serve`` does on SIGTERM (``"restart"``: SIGHUP); returns at once."""
        self._server.request_drain(reason)

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the server to exit; whether it did."""
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    @property
    def streams_ended_by_drain(self) -> int:
        """How many streams the drain's timeout ended (after the server exited)."""
        return self._server.streams_ended_by_drain

    def stop(self) -> None:
        if not self._server.should_exit:
            self._server.drain_timeout_s = 0.0  # a test's end: running streams end at once
            self._server.should_exit = True
        self._thread.join(timeout=15)

    @property
    def running(self) -> bool:
        """Whether the server thread is still alive (``stop`` waits up to 15 s for it)."""
        return self._thread.is_alive()

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def _bootstrap_keys(
    settings: Settings, env: dict[str, str], grant_micro: int
) -> tuple[str, str, str]:
    engine = make_engine(settings.database_url)
    try:
        await migrate(engine)
        store = KeyStore(engine, load_server_secret(settings.data_dir, env))
        _, admin = await store.create("admin", is_admin=True)
        record, user = await store.create("test", grant_micro=grant_micro)
        return admin, user, record.id
    finally:
        await engine.dispose()


class GatewayServer(ServerThread):
    """The tokenwire gateway on a free port with a fresh data dir and keys.

    ``overrides`` is TOML laid over the defaults (``FAST_SIM`` makes ``sim`` instant). The
    API key (``api_key``, id ``api_key_id``) starts with ``grant_usd`` of credit.
    ``plain_uvicorn`` serves through uvicorn's own HTTP and WebSocket protocols (no guards,
    no ``tokenwire.http``/``tokenwire.ws`` extensions), as a bare ``uvicorn --factory
    tokenwire.app:app_from_env`` does.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        overrides: str = FAST_SIM,
        env: dict[str, str] | None = None,
        database_url: str | None = None,
        grant_usd: int = 1000,
        plain_uvicorn: bool = False,
    ) -> None:
        self.env = dict(env or {})
        if database_url is not None:
            self.env["TOKENWIRE_DATABASE_URL"] = database_url
        self.settings = load_settings(data_dir=data_dir, env=self.env, overrides=overrides)
        self.admin_key, self.api_key, self.api_key_id = asyncio.run(
            _bootstrap_keys(self.settings, self.env, grant_usd * 1_000_000)
        )
        options = server_options(self.settings)
        if plain_uvicorn:
            options.update(http="httptools", ws="websockets-sansio")
        super().__init__(
            create_app(self.settings, self.env),
            drain_timeout_s=self.settings.server.drain_timeout_s,
            **options,
        )

    @property
    def state(self) -> AppState:
        """The running app's state (read it from tests; it lives on the server's loop)."""
        state: Any = self.app.state.tw  # type: ignore[attr-defined]
        assert isinstance(state, AppState)
        return state

    def __enter__(self) -> GatewayServer:
        self.start()
        return self

    def call(
        self, method: str, path: str, key: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """One JSON call to the running gateway with ``key``: the status and decoded body."""
        request = urllib.request.Request(
            self.base_url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def create_key(self, name: str, **fields: Any) -> tuple[str, str]:
        """A new API key made through the admin API (``rpm``, ``credits_usd``, ...): its id
        and plaintext."""
        status, body = self.call("POST", "/v1/admin/keys", self.admin_key, {"name": name, **fields})
        if status != 201:
            raise RuntimeError(f"creating a key failed: {status} {body}")
        return body["id"], body["key"]

    def usage_rows(
        self, key: str, count: int = 0, *, including: Collection[str] = (), timeout_s: float = 20.0
    ) -> list[dict[str, Any]]:
        """The key's ledger rows (``GET /v1/usage``, newest first) once at least ``count`` are
        written and the completions ``including`` have theirs (settlement is batched), or
        when ``timeout_s`` has passed."""
        deadline = time.monotonic() + timeout_s
        while True:
            status, body = self.call("GET", "/v1/usage?limit=1000", key)
            if status != 200:
                raise RuntimeError(f"reading usage failed: {status} {body}")
            rows: list[dict[str, Any]] = body["data"]
            written = {row["completion_id"] for row in rows}
            done = len(rows) >= count and written.issuperset(including)
            if done or time.monotonic() > deadline:
                return rows


class SimUpstreamServer(ServerThread):
    """``tokenwire sim-upstream`` on a free port; ``reply`` (tokens) fixes every answer."""

    def __init__(
        self, *, ttft_ms: float = 0.0, itl_ms: float = 1.0, reply: Sequence[str] | None = None
    ) -> None:
        super().__init__(create_sim_app(ttft_ms=ttft_ms, itl_ms=itl_ms, reply=reply))

    def __enter__(self) -> SimUpstreamServer:
        self.start()
        return self
