"""Test helpers: private Redis and PostgreSQL servers that tests may break.

Fault tests kill Redis mid-load, cut PostgreSQL connections, make a table unwritable and stop
the database server. They must never do that to the shared servers on 5432/6379, so each
helper here starts a server of its own, on a loopback port, in a temp dir it removes again:

``PrivateRedis``
    ``redis-server`` with no persistence. ``kill`` (SIGKILL) and ``start`` again on the same
    port, so clients reconnect to the same URL and find an empty server; ``pause``/``resume``
    (SIGSTOP/SIGCONT) make it hang instead.
``PrivateNginx``
    nginx in front of gateway instances, configured from the shipped snippet
    (``deploy/nginx/tokenwire.conf``), with its access log telling which instance served
    each request.
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

from tokenwire.testing_services.common import (
    POLL_INTERVAL_S,
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    ServiceError,
    service_port,
)
from tokenwire.testing_services.nginx_server import AccessLine, PrivateNginx, render_snippet
from tokenwire.testing_services.postgres_server import (
    DISK_FULL,
    POSTGRES_SETTINGS,
    PrivateDatabase,
    PrivatePostgres,
    StopMode,
    postgres_bin_dir,
)
from tokenwire.testing_services.redis_server import PrivateRedis, delete_keys

__all__ = [
    "DISK_FULL",
    "POLL_INTERVAL_S",
    "POSTGRES_SETTINGS",
    "STARTUP_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "AccessLine",
    "PrivateDatabase",
    "PrivateNginx",
    "PrivatePostgres",
    "PrivateRedis",
    "ServiceError",
    "StopMode",
    "delete_keys",
    "postgres_bin_dir",
    "render_snippet",
    "service_port",
]
