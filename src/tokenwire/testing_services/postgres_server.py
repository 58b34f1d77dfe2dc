"""``PrivatePostgres``: a throwaway PostgreSQL cluster of a test's own, to stop and break."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import asyncpg  # type: ignore[import-untyped]

from tokenwire.testing_services.common import (
    POLL_INTERVAL_S,
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    OwnedServer,
    ServiceError,
    blocking,
    end_process,
    tail,
)

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


def _ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


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


class PrivatePostgres(OwnedServer):
    """A throwaway PostgreSQL cluster of its own on a loopback port, to break.

    Nothing runs until :meth:`start` (or ``with``), which runs ``initdb`` the first time.
    :meth:`stop` + :meth:`start` keeps port and data. Superuser ``postgres``, trust auth.
    """

    _kind = "cluster"
    _log_name = "postgres.log"

    def __init__(
        self,
        *,
        base_dir: Path | None = None,
        bin_dir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        os_user: str = "postgres",
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        super().__init__(base_dir, startup_timeout_s)
        self._bin_dir = bin_dir if bin_dir is not None else postgres_bin_dir()
        self._settings = {**POSTGRES_SETTINGS, **(settings or {})}
        self._os_user = os_user

    # -- state -------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._dir() / "data"

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
        self._make_dir("tokenwire-pg-")
        root = self._dir()
        owner = self._owner()
        if owner is not None:
            os.chown(root, *owner)
        log = root / "initdb.log"
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
            end_process(process, signal.SIGKILL, 5)
            code = None
        if code != 0:
            message = "did not finish" if code is None else f"exited with {code}"
            text = tail(log)
            self.close()
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
        self._launch_on_its_port()

    def _launch(self, port: int) -> None:
        self._configure(port)
        command = [str(self._bin_dir / "postgres"), "-D", str(self.data_dir)]
        process = self._popen(command, self.log_path)
        self._process = process
        try:
            served = blocking(lambda: self._wait_accepting(process, port))
            if os.path.realpath(served) != os.path.realpath(self.data_dir):
                raise ServiceError(f"port {port} is answered by another cluster ({served})")
        except BaseException:
            end_process(process, signal.SIGQUIT, 10)
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
            end_process(self._process, _STOP_SIGNALS[mode], timeout_s, then=signal.SIGQUIT)

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

        return blocking(run)

    def fetch(self, database: str, sql: str, *args: object) -> list[dict[str, Any]]:
        """Run one query as superuser; its rows as dicts."""

        async def run() -> list[dict[str, Any]]:
            conn = await self._connect(database)
            try:
                return [dict(row) for row in await conn.fetch(sql, *args)]
            finally:
                await conn.close()

        return blocking(run)

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
