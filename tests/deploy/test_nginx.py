"""Two ``tokenwire serve`` instances behind nginx, configured from the shipped snippet.

The topology of docs/deployment.md on loopback: a private PostgreSQL database and a private
Redis shared by two gateway processes, and an nginx of the test's own whose configuration is
``deploy/nginx/tokenwire.conf`` with only its addresses changed (``PrivateNginx``). nginx
balances round-robin, and its access log names the instance that served each request, so the
tests can check where things happened.

* Streaming: through nginx, the simulator's tokens (one every 40 ms) arrive one by one, in
  separate reads spread over the stream's duration, over SSE and over WebSocket; also with
  ``proxy_buffering on`` (nginx honours the gateway's ``X-Accel-Buffering: no``), while the
  same nginx told to ignore that header delivers them in a lump (the check can fail).
* Shared state: a WebSocket ticket minted on one instance opens a socket on the other (once);
  a per-key rpm limit and a balance hold across both; a stream started on one instance and
  cut is resumed through nginx on the other while the first still generates it.
* A rolling restart: one instance gets SIGTERM while it streams; the stream completes through
  nginx, GETs go to the other instance, a POST that lands on the draining one gets 503 with
  ``Retry-After`` and its retry succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tokenwire.accounting.keys import KeyLimits
from tokenwire.accounting.ledger import Ledger
from tokenwire.providers.sim import plan
from tokenwire.storage.engine import make_engine
from tokenwire.testing import paced_sim, priced_model
from tokenwire.testing_clients import Recording, record_sse, record_ws
from tokenwire.testing_cluster import Cluster, GatewayProcess
from tokenwire.testing_services import AccessLine, PrivateNginx, PrivatePostgres, PrivateRedis
from tokenwire.wire.schema import decode_chat_request

SNIPPET = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "tokenwire.conf"
TICKET_THEN_SOCKET = (("POST", "/v1/ws/tickets"), ("GET", "/v1/ws/chat"))
ITL_S = 0.040
TOKENS = 20
GRANT = 1_000 * 1_000_000


def config(redis_url: str) -> str:
    return (
        paced_sim("paced", ttft_ms=0.0, itl_ms=ITL_S * 1000)
        + priced_model("priced-paced", "paced")
        + f"""
[server]
trusted_proxies = ["127.0.0.1"]
stream_backend = "redis"

[limits]
backend = "redis"
redis_url = "{redis_url}"
redis_prefix = "tw:"
"""
    )


@dataclass
class Topology:
    cluster: Cluster
    gateways: list[GatewayProcess]
    nginx: PrivateNginx
    key: str
    key_id: str

    @property
    def upstreams(self) -> list[str]:
        return [f"127.0.0.1:{g.port}" for g in self.gateways]

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}


@contextlib.contextmanager
def running_topology(
    root: Path, private_postgres: PrivatePostgres, args: tuple[str, ...] = ()
) -> Iterator[Topology]:
    """Two instances (``args``: more ``serve`` options) on a fresh database and Redis, and
    nginx in front of them."""
    with PrivateRedis() as redis_server, private_postgres.fresh_database() as database:
        cluster = Cluster(
            root=root,
            database_url=database.url,
            redis_prefix="tw:",
            secret=secrets.token_urlsafe(32),
        )
        try:
            record, key = asyncio.run(cluster.create_key("nginx", grant_micro=GRANT))
            gateways = asyncio.run(cluster.start(config(redis_server.url), args=args))
            upstreams = [f"127.0.0.1:{g.port}" for g in gateways]
            with PrivateNginx(SNIPPET, upstreams) as nginx:
                yield Topology(cluster, gateways, nginx, key, record.id)
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def topology(
    tmp_path_factory: pytest.TempPathFactory, private_postgres: PrivatePostgres
) -> Iterator[Topology]:
    with running_topology(tmp_path_factory.mktemp("nginx"), private_postgres) as running:
        yield running


def chat(content: str, tokens: int = TOKENS, **extra: Any) -> dict[str, Any]:
    return {
        "model": "priced-paced",
        "max_tokens": tokens,
        "stream": True,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def served(nginx: PrivateNginx, method: str, path_start: str) -> list[AccessLine]:
    """The requests nginx logged with this method and path prefix, in order."""
    return [
        line
        for line in nginx.access_lines()
        if line.method == method and line.path.startswith(path_start)
    ]


async def logged(nginx: PrivateNginx, method: str, path_start: str, count: int) -> list[AccessLine]:
    """:func:`served`, once it holds ``count`` lines: nginx writes a request's line just
    after the response's last byte, so a client may see the end a moment before."""
    lines = served(nginx, method, path_start)
    async with asyncio.timeout(10):
        while len(lines) < count:
            await asyncio.sleep(0.01)  # polling nginx's log file
            lines = served(nginx, method, path_start)
    return lines


def assert_token_by_token(recording: Recording) -> None:
    """The tokens came one by one: most in a read (or message) of their own, and spread over
    at least half the simulator's pacing, not in one lump at the end."""
    content = [(at, pieces) for at, pieces in recording.arrivals if pieces]
    assert sum(pieces for _, pieces in content) == TOKENS, recording.text
    assert len(content) >= TOKENS * 3 // 4, [pieces for _, pieces in content]
    spread = content[-1][0] - content[0][0]
    assert spread >= (TOKENS - 1) * ITL_S / 2, spread


async def sse_through(base_url: str, topology: Topology, body: dict[str, Any]) -> Recording:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base_url + "/v1/chat/completions", json=body, headers=topology.auth()
        ) as response,
    ):
        assert response.status == 200, await response.text()
        return await record_sse(response, Recording())


async def test_sse_tokens_arrive_one_by_one_through_nginx(topology: Topology) -> None:
    """SSE through the shipped nginx config: every token in its own read, spread over the stream like the simulator's pacing, the exact text."""
    body = chat("through nginx, one by one")
    recording = await sse_through(topology.nginx.base_url, topology, body)
    assert recording.done and recording.finish_reason == "length"
    assert recording.text == plan(decode_chat_request(json.dumps(body).encode())).text
    assert_token_by_token(recording)


async def test_x_accel_buffering_keeps_sse_unbuffered_when_proxy_buffering_is_on(
    topology: Topology,
) -> None:
    """With proxy_buffering on and gzip for text/event-stream, nginx honours the gateway's X-Accel-Buffering: no (tokens one by one); told to ignore that header, it delivers them in a lump (so the check can fail)."""
    buffered = "proxy_buffering on;\n        gzip on;\n        gzip_types text/event-stream;"
    honouring = {"proxy_buffering off;": buffered}
    with PrivateNginx(SNIPPET, topology.upstreams, changes=honouring) as nginx:
        honoured = await sse_through(nginx.base_url, topology, chat("buffering on"))
    assert_token_by_token(honoured)
    ignoring = {
        "proxy_buffering off;": buffered + "\n        proxy_ignore_headers X-Accel-Buffering;"
    }
    with PrivateNginx(SNIPPET, topology.upstreams, changes=ignoring) as nginx:
        lumped = await sse_through(nginx.base_url, topology, chat("buffering on, ignored"))
    assert lumped.done and sum(pieces for _, pieces in lumped.arrivals) == TOKENS
    with pytest.raises(AssertionError):
        assert_token_by_token(lumped)


async def test_websocket_through_nginx_streams_token_by_token(topology: Topology) -> None:
    """WebSocket (envelope mode) through nginx's upgrade: one message per token, spread like the pacing, then done."""
    async with connect(topology.nginx.ws_url, additional_headers=topology.auth()) as ws:
        create = {"type": "chat.completion.create", "request_id": "r", "body": chat("ws nginx")}
        await ws.send(json.dumps(create))
        recording = await record_ws(ws, Recording(), "r")
    assert recording.done and recording.finish_reason == "length"
    assert_token_by_token(recording)


async def test_a_ticket_minted_on_one_instance_opens_a_socket_on_the_other(
    topology: Topology,
) -> None:
    """A ticket from POST /v1/ws/tickets (served by one instance) authenticates a WebSocket that nginx sends to the other instance; used again, it is refused (3000)."""
    nginx = topology.nginx
    mints, sockets = (len(served(nginx, *what)) for what in TICKET_THEN_SOCKET)
    async with (
        aiohttp.ClientSession() as session,
        session.post(nginx.base_url + "/v1/ws/tickets", headers=topology.auth()) as response,
    ):
        assert response.status == 201, await response.text()
        subprotocols = (await response.json())["subprotocols"]
    async with connect(nginx.ws_url, subprotocols=subprotocols) as ws:
        assert ws.subprotocol == "tokenwire.v1"
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}
    minted = (await logged(nginx, *TICKET_THEN_SOCKET[0], mints + 1))[-1]
    redeemed = (await logged(nginx, *TICKET_THEN_SOCKET[1], sockets + 1))[-1]
    assert {minted.upstream, redeemed.upstream} == set(topology.upstreams)
    async with connect(nginx.ws_url, subprotocols=subprotocols) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 3000


async def test_limits_and_balances_hold_whichever_instance_serves(topology: Topology) -> None:
    """Through nginx (round-robin): rpm=4 admits 4 requests over both instances and refuses the 5th with 429 + Retry-After; a small balance runs out into 402 and equals its grant minus the ledger's costs."""
    limited, limited_key = await topology.cluster.create_key("rpm", limits=KeyLimits(rpm=4))
    grant = 1_000  # micro-dollars: a few completions of this size
    poor, poor_key = await topology.cluster.create_key("poor", grant_micro=grant)
    statuses: list[int] = []
    posts = len(served(topology.nginx, "POST", "/v1/chat/completions"))
    async with aiohttp.ClientSession() as session:
        for n in range(5):
            body = chat(f"limited {n}", tokens=3, model="sim")
            async with session.post(
                topology.nginx.base_url + "/v1/chat/completions",
                json=body,
                headers=topology.auth(limited_key),
            ) as response:
                await response.read()
                statuses.append(response.status)
                if response.status == 429:
                    assert int(response.headers["retry-after"]) >= 1
        assert statuses == [200, 200, 200, 200, 429], statuses
        lines = await logged(topology.nginx, "POST", "/v1/chat/completions", posts + 5)
        first_four = lines[posts : posts + 4]
        assert {line.upstream for line in first_four} == set(topology.upstreams)

        paid: list[str] = []
        for n in range(20):
            async with session.post(
                topology.nginx.base_url + "/v1/chat/completions",
                json=chat(f"poor {n}", tokens=5) | {"stream": False},
                headers=topology.auth(poor_key),
            ) as response:
                reply = await response.json()
                if response.status == 402:
                    assert reply["error"]["code"] == "insufficient_quota"
                    break
                assert response.status == 200, reply
                paid.append(reply["id"])
    assert len(paid) >= 2, paid  # served by both instances (round-robin), then refused
    engine = make_engine(topology.cluster.database_url)
    try:
        ledger = Ledger(engine)
        rows = await ledger.rows(key_id=poor.id)
        async with asyncio.timeout(20):  # a row is written just after its answer is sent
            while len(rows) < len(paid):
                await asyncio.sleep(0.05)  # polling the instances' batched writes
                rows = await ledger.rows(key_id=poor.id)
        assert sorted(r.completion_id for r in rows) == sorted(paid)
        assert await ledger.balance(poor.id) == grant - sum(r.cost_micro for r in rows) >= 0
        limited_rows = await ledger.rows(key_id=limited.id)
        async with asyncio.timeout(20):
            while len(limited_rows) < 4:
                await asyncio.sleep(0.05)  # polling the instances' batched writes
                limited_rows = await ledger.rows(key_id=limited.id)
        assert len(limited_rows) == 4
    finally:
        await engine.dispose()


async def test_a_stream_started_on_one_instance_resumes_through_nginx_on_the_other(
    topology: Topology,
) -> None:
    """A resumable SSE stream cut after 3 events is resumed through nginx by the other instance while the first still generates it: events 1..n once each, the exact text, one ledger row."""
    nginx = topology.nginx
    posts = len(served(nginx, "POST", "/v1/chat/completions"))
    body = chat("resume me through nginx", tokens=40)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        first = Recording()
        async with session.post(
            nginx.base_url + "/v1/chat/completions",
            json=body,
            headers={**topology.auth(), "X-Tokenwire-Resumable": "true"},
        ) as response:
            assert response.status == 200
            first.stream_id = response.headers["x-stream-id"]
            async for line in response.content:
                if line.startswith(b"id: "):
                    first.last_event = int(line[4:])
                elif line.startswith(b"data: {"):
                    first.add_chunk(json.loads(line[6:]))
                    if first.last_event == 3:
                        break  # the client goes away mid-stream
        rest = Recording()
        async with session.get(
            f"{nginx.base_url}/v1/chat/completions/{first.stream_id}/stream",
            headers={**topology.auth(), "Last-Event-ID": "3"},
        ) as response:
            assert response.status == 200, await response.text()
            await record_sse(response, rest)
    assert rest.done and rest.stream_id == first.stream_id
    assert first.text + rest.text == plan(decode_chat_request(json.dumps(body).encode())).text
    started = (await logged(nginx, "POST", "/v1/chat/completions", posts + 1))[posts]
    (resumed,) = await logged(nginx, "GET", f"/v1/chat/completions/{first.stream_id}/", 1)
    assert started.upstream != resumed.upstream  # the other instance served the resume
    engine = make_engine(topology.cluster.database_url)
    try:
        ledger = Ledger(engine)
        stream_id = str(first.stream_id)
        rows = await ledger.rows(key_id=topology.key_id, limit=1000)
        async with asyncio.timeout(20):  # the owner writes its row in a batch, soon after
            while stream_id not in {r.completion_id for r in rows}:
                await asyncio.sleep(0.05)  # polling another process's batched write
                rows = await ledger.rows(key_id=topology.key_id, limit=1000)
        assert [r.completion_id for r in rows].count(stream_id) == 1
    finally:
        await engine.dispose()


@pytest.fixture
def restartable(tmp_path: Path, private_postgres: PrivatePostgres) -> Iterator[Topology]:
    """A topology of the test's own (one instance will be stopped), 20 s drain timeout."""
    with running_topology(tmp_path, private_postgres, ("--drain-timeout", "20")) as running:
        yield running


async def test_a_rolling_restart_behind_nginx_fails_no_stream(restartable: Topology) -> None:
    """SIGTERM to one instance behind nginx: its running stream completes through nginx; meanwhile GETs all succeed (nginx moves them to the other instance) and a POST gets either 200 or 503 server_shutting_down with Retry-After, after which its retry succeeds; the instance exits."""
    running = restartable
    nginx = running.nginx
    async with aiohttp.ClientSession() as session:
        recording = Recording()
        response = await session.post(
            nginx.base_url + "/v1/chat/completions",
            json=chat("finish me during the drain", tokens=60),
            headers=running.auth(),
        )
        assert response.status == 200
        reading = asyncio.create_task(record_sse(response, recording))
        await asyncio.wait_for(recording.started.wait(), 30)
        (owner,) = [g for g in running.gateways if await live_generations(session, g)]
        owner.process.send_signal(signal.SIGTERM)
        statuses: list[int] = []
        for n in range(10):
            async with session.get(nginx.base_url + "/v1/models", headers=running.auth()) as listed:
                assert listed.status == 200, await listed.text()
            body = chat(f"during the drain {n}", tokens=2, model="sim") | {"stream": False}
            for _attempt in range(3):
                async with session.post(
                    nginx.base_url + "/v1/chat/completions", json=body, headers=running.auth()
                ) as posted:
                    reply = await posted.json()
                    statuses.append(posted.status)
                    if posted.status == 200:
                        break
                    assert posted.status == 503, reply
                    assert reply["error"]["code"] == "server_shutting_down"
                    assert posted.headers["retry-after"] == "1"
            assert statuses[-1] == 200, statuses
        await asyncio.wait_for(reading, 30)
    assert recording.ended_by == "done" and recording.finish_reason == "length"
    assert await asyncio.to_thread(owner.process.wait, 30) == -signal.SIGTERM


async def live_generations(session: aiohttp.ClientSession, gateway: GatewayProcess) -> int:
    """How many generations the instance runs (its /healthz, asked directly)."""
    async with session.get(gateway.base_url + "/healthz") as response:
        return int((await response.json())["live_generations"])
