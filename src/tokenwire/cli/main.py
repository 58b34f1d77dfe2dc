"""The ``tokenwire`` command: serve, keys, usage, cost, sim-upstream, bench, chat."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from tokenwire.accounting.keys import KeyRecord, KeyStore
from tokenwire.bench.command import bench
from tokenwire.cli import accounts
from tokenwire.cli.chat import chat
from tokenwire.config import (
    LOG_FORMATS,
    ConfigError,
    Settings,
    check_server,
    parse_workers,
    usd_to_micro,
)
from tokenwire.serving import freeze_startup_heap, run_server

app = typer.Typer(
    help="tokenwire: an OpenAI-compatible LLM gateway built for streaming.", no_args_is_help=True
)
keys_app = typer.Typer(
    help="Create, change, top up, rotate, list and revoke API keys.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
accounts.register(app, keys_app)  # keys create/update/topup/rotate/show, usage, cost
app.command("bench")(bench)  # tokenwire bench: see tokenwire.bench and docs/benchmarks.md
app.command("chat")(chat)  # tokenwire chat: the SDK from a terminal (tokenwire.cli.chat)

ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional at runtime
    typer.Option("--config", help="TOML file laid over the defaults.", envvar="TOKENWIRE_CONFIG"),
]
DataDirOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--data-dir", help="Database and secret location.", envvar="TOKENWIRE_DATA_DIR"),
]


def _settings(config: Path | None, data_dir: Path | None) -> Settings:
    """The settings, or one ``error: …`` line and exit 1 (never a usage box or a traceback)."""
    return accounts.load(config, data_dir)


async def _bootstrap(store: KeyStore, grant_micro: int) -> list[tuple[KeyRecord, str]]:
    if await store.count() > 0:
        return []
    admin = await store.create("admin", is_admin=True)
    return [admin, await store.create("default", grant_micro=grant_micro)]


LogFormatOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--log-format",
        help="json, text, or auto: text on a terminal, else JSON (server.log_format).",
        show_default=False,
    ),
]


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on.")] = None,  # noqa: UP045
    port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, max=65535, help="Port to listen on (1-65535).", show_default=False),
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    access_log: Annotated[bool, typer.Option(help="Log one line per request.")] = True,
    log_format: LogFormatOpt = None,
    metrics_host: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Interface of the metrics listener.", show_default=False),
    ] = None,
    metrics_port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            min=1,
            max=65535,
            help="Serve GET /metrics without a key on this port (else: admin key, main port).",
            show_default=False,
        ),
    ] = None,
    drain_timeout: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            min=0,
            help="On SIGTERM, let running streams finish this many seconds (default 30; "
            "server.drain_timeout_s, TOKENWIRE_DRAIN_TIMEOUT).",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Processes serving the port: N, or auto (one per CPU). More than 1 needs "
            "Redis for limits and streams. [default: server.workers or TOKENWIRE_WORKERS, 1]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the gateway. On a first start it creates the database and prints two keys once.

    The keys go to stdout, once; logs go to stderr (JSON unless stderr is a terminal).

    SIGTERM drains it (docs/operations.md): no new requests, running streams finish for up to
    the drain timeout, then it exits. SIGHUP does the same for a restart (WebSockets close
    with 1012, exit status 0).
    """
    from tokenwire import workers as multiprocess
    from tokenwire.observability.logs import configure_logging, resolve_format

    settings = _serve_settings(
        _settings(config, data_dir),
        host,
        port,
        log_format,
        metrics_host,
        metrics_port,
        drain_timeout,
    )
    server = settings.server
    try:
        count = multiprocess.resolve_workers(
            server.workers if workers is None else parse_workers(workers, "--workers")
        )
        multiprocess.check_shared_state(settings, count)
    except ConfigError as exc:
        accounts.fail(exc.message)
    configure_logging(resolve_format(server.log_format, sys.stderr))
    # Bound first: a port in use stops here, before a database or keys are made. Several
    # workers get a socket each on the same port (SO_REUSEPORT, tokenwire.workers).
    api = _bind_api(server.host, server.port, count)
    metrics = (
        None
        if server.metrics_port is None
        else _bind(server.metrics_host, server.metrics_port, "metrics")
    )
    grant = usd_to_micro(settings.accounting.free_grant_usd, what="accounting.free_grant_usd")
    created = accounts.run(settings, lambda stores: _bootstrap(stores.keys, grant))
    console = Console()  # stdout: what the operator is shown once, never the log stream
    if created:
        console.print("[bold]First start: these keys are shown once and never again.[/bold]")
        for record, plaintext in created:
            role = "admin key" if record.is_admin else "API key  "
            console.print(f"  {role}  {record.id}  {plaintext}", highlight=False, soft_wrap=True)
    console.print(f"data dir: {settings.data_dir}", highlight=False)
    console.print(f"web pages: {_url(server.host, server.port)}/ (paste a key)", highlight=False)
    sockets = [*api, *([] if metrics is None else [metrics])]
    for sock in sockets:  # connections queue from here, so the line below is true when logged
        sock.listen(BACKLOG)

    def started() -> None:
        log = logging.getLogger("tokenwire.serve")
        workers_note = "" if count == 1 else f" with {count} workers"
        log.info(
            "listening on %s%s (Press CTRL+C to quit)",
            _url(server.host, server.port),
            workers_note,
        )
        if server.metrics_port is not None:
            url = _url(server.metrics_host, server.metrics_port)
            log.info("metrics on %s/metrics (no key)", url)

    if count > 1:  # a supervisor and `count` worker processes (tokenwire.workers)
        supervisor = multiprocess.Supervisor(settings, api, metrics, access_log, on_ready=started)
        raise typer.Exit(supervisor.run())
    if not run_server(settings, sockets, access_log=access_log, on_started=started):
        raise typer.Exit(3)  # uvicorn logged why


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _serve_settings(
    settings: Settings,
    host: str | None,
    port: int | None,
    log_format: str | None,
    metrics_host: str | None,
    metrics_port: int | None,
    drain_timeout: float | None = None,
) -> Settings:
    """The settings with ``serve``'s options laid over them (checked like the file)."""
    changes: dict[str, object] = {
        name: value
        for name, value in (
            ("host", host),
            ("port", port),
            ("metrics_host", metrics_host),
            ("metrics_port", metrics_port),
            ("drain_timeout_s", drain_timeout),
        )
        if value is not None
    }
    if log_format is not None:
        if log_format not in LOG_FORMATS:
            accounts.fail(f"--log-format: {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
        changes["log_format"] = log_format
    server = msgspec.structs.replace(settings.server, **changes)
    try:
        check_server(server)
    except ConfigError as exc:
        accounts.fail(exc.message)
    return msgspec.structs.replace(settings, server=server)


BACKLOG = 4096


def _bind(host: str, port: int, what: str) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not listening yet), or one ``error:`` line and
    exit 1."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        accounts.fail(f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}")
    sock.set_inheritable(True)  # as uvicorn's own: worker processes may share it
    return sock


def _bind_api(host: str, port: int, count: int) -> list[socket.socket]:
    """The API's socket, or one per worker on the same port; one ``error:`` line and exit 1
    when the port cannot be had."""
    if count == 1:
        return [_bind(host, port, "the API")]
    from tokenwire.workers import bind_sockets

    try:
        return bind_sockets(host, port, count)
    except OSError as exc:
        accounts.fail(f"cannot listen on {host}:{port} for the API: {exc.strerror or exc}")


def _run(server: Any, sockets: list[socket.socket]) -> None:
    """Serve on ``sockets`` until stopped; exit 3 (uvicorn's code) if start-up failed."""
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: Ctrl-C is a normal stop
        server.run(sockets=sockets)
    if not server.started:
        raise typer.Exit(3)  # uvicorn logged why


@app.command("sim-upstream")
def sim_upstream(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port to listen on (1-65535).")
    ] = 9100,
    ttft_ms: Annotated[float, typer.Option(min=0, help="Delay before the first token.")] = 50.0,
    itl_ms: Annotated[float, typer.Option(min=0, help="Delay between tokens.")] = 20.0,
) -> None:
    """Serve the deterministic simulator as an OpenAI-compatible upstream (any key accepted)."""
    import uvicorn

    from tokenwire.simupstream.app import create_sim_app

    sim = create_sim_app(ttft_ms=ttft_ms, itl_ms=itl_ms)
    freeze_startup_heap()
    server = uvicorn.Server(
        uvicorn.Config(
            sim,
            host=host,
            port=port,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_level="warning",
            backlog=4096,
            timeout_keep_alive=75,
        )
    )
    sock = server.config.bind_socket()  # a port in use: uvicorn's one-line error, exit 1
    sock.listen(server.config.backlog)  # connections queue from here on, so the line is true
    url = _url(host, sock.getsockname()[1])
    typer.echo(f"sim-upstream listening on {url} (ttft {ttft_ms:g} ms, itl {itl_ms:g} ms)")
    _run(server, [sock])


@keys_app.command("list")
def keys_list(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """List keys (prefixes only; secrets are never stored) and their plans (in parentheses:
    the default plan, which the key follows)."""
    settings = _settings(config, data_dir)

    async def action(stores: accounts.Stores) -> list[KeyRecord]:
        return await stores.keys.list()

    records = accounts.run(settings, action)
    table = Table("id", "name", "prefix", "admin", "status", "plan")
    for r in records:
        table.add_row(
            r.id,
            r.name,
            r.prefix + "…",
            "yes" if r.is_admin else "",
            "revoked" if r.revoked_at else "active",
            r.plan or f"({settings.accounting.default_plan})",
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Revoke a key by id; requests with it get 401.

    A running gateway refuses it within server.key_cache_ttl_s (5 s by default).

    The admin API (POST /v1/admin/keys/ID/revoke) revokes at once on the gateway serving it.
    """
    settings = _settings(config, data_dir)

    async def action(stores: accounts.Stores) -> KeyRecord:
        return await stores.keys.revoke(key_id)

    record = accounts.run(settings, action)
    typer.echo(
        f"revoked {record.id} ({record.name}); it stops working {accounts.takes_effect(settings)}"
    )
