"""The accounting commands: keys create/update/topup/rotate/show, usage and cost.

The key flows run against SQLite and PostgreSQL (``TOKENWIRE_DATABASE_URL``). Every failure
must be exit code 1 with one ``error:`` line, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from tokenwire.accounting.keys import KeyRecord, KeyStore, load_server_secret
from tokenwire.accounting.ledger import Ledger, LedgerRow
from tokenwire.cli.main import app
from tokenwire.config import load_settings
from tokenwire.storage.engine import make_engine, migrate
from tokenwire.testing import ledger_row

CONFIG = """
[accounting]
free_grant_usd = "0.50"
"""


class Cli:
    """Runs ``tokenwire`` with one data dir, config file and database."""

    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.data_dir = tmp_path / "data"
        self.config = tmp_path / "tokenwire.toml"
        self.config.write_text(CONFIG)
        self.env = {"TOKENWIRE_DATABASE_URL": database_url}
        self.runner = CliRunner()

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(
            app,
            [*args, "--config", str(self.config), "--data-dir", str(self.data_dir)],
            env=self.env,
        )

    def ok(self, *args: str) -> Result:
        result = self(*args)
        assert result.exit_code == 0, result.output
        return result

    def fails(self, *args: str, message: str) -> Result:
        result = self(*args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
        assert result.stderr.startswith("error: "), result.stderr
        assert message in result.stderr, result.stderr
        return result

    def show(self, key_id: str) -> dict[str, Any]:
        shown: dict[str, Any] = json.loads(self.ok("keys", "show", key_id, "--json").stdout)
        return shown

    def run(self, action: Any) -> Any:
        """Run ``action(keys, ledger)`` against the same database."""
        settings = load_settings(data_dir=self.data_dir, env=self.env)

        async def main() -> Any:
            engine = make_engine(settings.database_url)
            try:
                await migrate(engine)
                keys = KeyStore(engine, load_server_secret(settings.data_dir))
                return await action(keys, Ledger(engine))
            finally:
                await engine.dispose()

        return asyncio.run(main())

    def authenticate(self, plaintext: str) -> KeyRecord | None:
        async def action(keys: KeyStore, _ledger: Ledger) -> KeyRecord | None:
            return await keys.authenticate(plaintext)

        result: KeyRecord | None = self.run(action)
        return result


@pytest.fixture
def cli(tmp_path: Path, database_url: str) -> Cli:
    """The CLI on a fresh SQLite or PostgreSQL database, with a $0.50 free grant."""
    return Cli(tmp_path, database_url)


@pytest.fixture
def sqlite_cli(tmp_path: Path) -> Cli:
    """The CLI on a fresh SQLite database."""
    return Cli(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}")


def create(cli: Cli, *args: str) -> tuple[str, str]:
    """``keys create``; returns (id, plaintext key) read from the first and last lines."""
    result = cli.ok("keys", "create", *args)
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("created key_")
    return lines[0].split()[1], lines[-1]


def test_create_with_limits_credits_and_models(cli: Cli) -> None:
    """create takes limits, models and credits (on top of the free grant); the plaintext is the last stdout line."""
    key_id, key = create(
        cli,
        "--name",
        "team",
        "--rpm",
        "60",
        "--tpm",
        "90000",
        "--max-streams",
        "3",
        "--credits",
        "12.50",
        "--models",
        "sim, gpt-4.1",
    )
    assert key.startswith("tw-")
    shown = cli.show(key_id)
    assert (shown["name"], shown["rpm"], shown["tpm"], shown["max_concurrent_streams"]) == (
        "team",
        60,
        90000,
        3,
    )
    assert shown["models"] == ["sim", "gpt-4.1"]
    assert shown["balance_micro"] == 13_000_000 and shown["balance_usd"] == "13.000000"
    assert shown["admin"] is False and shown["status"] == "active"
    assert key not in json.dumps(shown) and "secret_hash" not in shown
    record = cli.authenticate(key)
    assert record is not None and record.id == key_id

    admin_id, _ = create(cli, "--name", "boss", "--admin")
    assert cli.show(admin_id)["admin"] is True
    assert cli.show(admin_id)["balance_micro"] == 500_000
    table = cli.ok("keys", "show", key_id).stdout
    assert "team" in table and "13.000000" in table


def test_create_refuses_bad_options(cli: Cli) -> None:
    """Bad limits, credits, models or expiry: exit 1 with a message, and no key is created."""
    cases = [
        (["--rpm", "0"], "--rpm"),
        (["--tpm", "-5"], "--tpm"),
        (["--max-streams", "3000000000"], "--max-streams"),
        (["--credits", "-1"], "negative"),
        (["--credits", "1.0000001"], "6 decimals"),
        (["--credits", "lots"], "--credits"),
        (["--models", "sim,nope"], "nope"),
        (["--models", " , "], "--models"),
        (["--expires", "2001-01-01"], "not in the future"),
        (["--expires", "whenever"], "--expires"),
    ]
    for args, message in cases:
        cli.fails("keys", "create", "--name", "bad", *args, message=message)
    listed = cli.ok("keys", "list").stdout
    assert "bad" not in listed


def test_update(cli: Cli) -> None:
    """update sets and clears limits, models and expiry; unspecified fields stay; bad input changes nothing."""
    key_id, _ = create(cli, "--name", "u", "--rpm", "5", "--tpm", "500", "--models", "sim")
    cli.ok("keys", "update", key_id, "--no-rpm", "--tpm", "800", "--all-models", "--name", "u2")
    shown = cli.show(key_id)
    assert (shown["name"], shown["rpm"], shown["tpm"], shown["models"]) == ("u2", None, 800, None)
    cli.ok("keys", "update", key_id, "--max-streams", "2", "--expires", "2999-01-01")
    shown = cli.show(key_id)
    assert shown["max_concurrent_streams"] == 2 and shown["expires_at"] == 32472144000
    cli.ok("keys", "update", key_id, "--no-expires", "--no-max-streams", "--models", "gpt-4.1")
    after = cli.show(key_id)
    assert after["expires_at"] is None and after["max_concurrent_streams"] is None
    assert after["models"] == ["gpt-4.1"]

    for args, message in [
        (["--rpm", "5", "--no-rpm"], "cannot be given together"),
        (["--models", "sim", "--all-models"], "cannot be given together"),
        (["--tpm", "0"], "--tpm"),
        (["--models", "nope"], "nope"),
        (["--name", " "], "--name"),
        ([], "nothing to change"),
    ]:
        cli.fails("keys", "update", key_id, *args, message=message)
        assert cli.show(key_id) == after
    cli.fails("keys", "update", "key_missing", "--rpm", "3", message="No API key")


def test_plans_on_create_and_update(cli: Cli) -> None:
    """--plan puts a key on a configured plan, --default-plan moves it back; an unknown plan
    exits 1 and changes nothing; keys list shows each key's plan."""
    key_id, _ = create(cli, "--name", "buyer", "--plan", "at-cost")
    assert cli.show(key_id)["plan"] == "at-cost"
    assert "plan at-cost" in cli.ok("keys", "update", key_id, "--name", "b2").stdout
    cli.ok("keys", "update", key_id, "--default-plan")
    assert cli.show(key_id)["plan"] is None
    cli.ok("keys", "update", key_id, "--plan", "standard")
    assert cli.show(key_id)["plan"] == "standard"
    before = cli.show(key_id)
    cli.fails("keys", "update", key_id, "--plan", "gold", message="--plan: no plan 'gold'")
    cli.fails("keys", "update", key_id, "--plan", "standard", "--default-plan", message="together")
    assert cli.show(key_id) == before
    cli.fails("keys", "create", "--name", "nope", "--plan", "gold", message="no plan 'gold'")
    create(cli, "--name", "follower")
    lines = cli.ok("keys", "list").stdout.splitlines()
    assert not any("nope" in line for line in lines)
    assert "(standard)" in next(line for line in lines if "follower" in line)  # the default's
    mine = next(line for line in lines if " b2 " in line)
    assert "standard" in mine and "(standard)" not in mine  # its own


def test_topup(cli: Cli) -> None:
    """topup adds exactly the amount; zero, negative, malformed amounts and unknown keys change nothing."""
    key_id, _ = create(cli, "--name", "wallet")
    result = cli.ok("keys", "topup", key_id, "10.25", "--note", "invoice 7")
    assert "balance 10.750000 USD" in result.stdout
    assert cli.show(key_id)["balance_micro"] == 10_750_000
    for amount, message in [
        ("0", "greater than 0"),
        ("-3", "negative"),
        ("3.1234567", "6 decimals"),
        ("ten", "amount"),
    ]:
        cli.fails("keys", "topup", key_id, amount, message=message)
    cli.fails("keys", "topup", "key_missing", "5", message="No API key")
    assert cli.show(key_id)["balance_micro"] == 10_750_000


def test_rotate(cli: Cli) -> None:
    """rotate prints a new key last; the old one no longer authenticates, the new one does; same id and balance."""
    key_id, old = create(cli, "--name", "r", "--credits", "2")
    before = cli.show(key_id)
    result = cli.ok("keys", "rotate", key_id)
    new = result.stdout.strip().splitlines()[-1]
    assert new.startswith("tw-") and new != old
    assert cli.authenticate(old) is None
    record = cli.authenticate(new)
    assert record is not None and record.id == key_id
    after = cli.show(key_id)
    assert after["balance_micro"] == before["balance_micro"] and after["prefix"] == new[:10]
    cli.fails("keys", "rotate", "key_missing", message="No active API key")
    cli.ok("keys", "revoke", key_id)
    cli.fails("keys", "rotate", key_id, message="No active API key")
    assert cli.authenticate(new) is None


def test_show_unknown_key(sqlite_cli: Cli) -> None:
    """show of an unknown id exits 1 naming it."""
    sqlite_cli.fails("keys", "show", "key_missing", message="key_missing")


def _row(key_id: str, completion_id: str, model: str, charge: int, at_ms: int) -> LedgerRow:
    """A completed row charging ``charge``, at a cost of a third of it (rounded down)."""
    return ledger_row(
        key_id,
        completion_id,
        model=model,
        cost_micro=charge // 3,
        charge_micro=charge,
        created_at=at_ms,
    )


def test_usage(cli: Cli) -> None:
    """usage groups cost, charge and margin by key, model and day, filters by key and time,
    and prints JSON or a table."""
    one, _ = create(cli, "--name", "one")
    two, _ = create(cli, "--name", "two")
    now_ms = int(time.time() * 1000)

    async def fill(_keys: KeyStore, ledger: Ledger) -> None:
        await ledger.settle(_row(one, "c1", "priced-sim", 96, now_ms))
        await ledger.settle(_row(one, "c2", "priced-sim", 219, now_ms))
        await ledger.settle(_row(two, "c3", "sim", 0, now_ms))
        await ledger.settle(_row(two, "c4", "priced-sim", 30, now_ms - 10 * 86_400_000))

    cli.run(fill)
    by_model = json.loads(cli.ok("usage", "--by", "model", "--json").stdout)
    assert by_model["group_by"] == ["model"]
    assert [(r["model"], r["requests"], r["charge_micro"]) for r in by_model["data"]] == [
        ("priced-sim", 3, 345),
        ("sim", 1, 0),
    ]
    assert by_model["total"] == {
        "requests": 4,
        "prompt_tokens": 40,
        "completion_tokens": 80,
        "cache_write_tokens": 0,
        "cache_read_tokens": 0,
        "cost_micro": 32 + 73 + 10,
        "cost_usd": "0.000115",
        "charge_micro": 345,
        "charge_usd": "0.000345",
        "margin_micro": 230,
        "margin_usd": "0.000230",
    }
    mine = json.loads(cli.ok("usage", "--key", one, "--by", "key", "--json").stdout)
    assert [(r["key_id"], r["charge_micro"], r["cost_micro"]) for r in mine["data"]] == [
        (one, 315, 105)
    ]
    recent = json.loads(
        cli.ok("usage", "--since", str(now_ms // 1000 - 86_400), "--by", "key", "--json").stdout
    )
    assert {r["key_id"]: r["charge_micro"] for r in recent["data"]} == {one: 315, two: 0}
    by_plan = json.loads(cli.ok("usage", "--by", "provider,plan", "--json").stdout)
    assert [(r["provider"], r["plan"], r["margin_micro"]) for r in by_plan["data"]] == [
        ("sim", "standard", 230)
    ]
    future = json.loads(cli.ok("usage", "--since", "2999-01-01", "--json").stdout)
    assert future["data"] == [] and future["total"]["requests"] == 0

    table = cli.ok("usage", "--by", "key,model").stdout
    assert one in table and "priced-sim" in table and "total" in table
    assert (
        "0.000345" in table and "0.000115" in table and "0.000230" in table
    )  # charge, cost, margin

    cli.fails("usage", "--by", "colour", message="group_by")
    cli.fails("usage", "--key", "key_nope", message="No API key with id 'key_nope'")
    cli.fails("usage", "--since", "last week", message="--since")


def test_cost_matches_hand_computation(sqlite_cli: Cli) -> None:
    """tokenwire cost for 1000 users x 50 requests x 1000 tokens, half output, 30 days, with
    the defaults: buyers on the reseller's flat list.

    Per day: 50,000 requests; 25,000,000 input and 25,000,000 output tokens.
    gpt-4.1 costs ($2.00 / $8.00 per 1M) 25 x 2 + 25 x 8 = $250.00 a day; it sells at $8.00
    flat: 50 x 8 = $400.00 a day ($12,000.00 in 30), a margin of $150.00 ($4,500.00).
    deepseek-v3.2 costs ($0.28 / $0.42) $7.00 + $10.50 = $17.50; sells at $0.42: 50 x 0.42 =
    $21.00 a day ($630.00), a margin of $3.50 ($105.00).
    """
    args = ["cost", "--users", "1000", "--requests-per-user", "50", "--tokens-per-request", "1000"]
    result = sqlite_cli.runner.invoke(app, [*args, "--json"], env={})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["workload"] == {
        "users": 1000,
        "requests_per_user": 50,
        "tokens_per_request": 1000,
        "output_share": "1/2",
        "days": 30,
        "requests_per_day": 50_000,
        "input_tokens_per_day": 25_000_000,
        "output_tokens_per_day": 25_000_000,
    }
    assert report["plan"] == "standard"
    models = {m["model"]: m for m in report["models"]}
    assert models["gpt-4.1"] == {
        "model": "gpt-4.1",
        "cost_per_mtok": {
            "input_usd_per_mtok": "2.000000",
            "output_usd_per_mtok": "8.000000",
            "cache_read_usd_per_mtok": "0.500000",
        },
        "price_per_mtok": {"usd_per_mtok": "8.000000"},
        "daily_cost_micro": 250_000_000,
        "daily_cost_usd": "250.000000",
        "daily_price_micro": 400_000_000,
        "daily_price_usd": "400.000000",
        "daily_margin_micro": 150_000_000,
        "daily_margin_usd": "150.000000",
        "period_cost_micro": 7_500_000_000,
        "period_cost_usd": "7500.000000",
        "period_price_micro": 12_000_000_000,
        "period_price_usd": "12000.000000",
        "period_margin_micro": 4_500_000_000,
        "period_margin_usd": "4500.000000",
    }
    deepseek = models["deepseek-v3.2"]
    assert (deepseek["daily_cost_micro"], deepseek["daily_price_micro"]) == (17_500_000, 21_000_000)
    assert (deepseek["daily_margin_usd"], deepseek["period_price_usd"]) == (
        "3.500000",
        "630.000000",
    )
    assert models["sim"]["daily_price_micro"] == models["sim"]["daily_cost_micro"] == 0

    table = sqlite_cli.runner.invoke(app, args, env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "$400.00" in table.stdout and "$250.00" in table.stdout and "$150.00" in table.stdout
    assert "$21.00" in table.stdout and "$17.50" in table.stdout and "$3.50" in table.stdout
    assert "$2.00 / $8.00" in table.stdout and "plan standard" in table.stdout

    at_cost = sqlite_cli.runner.invoke(app, [*args, "--plan", "at-cost", "--json"], env={})
    rows = {m["model"]: m for m in json.loads(at_cost.stdout)["models"]}
    assert rows["gpt-4.1"]["daily_price_micro"] == 250_000_000
    assert rows["gpt-4.1"]["daily_margin_micro"] == 0


def test_cost_options_and_config(sqlite_cli: Cli, tmp_path: Path) -> None:
    """--output-share, --days, --plan and --config change the figures; invalid values exit 1."""
    config = tmp_path / "priced.toml"
    config.write_text(
        '[[models]]\nid = "priced-sim"\nprovider = "sim"\nupstream_model = "sim"\n'
        'input_usd_per_mtok = "1.00"\noutput_usd_per_mtok = "5.00"\n'
        '[plans.retail.models."priced-sim"]\n'
        'input_usd_per_mtok = "3.00"\noutput_usd_per_mtok = "15.00"\n'
    )
    result = sqlite_cli.runner.invoke(
        app,
        [
            "cost",
            "--users",
            "10",
            "--requests-per-user",
            "3",
            "--tokens-per-request",
            "1000",
            "--output-share",
            "0.25",
            "--days",
            "7",
            "--plan",
            "retail",
            "--json",
            "--config",
            str(config),
        ],
        env={},
    )
    assert result.exit_code == 0, result.output
    priced = {m["model"]: m for m in json.loads(result.stdout)["models"]}["priced-sim"]
    # 30 requests x 1000 tokens: 22,500 input x $3 + 7,500 output x $15 per 1M
    # = 67,500 + 112,500 = 180,000 micro-dollars a day; x 7 = 1,260,000. The cost is a third.
    assert (priced["daily_price_micro"], priced["period_price_micro"]) == (180_000, 1_260_000)
    assert (priced["daily_cost_micro"], priced["daily_margin_micro"]) == (60_000, 120_000)
    assert priced["price_per_mtok"] == {
        "input_usd_per_mtok": "3.000000",
        "output_usd_per_mtok": "15.000000",
    }

    base = ["cost", "--users", "1", "--requests-per-user", "1", "--tokens-per-request", "1"]
    for extra, message in [
        (["--output-share", "1.5"], "--output-share"),
        (["--output-share", "half"], "--output-share"),
        (["--users", "-1"], "--users"),
        (["--days", "-3"], "--days"),
        (["--days", "0"], "--days must be at least 1"),
        (["--plan", "gold"], "--plan: no plan 'gold'"),
        (["--config", str(tmp_path / "missing.toml")], "cannot read config file"),
    ]:
        failed = sqlite_cli.runner.invoke(app, [*base, *extra], env={})
        assert failed.exit_code == 1, failed.output
        assert failed.stderr.startswith("error: ") and message in failed.stderr, failed.stderr
        assert "Traceback" not in failed.output


def test_create_prints_the_key_last_in_a_real_process(tmp_path: Path) -> None:
    """Run as a real command, create's stdout ends with the key and stderr is empty."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenwire.cli",
            "keys",
            "create",
            "--name",
            "proc",
            "--rpm",
            "5",
            "--credits",
            "1",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("tw-")
    assert proc.stderr == ""


def test_key_changes_say_when_a_running_gateway_sees_them(sqlite_cli: Cli) -> None:
    """revoke, rotate and update say a running gateway applies them within key_cache_ttl_s, as configured; the help says so too."""
    sqlite_cli.config.write_text(CONFIG + "\n[server]\nkey_cache_ttl_s = 2.5\n")
    key_id, _ = create(sqlite_cli, "--name", "told")
    within = "within 2.5 s on a running gateway (server.key_cache_ttl_s)"
    assert within in sqlite_cli.ok("keys", "update", key_id, "--rpm", "7").stdout
    assert within in sqlite_cli.ok("keys", "rotate", key_id).stdout
    assert within in sqlite_cli.ok("keys", "revoke", key_id).stdout
    sqlite_cli.config.write_text(CONFIG + "\n[server]\nkey_cache_ttl_s = 0\n")
    other, _ = create(sqlite_cli, "--name", "uncached")
    assert "at once on a running gateway" in sqlite_cli.ok("keys", "revoke", other).stdout
    for command in ("revoke", "rotate", "update"):
        shown = sqlite_cli.runner.invoke(app, ["keys", command, "--help"], env={"COLUMNS": "200"})
        text = " ".join(shown.stdout.split())
        assert "within server.key_cache_ttl_s (5 s by default)" in text, text
        assert "from then on" not in text


def test_documented_expiry_examples_are_accepted(sqlite_cli: Cli) -> None:
    """Every --expires date in README.md and docs/ works as written (an example in the past would be refused)."""
    import re

    repo = Path(__file__).resolve().parents[2]
    docs = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    examples = {
        value for doc in docs for value in re.findall(r"--expires (\d\S*?)\]?\s", doc.read_text())
    }
    assert examples, "no --expires example found"
    for value in sorted(examples):
        sqlite_cli.ok("keys", "create", "--name", "doc-example", "--expires", value)


def test_bad_input_is_one_error_line(tmp_path: Path) -> None:
    """Bad options, unknown key ids, broken config and unusable databases: exit 1, one 'error:' line, no traceback."""
    data = str(tmp_path / "data")
    sqlite = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[server\n")
    bad_port = tmp_path / "port.toml"
    bad_port.write_text("[server]\nport = 99999\n")
    long_name = "n" * 201
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["usage", "--since", "yesterday"], {}, "--since"),
        (["usage", "--since", "2026-01-01", "--until", "2025-01-01"], {}, "--until"),
        (["usage", "--key", "key_nope"], {}, "key_nope"),
        (["keys", "create", "--name", "x", "--credits", "lots"], {}, "--credits"),
        (["keys", "create", "--name", "x", "--credits", "NaN"], {}, "--credits"),
        (["keys", "create", "--name", "x", "--models", "sim,nope"], {}, "nope"),
        (["keys", "create", "--name", "x", "--models", ","], {}, "--models"),
        (["keys", "create", "--name", " "], {}, "--name"),
        (["keys", "create", "--name", long_name], {}, "--name"),
        (["keys", "update", "key_nope", "--name", long_name], {}, "--name"),
        (["keys", "show", "key_nope"], {}, "key_nope"),
        (["keys", "update", "key_nope", "--rpm", "5"], {}, "key_nope"),
        (["keys", "topup", "key_nope", "5"], {}, "key_nope"),
        (["keys", "rotate", "key_nope"], {}, "key_nope"),
        (["keys", "revoke", "key_nope"], {}, "key_nope"),
        (["keys", "list"], {"TOKENWIRE_DATABASE_URL": "nonsense"}, "not a SQLAlchemy URL"),
        (["keys", "show", "key_x"], {"TOKENWIRE_DATABASE_URL": "mysql://u@h/db"}, "mysql://"),
        (["keys", "list", "--data-dir", "/proc/no-such-dir"], {}, "cannot use the database"),
        (["keys", "list", "--config", str(tmp_path / "missing.toml")], {}, "cannot read config"),
        (["keys", "revoke", "key_x", "--config", str(bad_toml)], {}, str(bad_toml)),
        (["serve", "--config", str(bad_port)], {}, "$.server.port"),
    ]
    runner = CliRunner()
    for args, env, message in cases:
        argv = args if "--data-dir" in args else [*args, "--data-dir", data]
        result = runner.invoke(app, argv, env={"TOKENWIRE_DATABASE_URL": sqlite, **env})
        assert result.exit_code == 1, (args, result.output, result.exception)
        assert isinstance(result.exception, SystemExit), (args, result.exception)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (
            args,
            result.stderr,
        )
        assert message in result.stderr, (args, result.stderr)
    listed = runner.invoke(
        app, ["keys", "list", "--data-dir", data], env={"TOKENWIRE_DATABASE_URL": sqlite}
    )
    assert listed.exit_code == 0 and "key_" not in listed.stdout, "no key was created"
