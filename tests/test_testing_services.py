"""The private Redis and PostgreSQL servers that fault tests break (tokenwire.testing_services)."""

from __future__ import annotations

import os
import pwd
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
import sqlalchemy as sa
from redis.backoff import NoBackoff
from redis.retry import Retry

from tokenwire.storage.engine import make_engine, migrate
from tokenwire.testing_services import (
    PrivateDatabase,
    PrivatePostgres,
    PrivateRedis,
    ServiceError,
    service_port,
)

SHARED_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_client(url: str, timeout: float = 2.0) -> redis.Redis:
    """A client that fails at once instead of retrying, so a dead server shows."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


@pytest.fixture
def rclient(private_redis: PrivateRedis) -> Iterator[redis.Redis]:
    client = redis_client(private_redis.url)
    try:
        yield client
    finally:
        client.close()


def test_redis_kill_breaks_clients_and_start_brings_an_empty_server_back_on_the_same_url(
    private_redis: PrivateRedis, rclient: redis.Redis
) -> None:
    """kill() makes commands fail; start() serves the same URL again, empty (no persistence)."""
    rclient.set("k", "v")
    url, old_pid = private_redis.url, private_redis.pid
    private_redis.kill()
    assert not private_redis.running and private_redis.pid is None
    with pytest.raises(redis.ConnectionError):
        rclient.ping()
    private_redis.start()
    assert private_redis.url == url and private_redis.pid not in (None, old_pid)
    assert rclient.ping() is True  # the same client reconnects by itself
    assert rclient.get("k") is None


def test_redis_restart_is_a_new_process_on_the_same_port(
    private_redis: PrivateRedis, rclient: redis.Redis
) -> None:
    """restart() = kill + start: a new pid, the same port, the old data gone."""
    port, pid = private_redis.port, private_redis.pid
    rclient.set("k", "v")
    private_redis.restart()
    assert private_redis.port == port and private_redis.pid != pid
    assert rclient.get("k") is None


def test_redis_pause_makes_commands_hang_until_resume(private_redis: PrivateRedis) -> None:
    """pause() (SIGSTOP) makes commands time out instead of failing fast; resume() undoes it."""
    client = redis_client(private_redis.url, timeout=0.2)
    try:
        client.ping()
        private_redis.pause()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        private_redis.resume()
        assert client.ping() is True
    finally:
        client.close()


def test_redis_start_fails_clearly_when_its_port_was_taken(private_redis: PrivateRedis) -> None:
    """A restart on a port someone else took raises ServiceError with the log, without hanging."""
    private_redis.kill()
    squatter = socket.socket()
    try:
        squatter.bind(("127.0.0.1", private_redis.port))
        squatter.listen()
        started = time.monotonic()
        with pytest.raises(ServiceError, match="exited"):
            private_redis.start()
        assert time.monotonic() - started < 10
    finally:
        squatter.close()
    private_redis.start()
    assert private_redis.running


def test_redis_close_kills_the_server_and_removes_its_dir() -> None:
    """close() (the context manager's exit) leaves no process and no temp dir behind."""
    with PrivateRedis() as server:
        pid, root = server.pid, server.log_path.parent
        assert pid is not None and root.is_dir()
    assert not root.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_service_ports_are_outside_the_ephemeral_range() -> None:
    """service_port() avoids the kernel's ephemeral range, so outgoing connections cannot take it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {service_port() for _ in range(20)}
    assert all(port < low for port in ports)
    assert not ports & {5432, 6379}


async def test_postgres_unwritable_fails_writes_keeps_reads_and_is_undone(
    private_postgres_database: PrivateDatabase,
) -> None:
    """Inside unwritable() every write fails at once (even matching no row) on an already open
    connection, SELECT works; afterwards writes work and no trigger or function is left."""
    db = private_postgres_database
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn = await asyncpg.connect(db.libpq_dsn)
    try:
        await conn.execute("INSERT INTO t VALUES ($1, 'a')", 1)
        with db.unwritable("t"):
            for sql in (
                "INSERT INTO t VALUES (2, 'b')",
                "INSERT INTO t VALUES (1, 'a') ON CONFLICT DO NOTHING",
                "UPDATE t SET v = 'x' WHERE id = 99",
                "DELETE FROM t",
                "TRUNCATE t",
            ):
                with pytest.raises(asyncpg.DiskFullError, match=r"public\.t is unwritable"):
                    await conn.execute(sql)
            assert await conn.fetchval("SELECT v FROM t WHERE id = 1") == "a"
        await conn.execute("INSERT INTO t VALUES ($1, 'b')", 2)
        assert await conn.fetchval("SELECT count(*) FROM t") == 2
        leftovers = await conn.fetchval(
            "SELECT (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal)"
            " + (SELECT count(*) FROM pg_proc WHERE proname LIKE 'tokenwire_fault%')"
        )
        assert leftovers == 0
    finally:
        await conn.close()


async def test_postgres_unwritable_gateway_table_fails_sqlalchemy_writes(
    private_postgres_database: PrivateDatabase,
) -> None:
    """On the migrated gateway schema, a pooled SQLAlchemy engine gets DBAPIError with the chosen SQLSTATE for writes only."""
    engine = make_engine(private_postgres_database.url)
    try:
        await migrate(engine)
        insert = sa.text(
            "INSERT INTO credit_events (key_id, kind, amount_micro, created_at) VALUES ('k', 'grant', 1, 0)"
        )
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))  # the pooled connection predates the fault
        with private_postgres_database.unwritable("credit_events", sqlstate="25006"):
            async with engine.begin() as conn:
                with pytest.raises(sa.exc.DBAPIError) as caught:
                    await conn.execute(insert)
            assert getattr(caught.value.orig, "sqlstate", None) == "25006"
            async with engine.connect() as conn:
                assert (
                    await conn.execute(sa.text("SELECT count(*) FROM credit_events"))
                ).scalar() == 0
        async with engine.begin() as conn:
            await conn.execute(insert)
    finally:
        await engine.dispose()


async def test_postgres_terminate_connections_breaks_open_connections_of_that_database(
    private_postgres_database: PrivateDatabase,
) -> None:
    """terminate_connections(db) kills every open connection to db (and only those); new ones work."""
    db = private_postgres_database
    victims = [await asyncpg.connect(db.libpq_dsn) for _ in range(2)]
    bystander = await asyncpg.connect(db.server.libpq_dsn("postgres"))
    try:
        assert db.terminate_connections() == 2
        for conn in victims:
            # which error depends on whether asyncpg read the server's FATAL message first
            with pytest.raises(
                (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
            ):
                await conn.fetchval("SELECT 1")
            assert conn.is_closed()
        assert await bystander.fetchval("SELECT 1") == 1
        fresh = await asyncpg.connect(db.libpq_dsn)
        assert await fresh.fetchval("SELECT 1") == 1
        await fresh.close()
    finally:
        for conn in [*victims, bystander]:
            conn.terminate()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_stop_refuses_connections_and_start_brings_port_and_data_back(
    private_postgres_database: PrivateDatabase, mode: str
) -> None:
    """stop(mode) refuses connections; start() serves the same port with every committed row."""
    db, server = private_postgres_database, private_postgres_database.server
    db.execute("CREATE TABLE t (id int)")
    db.execute("INSERT INTO t VALUES (1)")
    port = server.port
    server.stop(mode)  # type: ignore[arg-type]
    assert not server.running
    with pytest.raises(OSError):
        await asyncpg.connect(db.libpq_dsn, timeout=2)
    server.start()
    assert server.port == port
    assert db.fetch("SELECT id FROM t") == [{"id": 1}]


def test_fresh_database_starts_a_server_a_test_left_stopped(
    private_postgres: PrivatePostgres,
) -> None:
    """fresh_database() (behind the fixtures) starts the shared session cluster again if it was stopped."""
    private_postgres.ensure_running()
    private_postgres.stop("immediate")
    with private_postgres.fresh_database() as db:
        assert private_postgres.running
        assert db.fetch("SELECT current_database() AS name") == [{"name": db.name}]
    assert private_postgres.fetch(
        "postgres", "SELECT count(*) AS n FROM pg_database WHERE datname = $1", db.name
    ) == [{"n": 0}]


def test_postgres_runs_as_the_postgres_user_and_close_removes_everything() -> None:
    """As root the cluster belongs to the postgres OS user; close() stops it and removes its dir."""
    with PrivatePostgres() as server:
        pid, root = server.pid, server.data_dir.parent
        assert pid is not None
        if os.geteuid() == 0:
            assert server.data_dir.stat().st_uid == pwd.getpwnam("postgres").pw_uid
            status = Path(f"/proc/{pid}/status").read_text()
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert int(uid_line.split()[1]) == pwd.getpwnam("postgres").pw_uid
    assert not root.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def _shared_identity() -> tuple[object, ...]:
    conn = await asyncpg.connect(SHARED_POSTGRES_DSN)
    try:
        postgres = (
            await conn.fetchval("SELECT pg_postmaster_start_time()"),
            await conn.fetchval("SELECT current_setting('data_directory')"),
        )
    finally:
        await conn.close()
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    try:
        info = client.info("server")
    finally:
        client.close()
    return (*postgres, info["run_id"], info["process_id"])


async def test_the_shared_servers_survive_every_fault(
    private_redis: PrivateRedis, private_postgres_database: PrivateDatabase
) -> None:
    """Killing, pausing, stopping and cutting the private servers leaves 5432 and 6379 as they were."""
    before = await _shared_identity()
    server = private_postgres_database.server
    assert {private_redis.port, server.port}.isdisjoint({5432, 6379})
    assert server.fetch("postgres", "SELECT current_setting('data_directory') AS d") == [
        {"d": str(server.data_dir)}
    ]
    private_redis.pause()
    private_redis.resume()
    private_redis.restart()
    server.terminate_connections()
    server.restart("immediate")
    private_postgres_database.execute("CREATE TABLE t (id int)")
    with private_postgres_database.unwritable("t"):
        pass
    assert await _shared_identity() == before
