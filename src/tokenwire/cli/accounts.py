"""Accounting commands: ``keys create|update|topup|rotate|show``, ``usage`` and ``cost``.

They work on the database directly (the one the gateway uses, found from ``--config`` and
``--data-dir`` as ``serve`` finds it), so they need no running server and no admin key. A
running gateway caches key lookups for ``server.key_cache_ttl_s``: a key changed, rotated or
revoked here takes effect there within that time (the commands say how long); the admin API
changes a key at once on the gateway that serves the call.

Every failure is one ``error: …`` line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional, TypeVar

import sqlalchemy as sa
import typer
from rich.console import Console
from rich.table import Column, Table
from sqlalchemy.exc import SQLAlchemyError

from tokenwire.accounting.costcalc import ModelCost, Workload, parse_share, parse_usd, project
from tokenwire.accounting.keys import KeyLimits, KeyRecord, KeyStore, load_server_secret
from tokenwire.accounting.ledger import Ledger
from tokenwire.accounting.plans import PlanBook
from tokenwire.accounting.pricing import usd
from tokenwire.config import Price, Settings, load_settings, usd_to_micro
from tokenwire.errors import GatewayError, NotFound
from tokenwire.storage.engine import make_engine, migrate

T = TypeVar("T")

ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional at runtime
    typer.Option("--config", help="TOML file laid over the defaults.", envvar="TOKENWIRE_CONFIG"),
]
DataDirOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--data-dir", help="Database and secret location.", envvar="TOKENWIRE_DATA_DIR"),
]
LimitOpt = Optional[int]  # noqa: UP045
TextOpt = Optional[str]  # noqa: UP045
MAX_LIMIT_VALUE = 2_147_483_647
MAX_NAME_LENGTH = 200  # the api_keys.name column


def takes_effect(settings: Settings) -> str:
    """When a running gateway with these settings notices a key changed here."""
    ttl = settings.server.key_cache_ttl_s
    if ttl == 0:
        return "at once on a running gateway (server.key_cache_ttl_s = 0)"
    return f"within {ttl:g} s on a running gateway (server.key_cache_ttl_s)"


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 1."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def load(config: Path | None, data_dir: Path | None = None) -> Settings:
    """The settings, or exit 1 naming what is wrong with the configuration."""
    try:
        return load_settings(config, data_dir=data_dir)
    except GatewayError as exc:
        fail(exc.message)


@dataclass(frozen=True, slots=True)
class Stores:
    """What a command needs from the database."""

    keys: KeyStore
    ledger: Ledger
    settings: Settings


def run(settings: Settings, action: Callable[[Stores], Awaitable[T]]) -> T:
    """Run ``action`` against the migrated database; any failure exits 1 with a message."""

    async def main() -> T:
        engine = make_engine(settings.database_url)
        try:
            await migrate(engine)
            keys = KeyStore(engine, load_server_secret(settings.data_dir))
            return await action(Stores(keys, Ledger(engine), settings))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except GatewayError as exc:
        fail(exc.message)
    except (SQLAlchemyError, OSError, ImportError) as exc:  # ImportError: a driver not installed
        first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        fail(f"cannot use the database {_shown_url(settings.database_url)}: {first_line}")


def _shown_url(url: str) -> str:
    """The database URL without its password, or a hint when it is not a URL at all."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return "(database_url / TOKENWIRE_DATABASE_URL is not a SQLAlchemy URL)"


def _limit(value: int | None, option: str) -> int | None:
    if value is not None and not 1 <= value <= MAX_LIMIT_VALUE:
        fail(f"{option} must be from 1 to {MAX_LIMIT_VALUE} (leave it out for no limit)")
    return value


def _usd(value: str, option: str, *, positive: bool) -> int:
    try:
        return parse_usd(value, positive=positive)
    except ValueError as exc:
        fail(f"{option} {value!r}: {exc}")


def _models(settings: Settings, value: str) -> tuple[str, ...]:
    models = tuple(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))
    if not models:
        fail("--models needs at least one model id (use --all-models to allow every model)")
    unknown = [m for m in models if m not in settings.models]
    if unknown:
        fail(f"unknown model(s) {', '.join(unknown)}; the catalog has {', '.join(settings.models)}")
    return models


def _plan(settings: Settings, value: str) -> str:
    """A configured plan's name (for ``--plan``)."""
    if value not in settings.plans:
        fail(f"--plan: no plan {value!r}; the plans are {', '.join(settings.plans)}")
    return value


def _name(value: str) -> str:
    """A key's label as stored: stripped, 1 to 200 characters (as the admin API takes it)."""
    name = value.strip()
    if not name:
        fail("--name must not be blank")
    if len(name) > MAX_NAME_LENGTH:
        fail(f"--name must be at most {MAX_NAME_LENGTH} characters")
    return name


def _expiry(value: str) -> int:
    from tokenwire.api.usage import parse_instant_ms

    try:
        seconds = parse_instant_ms(value) // 1000
    except ValueError as exc:
        fail(f"--expires: {exc}")
    if seconds <= time.time():
        fail(f"--expires {value!r} is not in the future (revoke the key to stop it now)")
    return seconds


def _limits_text(record: KeyRecord) -> str:
    def show(value: int | None) -> str:
        return "unlimited" if value is None else str(value)

    models = "all" if record.allowed_models is None else ",".join(record.allowed_models)
    plan = "the default plan" if record.plan is None else f"plan {record.plan}"
    return (
        f"rpm {show(record.rpm)}, tpm {show(record.tpm)}, "
        f"streams {show(record.max_concurrent_streams)}, models {models}; {plan}"
    )


def key_fields(record: KeyRecord) -> dict[str, Any]:
    """A key's public fields (the same as the admin API's key object)."""
    from tokenwire.api.admin import key_object

    return key_object(record)


def keys_create(
    name: Annotated[str, typer.Option(help="A label for the key.")],
    admin: Annotated[bool, typer.Option(help="Make an admin key.")] = False,
    rpm: Annotated[LimitOpt, typer.Option(help="Requests per minute (default: unlimited).")] = None,
    tpm: Annotated[LimitOpt, typer.Option(help="Tokens per minute (default: unlimited).")] = None,
    max_streams: Annotated[
        LimitOpt, typer.Option("--max-streams", help="Concurrent streams (default: unlimited).")
    ] = None,
    credits: Annotated[
        TextOpt, typer.Option(help="Credit in USD on top of the free grant, e.g. 12.50.")
    ] = None,
    models: Annotated[
        TextOpt, typer.Option(help="Comma-separated models the key may use (default: all).")
    ] = None,
    expires: Annotated[
        TextOpt, typer.Option(help="Expiry as ISO 8601 or Unix seconds (default: never).")
    ] = None,
    plan: Annotated[
        TextOpt,
        typer.Option(help="The plan (price list) it is charged by (default: the default plan)."),
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create a key; the key itself is the last line of output (shown only this once)."""
    settings = load(config, data_dir)
    name = _name(name)
    limits = KeyLimits(
        allowed_models=None if models is None else _models(settings, models),
        rpm=_limit(rpm, "--rpm"),
        tpm=_limit(tpm, "--tpm"),
        max_concurrent_streams=_limit(max_streams, "--max-streams"),
    )
    extra = 0 if credits is None else _usd(credits, "--credits", positive=False)
    expires_at = None if expires is None else _expiry(expires)
    plan_name = None if plan is None else _plan(settings, plan)
    grant = usd_to_micro(settings.accounting.free_grant_usd, what="free_grant_usd")

    async def action(stores: Stores) -> tuple[KeyRecord, str]:
        record, plaintext = await stores.keys.create(
            name,
            is_admin=admin,
            expires_at=expires_at,
            limits=limits,
            grant_micro=grant,
            plan=plan_name,
        )
        if extra:
            await stores.ledger.credit(record.id, extra, kind="topup", note="credits at creation")
            record = await stores.keys.get(record.id) or record
        return record, plaintext

    record, plaintext = run(settings, action)
    typer.echo(f"created {record.id} ({record.name})")
    typer.echo(f"  {'admin key; ' if record.is_admin else ''}{_limits_text(record)}")
    typer.echo(f"  balance {usd(record.balance_micro)} USD")
    typer.echo(plaintext)


def keys_update(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_…).")],
    name: Annotated[TextOpt, typer.Option(help="A new label.")] = None,
    rpm: Annotated[LimitOpt, typer.Option(help="Requests per minute.")] = None,
    no_rpm: Annotated[bool, typer.Option("--no-rpm", help="Remove the rpm limit.")] = False,
    tpm: Annotated[LimitOpt, typer.Option(help="Tokens per minute.")] = None,
    no_tpm: Annotated[bool, typer.Option("--no-tpm", help="Remove the tpm limit.")] = False,
    max_streams: Annotated[
        LimitOpt, typer.Option("--max-streams", help="Concurrent streams.")
    ] = None,
    no_max_streams: Annotated[
        bool, typer.Option("--no-max-streams", help="Remove the stream limit.")
    ] = False,
    models: Annotated[TextOpt, typer.Option(help="Comma-separated models the key may use.")] = None,
    all_models: Annotated[
        bool, typer.Option("--all-models", help="Allow every model again.")
    ] = False,
    expires: Annotated[TextOpt, typer.Option(help="Expiry as ISO 8601 or Unix seconds.")] = None,
    no_expires: Annotated[bool, typer.Option("--no-expires", help="Never expire.")] = False,
    plan: Annotated[TextOpt, typer.Option(help="The plan (price list) it is charged by.")] = None,
    default_plan: Annotated[
        bool, typer.Option("--default-plan", help="Follow the default plan again.")
    ] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Change a key's name, limits, models, expiry or plan; options left out stay as they are.

    A running gateway applies it within server.key_cache_ttl_s (5 s by default).
    """
    settings = load(config, data_dir)
    changes: dict[str, object] = {}
    pairs: list[tuple[str, str, object, bool, Callable[[Any], object]]] = [
        ("rpm", "--rpm", rpm, no_rpm, lambda v: _limit(v, "--rpm")),
        ("tpm", "--tpm", tpm, no_tpm, lambda v: _limit(v, "--tpm")),
        (
            "max_concurrent_streams",
            "--max-streams",
            max_streams,
            no_max_streams,
            lambda v: _limit(v, "--max-streams"),
        ),
        ("allowed_models", "--models", models, all_models, lambda v: _models(settings, v)),
        ("expires_at", "--expires", expires, no_expires, _expiry),
        ("plan", "--plan", plan, default_plan, lambda v: _plan(settings, v)),
    ]
    for column, option, value, clear, convert in pairs:
        if value is not None and clear:
            fail(f"{option} and its opposite cannot be given together")
        if value is not None:
            changes[column] = convert(value)
        elif clear:
            changes[column] = None
    if name is not None:
        changes["name"] = _name(name)
    if not changes:
        fail("nothing to change; see 'tokenwire keys update --help'")

    async def action(stores: Stores) -> KeyRecord:
        return await stores.keys.update(key_id, **changes)

    record = run(settings, action)
    typer.echo(f"updated {record.id} ({record.name}): {_limits_text(record)}")
    typer.echo(f"  this takes effect {takes_effect(settings)}")


def keys_topup(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_…).")],
    amount: Annotated[str, typer.Argument(help="USD to add, e.g. 10.00.")],
    note: Annotated[TextOpt, typer.Option(help="Kept with the credit event.")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Add credit to a key."""
    settings = load(config, data_dir)
    micro = _usd(amount, "amount", positive=True)
    if note is not None and len(note) > 500:
        fail("--note must be at most 500 characters")

    async def action(stores: Stores) -> int:
        balance, _ = await stores.ledger.credit(key_id, micro, kind="topup", note=note)
        return balance

    balance = run(settings, action)
    typer.echo(f"added {usd(micro)} USD to {key_id}; balance {usd(balance)} USD")


def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_…).")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Give a key a new secret (same id, limits and balance); the new key is the last line.

    A running gateway refuses the old secret within server.key_cache_ttl_s (5 s by default).
    """
    settings = load(config, data_dir)

    async def action(stores: Stores) -> tuple[KeyRecord, str]:
        return await stores.keys.rotate(key_id)

    record, plaintext = run(settings, action)
    typer.echo(
        f"rotated {record.id} ({record.name}); the old key stops working {takes_effect(settings)}"
    )
    typer.echo(plaintext)


def keys_show(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_…).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Show one key: status, limits, models and balance (never its secret)."""
    settings = load(config, data_dir)

    async def action(stores: Stores) -> KeyRecord:
        record = await stores.keys.get(key_id)
        if record is None:
            raise NotFound(f"No API key with id {key_id!r}.")
        return record

    fields = key_fields(run(settings, action))
    if as_json:
        typer.echo(json.dumps(fields, indent=2))
        return
    table = Table("field", "value", show_header=False)
    for field, value in fields.items():
        if field != "object":
            table.add_row(field, "" if value is None else str(value))
    console().print(table)


def usage(
    key: Annotated[TextOpt, typer.Option("--key", help="Only this key id.")] = None,
    since: Annotated[
        TextOpt, typer.Option(help="From this time on (ISO 8601 or Unix seconds).")
    ] = None,
    until: Annotated[TextOpt, typer.Option(help="Before this time.")] = None,
    by: Annotated[
        str, typer.Option("--by", help="Group by any of key, model, provider, plan, day.")
    ] = "key,model,day",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Requests, tokens, cost, charge and margin from the usage ledger, grouped by key, model,
    provider, plan and/or day (the admin report's figures)."""
    from tokenwire.api.admin import usage_report_data
    from tokenwire.api.usage import parse_group_by, parse_instant_ms

    settings = load(config, data_dir)
    try:
        group_by = parse_group_by(by)
    except GatewayError as exc:
        fail(exc.message)
    bounds: list[int | None] = []
    for option, value in (("--since", since), ("--until", until)):
        try:
            bounds.append(None if value is None else parse_instant_ms(value))
        except ValueError as exc:
            fail(f"{option}: {exc}")
    since_ms, until_ms = bounds
    if since_ms is not None and until_ms is not None and until_ms <= since_ms:
        fail("--until must be later than --since")

    async def action(stores: Stores) -> dict[str, Any]:
        if key is not None and await stores.keys.get(key) is None:
            raise NotFound(f"No API key with id {key!r}.")  # a typo must not read as "no usage"
        return await usage_report_data(
            stores.ledger, group_by, key_id=key, since_ms=since_ms, until_ms=until_ms
        )

    report = run(settings, action)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    headers = ("requests", "prompt", "cached", "completion", "cost USD", "charge USD", "margin USD")
    table = Table(*group_by, *(_right(h) for h in headers))
    total = report["total"]
    rows = [([str(row[g]) for g in group_by], row) for row in report["data"] if group_by]
    rows.append((["total"] + [""] * (len(group_by) - 1) if group_by else [], total))
    for position, (labels, figures) in enumerate(rows):
        if position == len(rows) - 1:
            table.add_section()  # the total, under the groups (ungrouped: alone)
        table.add_row(
            *labels,
            str(figures["requests"]),
            str(figures["prompt_tokens"]),
            str(figures["cache_read_tokens"] + figures["cache_write_tokens"]),
            str(figures["completion_tokens"]),
            figures["cost_usd"],
            figures["charge_usd"],
            figures["margin_usd"],
        )
    console().print(table)


def _right(header: str) -> Column:
    return Column(header, justify="right")


def console() -> Console:
    """A console for tables; piped output is not cut to 80 columns (ids stay whole)."""
    out = Console()
    if not out.is_terminal:
        out = Console(width=max(out.width, 160))
    return out


def money(micro: int) -> str:
    """Micro-dollars for people: ``$250.00``, or all six decimals when cents are not exact."""
    text = usd(abs(micro))
    if text.endswith("0000"):
        text = text[:-4]
    return ("-$" if micro < 0 else "$") + text


def price_text(price: Price) -> str:
    """A price per 1M tokens for people: ``$8.00`` (flat) or ``$2.00 / $8.00`` (in / out)."""
    if price.flat:
        return money(price.input)
    return f"{money(price.input)} / {money(price.output)}"


def price_fields(price: Price) -> dict[str, Any]:
    """A price per 1M tokens as JSON: ``usd_per_mtok`` when flat, else input and output."""
    if price.flat:
        return {"usd_per_mtok": usd(price.input)}
    fields = {"input_usd_per_mtok": usd(price.input), "output_usd_per_mtok": usd(price.output)}
    if price.cache_write != price.input:
        fields["cache_write_usd_per_mtok"] = usd(price.cache_write)
    if price.cache_read != price.input:
        fields["cache_read_usd_per_mtok"] = usd(price.cache_read)
    return fields


def _cost_fields(row: ModelCost) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model": row.model,
        "cost_per_mtok": price_fields(row.cost),
        "price_per_mtok": price_fields(row.price),
    }
    for period in ("daily", "period"):
        for name in ("cost", "price", "margin"):
            micro = getattr(row, f"{period}_{name}_micro")
            fields[f"{period}_{name}_micro"] = micro
            fields[f"{period}_{name}_usd"] = usd(micro)
    return fields


def cost(
    users: Annotated[int, typer.Option(help="Users.")],
    requests_per_user: Annotated[int, typer.Option(help="Requests per user per day.")],
    tokens_per_request: Annotated[int, typer.Option(help="Prompt + completion tokens.")],
    output_share: Annotated[
        str, typer.Option(help="Share of tokens that are output (completion), 0-1.")
    ] = "0.5",
    days: Annotated[int, typer.Option(help="Days in the period, >= 1.")] = 30,
    plan: Annotated[
        TextOpt, typer.Option(help="The plan buyers are on (default: the default plan).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """What a steady workload costs the operator per day and per period on each catalog
    model, what buyers on a plan pay for it, and the operator's margin."""
    settings = load(config)
    try:
        share = parse_share(output_share)
    except ValueError as exc:
        fail(f"--output-share: {exc}")
    for option, value in (
        ("--users", users),
        ("--requests-per-user", requests_per_user),
        ("--tokens-per-request", tokens_per_request),
        ("--days", days),
    ):
        if value < 0:
            fail(f"{option} must not be negative")
    if days < 1:
        fail("--days must be at least 1")
    price_list = PlanBook.from_settings(settings).plan(
        None if plan is None else _plan(settings, plan)
    )
    workload = Workload(users, requests_per_user, tokens_per_request, share, days)
    rows = project(settings.models.values(), price_list, workload)
    if as_json:
        payload = {
            "workload": {
                "users": users,
                "requests_per_user": requests_per_user,
                "tokens_per_request": tokens_per_request,
                "output_share": str(share),
                "days": days,
                "requests_per_day": workload.requests_per_day,
                "input_tokens_per_day": _number(workload.input_tokens_per_day),
                "output_tokens_per_day": _number(workload.output_tokens_per_day),
            },
            "plan": price_list.name,
            "models": [_cost_fields(r) for r in rows],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    table = Table(
        "model",
        *(
            _right(h)
            for h in (
                "cost $/1M",
                "price $/1M",
                "cost/day",
                "price/day",
                "margin/day",
                f"price/{days} days",
                f"margin/{days} days",
            )
        ),
        title=(
            f"{users} users x {requests_per_user} requests/day x {tokens_per_request} tokens, "
            f"{float(share):.4g} of them output; buyers on plan {price_list.name}"
        ),
    )
    for r in rows:
        table.add_row(
            r.model,
            price_text(r.cost),
            price_text(r.price),
            money(r.daily_cost_micro),
            money(r.daily_price_micro),
            money(r.daily_margin_micro),
            money(r.period_price_micro),
            money(r.period_margin_micro),
        )
    console().print(table)


def _number(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def register(app: typer.Typer, keys_app: typer.Typer) -> None:
    """Add these commands to the ``tokenwire`` app and its ``keys`` group."""
    keys_app.command("create")(keys_create)
    keys_app.command("update")(keys_update)
    # "topup ID -3" must reach our check ("must not be negative"), not fail as an unknown option
    keys_app.command("topup", context_settings={"ignore_unknown_options": True})(keys_topup)
    keys_app.command("rotate")(keys_rotate)
    keys_app.command("show")(keys_show)
    app.command("usage")(usage)
    app.command("cost")(cost)
