"""The shipped Prometheus alert rules and Grafana dashboard: valid, tested with promtool, and
using only series a tokenwire scrape really has (plus Prometheus' own ``up``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tokenwire.observability.metrics import Metrics, RuntimeSample
from tokenwire.testing import Scrape

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "tokenwire.json"
PROMETHEUS_OWN = {"up"}  # recorded by Prometheus for every target
_NAME = re.compile(r"\b(?:tokenwire|process)_[a-z_]+\b|\bup\b")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is missing: scripts/test installs the prometheus package"
    return subprocess.run(
        [binary, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def scrape_text() -> str:
    """A scrape of a fresh Metrics with every sampled value, as the gateway serves it."""
    sample = RuntimeSample(
        ledger_queued=0,
        ledger_held=0,
        ledger_outbox_files=0,
        ledger_write_failures=0,
        circuits={"sim/sim": 0},
    )
    return Metrics(sampler=lambda: sample).render()[0].decode()


def exposed_families() -> set[str]:
    return {re.sub(r"_total$", "", family) for family in Scrape.parse(scrape_text()).families}


def referenced(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in _NAME.findall(expr)}


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return [panel for panel in panels if panel["type"] != "row"]


def assert_all_exposed(names: set[str]) -> None:
    families = exposed_families()
    missing = {
        name
        for name in names - PROMETHEUS_OWN
        if re.sub(r"_(bucket|count|sum|total)$", "", name) not in families
    }
    assert not missing, f"not in a tokenwire scrape: {sorted(missing)}"


def test_alert_rules_are_valid_promql() -> None:
    """``promtool check rules`` accepts the rules file."""
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_as_meant() -> None:
    """``promtool test rules``: the shipped unit tests of the alerts pass."""
    result = promtool("test", "rules", str(ALERTS.with_name("alerts.test.yml")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_use_only_shipped_series() -> None:
    """Every series an alert reads is one tokenwire exposes (or ``up``); each alert has a
    severity and a summary."""
    rules = alert_rules()
    assert len(rules) >= 10
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    names = referenced([rule["expr"] for rule in rules])
    assert "tokenwire_ledger_held_rows" in names and "up" in names
    assert_all_exposed(names)


def test_dashboard_uses_only_shipped_series() -> None:
    """Every panel query of the Grafana dashboard reads series tokenwire exposes."""
    expressions = [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]
    names = referenced(expressions)
    assert {"tokenwire_ttft_seconds_bucket", "tokenwire_cost_microdollars_total"} <= names
    assert_all_exposed(names)


def test_dashboard_is_well_formed() -> None:
    """Panel ids are unique, every panel has a query and a place on the 24-column grid, and
    queries use the dashboard's data source variable."""
    document = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {variable["name"] for variable in document["templating"]["list"]}
    assert variables == {"datasource", "model"}


def test_exposition_passes_promtool_lint() -> None:
    """``promtool check metrics`` finds nothing to complain about in a scrape (names, units,
    help texts, counter suffixes)."""
    result = promtool("check", "metrics", stdin=scrape_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""
