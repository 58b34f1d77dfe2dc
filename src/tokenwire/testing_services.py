"""Test helpers: private Redis and PostgreSQL servers that tests may break.

Fault tests kill Redis mid-load, cut PostgreSQL connections, make a table unwritable and stop
the database server. They must never do that to the shared servers on 5432/6379, so each
helper here starts a server of its own, on a loopback port, in a temp dir it removes again:

``PrivateRedis``
    ``redis-server`` with no persistence. ``kill`` (SIGKILL) and ``start`` again on the same
    port, so clients reconnect to the same URL and find an empty server; ``pause``/``resume``
    (SIGSTOP/SIGCONT) make it hang instead.
``PrivatePostgres``
    a throwaway cluster (``initdb``; fsync off, 127.0.0.1 only, trust auth). ``stop`` and
    ``start`` keep port and data; ``terminate_connections`` kills every client backend;
    ``unwritable`` makes one table refuse writes while reads still work. Starting a cluster
    takes about a second, so share one per test session and give each test a fresh database
    (``fresh_database``).

**How a table is made unwritable.** A statement-level ``BEFORE INSERT OR UPDATE OR DELETE OR
TRUNCATE`` trigger whose function raises (SQLSTATE ``53100`` *disk_full* by default). The
alternative, revoking privileges, needs the application to connect as a role that is neither
superuser nor table owner, which the gateway (connecting as whoever runs its migrations) is
not. A trigger works for every role, fails writes at once (they do not block), fails them on
connections that were already open and on cached prepared statements, and fires even when a
statement matches no row (an ``UPDATE … WHERE`` of nothing, an ``INSERT … ON CONFLICT DO
NOTHING``), as a full disk would; reads are untouched. Installing it waits for transactions
that are writing the table (``lock_timeout`` bounds that). Undoing it first replaces the
function's body with a no-op, which takes no table lock and lets writes through from the next
statement on, then drops trigger and function if it gets the lock within two seconds (a
no-op trigger is left behind otherwise).

**Root.** PostgreSQL refuses to run as root, so when the effective uid is 0 ``initdb`` and
``postgres`` run as the ``postgres`` OS user (``subprocess.Popen(user=…)``) and the temp dir
is handed to it. Redis runs as the caller.

**Ports.** Picked at random below the kernel's ephemeral range: outgoing connections (which
take ports from that range) cannot occupy a server's port while it is down between ``kill``
and ``start``, and helpers that bind port 0 never collide with it.

**Blocking.** Every method blocks its caller (bounded by a deadline, then ``ServiceError``).
SQL runs on its own event loop in a worker thread, so the methods work from sync code and from
inside a running loop alike; from an async test whose own loop must keep serving meanwhile,
call them through ``asyncio.to_thread``.

**Cleanup.** ``close`` (and the context manager's exit) stops the server and removes its dir;
an ``atexit`` hook does the same for servers a crashed test left running.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import hashlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Self, TypeVar

import asyncpg  # type: ignore[import-untyped]
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tokenwire.testing_cluster import free_port

T = TypeVar("T")

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.02
DISK_FULL = "53100"
"""SQLSTATE raised by writes to an unwritable table unless told otherwise."""

StopMode = Literal["smart", "fast", "immediate"]
_STOP_SIGNALS: Mapping[str, signal.Signals] = MappingProxyType(
    {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
)
POSTGRES_SETTINGS: Mapping[str, str] = MappingProxyType(
    {
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": "''",
        "max_connections": "100",
        "shared_buffers": "16MB",
        "fsync": "off",
        "full_page_writes": "off",
        "wal_level": "minimal",
        "max_wal_senders": "0",
        "autovacuum": "off",
        "logging_collector": "off",
        "log_destination": "'stderr'",
        "timezone": "'UTC'",
    }
)
"""Written to ``postgresql.conf`` (``port`` is added); override with ``settings=``.

``fsync`` and ``full_page_writes`` off lose data only when the *machine* crashes; a stopped or
crashed *server* keeps every commit it acknowledged (``synchronous_commit`` stays on, so an
``immediate`` stop cannot take back a committed ledger row).
"""

_UNWRITABLE_TRIGGER = "tokenwire_fault_unwritable"
_SQLSTATE = re.compile(r"[0-9A-Z]{5}")
_PG_ENV_PREFIX = "PG"


class ServiceError(RuntimeError):
    """A private server would not start, stop or answer in time (its log is in the message)."""


def service_port() -> int:
    """A TCP port free on 127.0.0.1, below the ephemeral range when there is room for one.

    Unlike :func:`tokenwire.testing_cluster.free_port`, the port cannot be handed to an
    outgoing connection by the kernel while its server is down, so a restarted server can
    bind it again.
    """
    low = _ephemeral_low()
    lower = max(10_000, low - 12_000)
    if low - lower < 1_000:
        return free_port()
    for _ in range(200):
        port = lower + secrets.randbelow(low - lower)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _end_process(
    process: subprocess.Popen[bytes],
    sig: signal.Signals,
    timeout_s: float,
    *,
    then: signal.Signals = signal.SIGKILL,
) -> int | None:
    """Send ``sig`` and wait up to ``timeout_s``; if still alive send ``then`` and wait 10 s,
    and SIGKILL last of all. The exit code, or None if the process could not be reaped."""
    steps = [(sig, timeout_s), (then, 10.0), (signal.SIGKILL, 10.0)]
    for step, wait_s in steps:
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(step)
            if step != signal.SIGKILL:
                process.send_signal(signal.SIGCONT)  # a paused process handles nothing else
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait_s)
    return process.returncode


def _blocking(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a fresh event loop in a worker thread and return its result.

    Works from plain code and from inside a running loop (which it blocks meanwhile).
    """
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenwire-svc") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


class _OwnedServer:
    """What both private servers share: a temp dir of their own, removed with the server by
    :meth:`close` (idempotent; also run at interpreter exit), and use as a context manager."""

    _root: Path | None

    def start(self) -> None:
        raise NotImplementedError

    def _halt(self) -> None:
        """Stop the server at once."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the server at once and remove its dir."""
        try:
            self._halt()
        finally:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None
            atexit.unregister(self.close)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PrivateRedis(_OwnedServer):
    """A ``redis-server`` of its own on a loopback port, without persistence, to break.

    Nothing runs until :meth:`start` (or ``with``); the port chosen then is kept for the
    object's life, so :meth:`kill` + :meth:`start` brings an empty server back on the same URL.
    """

    def __init__(
        self,
        *,
        base_dir: Path | None = None,
        executable: str = "redis-server",
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        found = shutil.which(executable)
        if found is None:
            raise ServiceError(f"{executable!r} not found on PATH")
        self._executable = found
        self._base_dir = base_dir
        self._startup_timeout_s = startup_timeout_s
        self._root: Path | None = None
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise ServiceError("the server has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, the same across restarts."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        if self._root is None:
            raise ServiceError("the server has not been started")
        return self._root / "redis.log"

    def log_tail(self) -> str:
        return _tail(self.log_path) if self._root is not None else ""

    def start(self) -> None:
        """Start the server (on the port of the first start, if any) and wait for PING."""
        if self.running:
            raise ServiceError(f"redis on port {self._port} is already running")
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="tokenwire-redis-", dir=self._base_dir))
            atexit.register(self.close)
        if self._port is not None:
            self._launch(self._port)
            return
        error: ServiceError | None = None
        for _ in range(3):  # a freshly picked port can be taken before the server binds it
            port = service_port()
            try:
                self._launch(port)
            except ServiceError as exc:
                error = exc
                continue
            self._port = port
            return
        assert error is not None
        raise error

    def _launch(self, port: int) -> None:
        assert self._root is not None
        command = [
            self._executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._root),
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._root,
                start_new_session=True,
            )
        self._process = process
        try:
            self._wait_ready(process, port)
        except BaseException:
            _end_process(process, signal.SIGKILL, 5)
            raise

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        client = redis.Redis(
            host="127.0.0.1",
            port=port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),  # the default retries with backoff for seconds
        )
        try:
            while True:
                if process.poll() is not None:
                    raise ServiceError(
                        f"redis-server on port {port} exited with {process.returncode}:\n"
                        + self.log_tail()
                    )
                try:
                    info = client.info("server")
                    if int(info["process_id"]) == process.pid:
                        return
                    raise ServiceError(
                        f"port {port} is answered by another redis (pid {info['process_id']})"
                    )
                except (redis.RedisError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"redis-server on port {port} did not answer within "
                        f"{self._startup_timeout_s} s:\n" + self.log_tail()
                    )
                time.sleep(POLL_INTERVAL_S)  # the polling interval
        finally:
            client.close()

    def ensure_running(self) -> None:
        """Start the server unless it runs (resuming it if paused is up to the caller)."""
        if not self.running:
            self.start()

    def kill(self) -> None:
        """SIGKILL the server (a crash: clients see their connections reset) and reap it."""
        process = self._process
        if process is not None and _end_process(process, signal.SIGKILL, 10) is None:
            raise ServiceError(f"redis pid {process.pid} survived SIGKILL")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Shut the server down cleanly (SIGTERM; SIGKILL after ``timeout_s``)."""
        if self._process is not None:
            _end_process(self._process, signal.SIGTERM, timeout_s)

    def restart(self) -> None:
        """:meth:`kill` and :meth:`start` again on the same port: an empty server, same URL."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open, commands hang until :meth:`resume`."""
        if self._process is None or not self.running:
            raise ServiceError("the server is not running")
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self._process is not None and self.running:
            self._process.send_signal(signal.SIGCONT)

    def _halt(self) -> None:
        self.kill()


def postgres_bin_dir() -> Path:
    """Where ``initdb`` and ``postgres`` live: next to ``postgres`` on PATH, else the newest
    ``/usr/lib/postgresql/*/bin`` (Debian and Ubuntu keep them off PATH)."""
    on_path = shutil.which("postgres")
    if on_path is not None:
        return Path(on_path).resolve().parent
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").exists()]

    def version(path: Path) -> tuple[int, ...]:
        digits = re.findall(r"\d+", path.parent.name)
        return tuple(int(d) for d in digits)

    if not candidates:
        raise ServiceError("no PostgreSQL server binaries (postgres, initdb) found")
    return max(candidates, key=version)


class PrivatePostgres(_OwnedServer):
    """A throwaway PostgreSQL cluster of its own on a loopback port, to break.

    Nothing runs until :meth:`start` (or ``with``), which runs ``initdb`` the first time.
    :meth:`stop` + :meth:`start` keeps port and data. Superuser ``postgres``, trust auth.
    """

    def __init__(
        self,
        *,
        base_dir: Path | None = None,
        bin_dir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        os_user: str = "postgres",
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self._bin_dir = bin_dir if bin_dir is not None else postgres_bin_dir()
        self._base_dir = base_dir
        self._settings = {**POSTGRES_SETTINGS, **(settings or {})}
        self._os_user = os_user
        self._startup_timeout_s = startup_timeout_s
        self._root: Path | None = None
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # -- state -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise ServiceError("the cluster has not been started")
        return self._port

    @property
    def data_dir(self) -> Path:
        if self._root is None:
            raise ServiceError("the cluster has not been started")
        return self._root / "data"

    @property
    def log_path(self) -> Path:
        if self._root is None:
            raise ServiceError("the cluster has not been started")
        return self._root / "postgres.log"

    def log_tail(self) -> str:
        return _tail(self.log_path) if self._root is not None else ""

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def dsn(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL: ``postgresql+asyncpg://postgres@127.0.0.1:PORT/DATABASE``."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def libpq_dsn(self, database: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DATABASE``, for ``asyncpg.connect`` and psql."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    # -- process -----------------------------------------------------------------------------

    def _owner(self) -> tuple[int, int] | None:
        """(uid, gid) to run the server binaries as, or None to run them as the caller."""
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(self._os_user)
        except KeyError:
            raise ServiceError(
                f"running as root and there is no {self._os_user!r} user to run PostgreSQL as"
            ) from None
        return entry.pw_uid, entry.pw_gid

    def _popen(self, command: list[str], log: Path) -> subprocess.Popen[bytes]:
        assert self._root is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(_PG_ENV_PREFIX)}
        env["LC_ALL"] = "C"
        owner = self._owner()
        user: dict[str, Any] = {}
        if owner is not None:
            user = {"user": owner[0], "group": owner[1], "extra_groups": []}
        with log.open("ab") as out:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._root,
                env=env,
                start_new_session=True,
                **user,
            )

    def _initdb(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="tokenwire-pg-", dir=self._base_dir))
        atexit.register(self.close)
        owner = self._owner()
        if owner is not None:
            os.chown(self._root, *owner)
        log = self._root / "initdb.log"
        command = [
            str(self._bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]
        process = self._popen(command, log)
        try:
            code = process.wait(timeout=self._startup_timeout_s * 4)
        except subprocess.TimeoutExpired:
            _end_process(process, signal.SIGKILL, 5)
            code = None
        if code != 0:
            message = "did not finish" if code is None else f"exited with {code}"
            text = _tail(log)
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
            raise ServiceError(f"initdb {message}:\n{text}")

    def _configure(self, port: int) -> None:
        lines = [
            f"{name} = {value}" for name, value in {**self._settings, "port": str(port)}.items()
        ]
        conf = self.data_dir / "tokenwire.conf"
        conf.write_text("\n".join(lines) + "\n")
        owner = self._owner()
        if owner is not None:
            os.chown(conf, *owner)
        main = self.data_dir / "postgresql.conf"
        text = main.read_text()
        if "include = 'tokenwire.conf'" not in text:
            main.write_text(text + "\ninclude = 'tokenwire.conf'\n")

    def start(self) -> None:
        """Start the server (``initdb`` first, the first time) and wait until it accepts."""
        if self.running:
            raise ServiceError(f"postgres on port {self._port} is already running")
        if self._root is None:
            self._initdb()
        if self._port is not None:
            self._launch(self._port)
            return
        error: ServiceError | None = None
        for _ in range(3):  # a freshly picked port can be taken before the server binds it
            port = service_port()
            self._configure(port)
            try:
                self._launch(port)
            except ServiceError as exc:
                error = exc
                continue
            self._port = port
            return
        assert error is not None
        raise error

    def _launch(self, port: int) -> None:
        command = [str(self._bin_dir / "postgres"), "-D", str(self.data_dir)]
        process = self._popen(command, self.log_path)
        self._process = process
        try:
            served = _blocking(lambda: self._wait_accepting(process, port))
            if os.path.realpath(served) != os.path.realpath(self.data_dir):
                raise ServiceError(f"port {port} is answered by another cluster ({served})")
        except BaseException:
            _end_process(process, signal.SIGQUIT, 10)
            raise

    async def _wait_accepting(self, process: subprocess.Popen[bytes], port: int) -> str:
        """Poll until the server accepts connections; the data directory it serves."""
        deadline = time.monotonic() + self._startup_timeout_s
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        while True:
            if process.poll() is not None:
                raise ServiceError(
                    f"postgres on port {port} exited with {process.returncode}:\n" + self.log_tail()
                )
            try:
                conn = await asyncpg.connect(dsn, timeout=2.0)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass
            else:
                try:
                    served: str = await conn.fetchval("SELECT current_setting('data_directory')")
                finally:
                    await conn.close()
                return served
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"postgres on port {port} did not accept connections within "
                    f"{self._startup_timeout_s} s:\n" + self.log_tail()
                )
            await asyncio.sleep(POLL_INTERVAL_S)  # the polling interval

    def ensure_running(self) -> None:
        """Start the server unless it runs (a test may have left it stopped)."""
        if not self.running:
            self.start()

    def stop(self, mode: StopMode = "fast", timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Shut the server down: ``smart`` waits for clients, ``fast`` disconnects them and
        checkpoints, ``immediate`` quits at once (a crash: the next start runs recovery).
        After ``timeout_s`` it escalates to ``immediate``, then SIGKILL."""
        if self._process is not None:
            # a postmaster killed outright leaves its backends behind: escalate to immediate
            _end_process(self._process, _STOP_SIGNALS[mode], timeout_s, then=signal.SIGQUIT)

    def restart(self, mode: StopMode = "fast") -> None:
        """:meth:`stop` and :meth:`start`: same port, same data."""
        self.stop(mode)
        self.start()

    def _halt(self) -> None:
        self.stop("immediate", timeout_s=10)

    # -- SQL ---------------------------------------------------------------------------------

    async def _connect(self, database: str, lock_timeout_s: float = 10.0) -> Any:
        return await asyncpg.connect(
            self.libpq_dsn(database),
            timeout=10.0,
            server_settings={
                "lock_timeout": f"{int(lock_timeout_s * 1000)}ms",
                "statement_timeout": "30s",
            },
        )

    def execute(self, database: str, sql: str, *args: object, lock_timeout_s: float = 10.0) -> str:
        """Run SQL as superuser (several statements, one transaction, when there are no
        ``args``); the last status (``INSERT 0 1``). Waits for locks up to ``lock_timeout_s``."""

        async def run() -> str:
            conn = await self._connect(database, lock_timeout_s)
            try:
                status: str = await conn.execute(sql, *args)
                return status
            finally:
                await conn.close()

        return _blocking(run)

    def fetch(self, database: str, sql: str, *args: object) -> list[dict[str, Any]]:
        """Run one query as superuser; its rows as dicts."""

        async def run() -> list[dict[str, Any]]:
            conn = await self._connect(database)
            try:
                return [dict(row) for row in await conn.fetch(sql, *args)]
            finally:
                await conn.close()

        return _blocking(run)

    def create_database(self, name: str | None = None) -> str:
        """Create a database (a random ``tw_<hex>`` name unless given); its name."""
        name = name if name is not None else "tw_" + secrets.token_hex(6)
        self.execute("postgres", f"CREATE DATABASE {_ident(name)}")
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting its clients."""
        self.execute("postgres", f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")

    @contextlib.contextmanager
    def fresh_database(self) -> Iterator[PrivateDatabase]:
        """A new database on a running server, dropped afterwards (the server is started
        again first if the test left it stopped)."""
        self.ensure_running()
        database = PrivateDatabase(self, self.create_database())
        try:
            yield database
        finally:
            self.ensure_running()
            self.drop_database(database.name)

    def terminate_connections(self, database: str | None = None) -> int:
        """``pg_terminate_backend`` every client backend (of ``database``, or of all), waiting
        up to 5 s for each to exit; how many were terminated."""
        sql = """
            SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))
            FROM pg_stat_activity
            WHERE backend_type = 'client backend'
              AND pid <> pg_backend_pid()
              AND ($1::text IS NULL OR datname = $1::text)
        """
        rows = self.fetch("postgres", sql, database)
        return int(rows[0]["count"])

    def block_writes(
        self, database: str, table: str, *, schema: str = "public", sqlstate: str = DISK_FULL
    ) -> None:
        """Make every write statement on ``schema.table`` fail with ``sqlstate`` (see the module
        docstring); reads keep working. Undo with :meth:`allow_writes`."""
        if not _SQLSTATE.fullmatch(sqlstate):
            raise ValueError(f"not a SQLSTATE: {sqlstate!r}")
        function = self._fault_function(schema, table)
        target = f"{_ident(schema)}.{_ident(table)}"
        sql = f"""
            CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $fault$
            BEGIN
                RAISE EXCEPTION USING
                    ERRCODE = '{sqlstate}',
                    MESSAGE = format('tokenwire test fault: %s.%s is unwritable',
                                     TG_TABLE_SCHEMA, TG_TABLE_NAME);
            END
            $fault$;
            CREATE OR REPLACE TRIGGER {_UNWRITABLE_TRIGGER}
                BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {target}
                FOR EACH STATEMENT EXECUTE FUNCTION {function}();
        """
        try:
            self.execute(database, sql)
        except asyncpg.LockNotAvailableError as exc:
            raise ServiceError(
                f"{target} stayed locked for 10 s (an open transaction is writing it)"
            ) from exc

    def allow_writes(self, database: str, table: str, *, schema: str = "public") -> None:
        """Undo :meth:`block_writes`: writes succeed from the next statement on."""
        function = self._fault_function(schema, table)
        target = f"{_ident(schema)}.{_ident(table)}"
        self.execute(
            database,
            f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
                AS $fault$ BEGIN RETURN NULL; END $fault$""",
        )
        with contextlib.suppress(asyncpg.LockNotAvailableError):
            self.execute(
                database,
                f"""DROP TRIGGER IF EXISTS {_UNWRITABLE_TRIGGER} ON {target};
                    DROP FUNCTION IF EXISTS {function}();""",
                lock_timeout_s=2.0,
            )

    @contextlib.contextmanager
    def unwritable(
        self, database: str, table: str, *, schema: str = "public", sqlstate: str = DISK_FULL
    ) -> Iterator[None]:
        """Writes to ``schema.table`` fail inside the block; reads work; undone on exit."""
        self.block_writes(database, table, schema=schema, sqlstate=sqlstate)
        try:
            yield
        finally:
            self.allow_writes(database, table, schema=schema)

    @staticmethod
    def _fault_function(schema: str, table: str) -> str:
        digest = hashlib.sha256(f"{schema}.{table}".encode()).hexdigest()[:16]
        return f"{_ident(schema)}.{_ident('tokenwire_fault_' + digest)}"


@dataclass(frozen=True)
class PrivateDatabase:
    """One database on a :class:`PrivatePostgres`, with the server's controls bound to it."""

    server: PrivatePostgres
    name: str

    @property
    def url(self) -> str:
        """The SQLAlchemy URL (``postgresql+asyncpg://…``), e.g. for ``TOKENWIRE_DATABASE_URL``."""
        return self.server.dsn(self.name)

    @property
    def libpq_dsn(self) -> str:
        """``postgresql://…``, for ``asyncpg.connect``."""
        return self.server.libpq_dsn(self.name)

    def execute(self, sql: str, *args: object) -> str:
        return self.server.execute(self.name, sql, *args)

    def fetch(self, sql: str, *args: object) -> list[dict[str, Any]]:
        return self.server.fetch(self.name, sql, *args)

    def terminate_connections(self) -> int:
        return self.server.terminate_connections(self.name)

    def unwritable(
        self, table: str, *, schema: str = "public", sqlstate: str = DISK_FULL
    ) -> contextlib.AbstractContextManager[None]:
        return self.server.unwritable(self.name, table, schema=schema, sqlstate=sqlstate)
