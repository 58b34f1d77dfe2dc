"""Shared fixtures: real servers on loopback (the gateway, sim-upstream, both chained), and
private Redis and PostgreSQL servers that fault tests may break (never the shared ones)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tokenwire.testing import FAST_SIM, GatewayServer, SimUpstreamServer
from tokenwire.testing_cluster import Cluster
from tokenwire.testing_services import PrivateDatabase, PrivatePostgres, PrivateRedis, delete_keys

POSTGRES_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"


def proxy_overrides(upstream_url: str, extra: str = "") -> str:
    """Config that adds model ``proxied-sim``, served by an OpenAI-compatible upstream."""
    return (
        FAST_SIM
        + f"""
[providers.upstream]
kind = "openai"
base_url = "{upstream_url}/v1"
first_token_timeout_s = 10.0
idle_timeout_s = 10.0

[[models]]
id = "proxied-sim"
provider = "upstream"
upstream_model = "sim"
input_usd_per_mtok = "1.00"
output_usd_per_mtok = "2.00"
"""
        + extra
    )


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """One gateway for the session: instant ``sim``, SQLite in a temp dir."""
    with GatewayServer(tmp_path_factory.mktemp("gw")) as server:
        yield server


@pytest.fixture(scope="session")
def sim_upstream() -> Iterator[SimUpstreamServer]:
    """``tokenwire sim-upstream`` with 0 ms TTFT and 1 ms between tokens."""
    with SimUpstreamServer(ttft_ms=0, itl_ms=1) as server:
        yield server


@pytest.fixture(scope="session")
def proxy_gateway(
    tmp_path_factory: pytest.TempPathFactory, sim_upstream: SimUpstreamServer
) -> Iterator[GatewayServer]:
    """A gateway whose model ``proxied-sim`` is served by ``sim_upstream`` over real HTTP."""
    data_dir: Path = tmp_path_factory.mktemp("proxy")
    with GatewayServer(data_dir, overrides=proxy_overrides(sim_upstream.base_url)) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: SQLite in a temp dir, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'tokenwire.db'}"
        return
    name = "tw_test_" + secrets.token_hex(6)
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A fresh PostgreSQL database, a Redis prefix of its own; processes stopped and keys removed at the end."""
    name = "tw_mp_" + secrets.token_hex(6)
    prefix = f"tokenwire-test-{secrets.token_hex(6)}:"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    state = Cluster(
        root=tmp_path,
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}",
        redis_prefix=prefix,
        secret=secrets.token_urlsafe(32),
    )
    try:
        yield state
    finally:
        state.stop()
        delete_keys(REDIS_URL, prefix)
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A fresh Redis server of this test's own (no persistence) to kill, pause and restart."""
    with PrivateRedis() as server:
        yield server


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """One throwaway PostgreSQL cluster for the session, to stop, break and restart."""
    with PrivatePostgres() as server:
        yield server


@pytest.fixture
def private_postgres_database(private_postgres: PrivatePostgres) -> Iterator[PrivateDatabase]:
    """A fresh database on ``private_postgres`` (running at the start; dropped at the end, the server started again first if the test left it stopped)."""
    with private_postgres.fresh_database() as database:
        yield database


@pytest.fixture
def private_postgres_url(private_postgres_database: PrivateDatabase) -> str:
    """The SQLAlchemy URL (``postgresql+asyncpg://…``) of ``private_postgres_database``."""
    return private_postgres_database.url
