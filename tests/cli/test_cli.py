"""The tokenwire command: keys create/list/revoke on a data dir, and serve's first start."""

from __future__ import annotations

import itertools
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from tokenwire.cli.main import app


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    """create prints the key last; list shows its prefix only; revoke marks it revoked."""
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--name", "ci", "--data-dir", str(tmp_path)])
    assert created.exit_code == 0, created.output
    lines = created.output.strip().splitlines()
    key = lines[-1]
    key_id = lines[0].split()[1]
    assert key.startswith("tw-")
    listed = runner.invoke(app, ["keys", "list", "--data-dir", str(tmp_path)])
    assert key[:10] in listed.output and key not in listed.output and "active" in listed.output
    revoked = runner.invoke(app, ["keys", "revoke", key_id, "--data-dir", str(tmp_path)])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert "revoked" in runner.invoke(app, ["keys", "list", "--data-dir", str(tmp_path)]).output
    unknown = runner.invoke(app, ["keys", "revoke", "key_missing", "--data-dir", str(tmp_path)])
    assert unknown.exit_code == 1


def test_keys_use_the_env_data_dir(tmp_path: Path) -> None:
    """TOKENWIRE_DATA_DIR selects the data dir when --data-dir is absent."""
    runner = CliRunner()
    result = runner.invoke(
        app, ["keys", "create", "--name", "env"], env={"TOKENWIRE_DATA_DIR": str(tmp_path)}
    )
    assert result.exit_code == 0
    assert (tmp_path / "tokenwire.db").exists()


def test_serve_first_start_prints_keys_once_and_serves(tmp_path: Path) -> None:
    """tokenwire serve creates the database, prints an admin and an API key once, and answers."""
    port = _free_port()
    env = {**os.environ, "TOKENWIRE_DATA_DIR": str(tmp_path)}
    command = [
        sys.executable,
        "-m",
        "tokenwire.cli",
        "serve",
        "--port",
        str(port),
        "--no-access-log",
    ]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        keys: dict[str, str] = {}
        for line in proc.stdout:
            parts = line.split()
            if parts[:2] in (["admin", "key"], ["API", "key"]):
                keys[parts[0]] = parts[-1]
            if "listening on" in line:
                break
        assert set(keys) == {"admin", "API"}
        models = requests.get(
            f"http://127.0.0.1:{port}/v1/models",
            headers={"Authorization": f"Bearer {keys['API']}"},
            timeout=10,
        )
        assert models.status_code == 200
        assert {"local", "sim"} <= {m["id"] for m in models.json()["data"]}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    second = subprocess.Popen(
        [*command[:-2], "--port", str(_free_port()), "--no-access-log"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert second.stdout is not None
        seen = []
        for line in second.stdout:
            seen.append(line)
            if "listening on" in line:
                break
        assert not any("tw-" in line for line in seen), "keys must be printed only on first start"
    finally:
        second.send_signal(signal.SIGINT)
        second.wait(timeout=15)


@pytest.mark.parametrize(
    ("args", "env", "config", "message"),
    [
        (["--port", "99999"], {}, None, "--port"),
        (["--port", "-1"], {}, None, "--port"),
        (["--port", "0"], {}, None, "--port"),
        ([], {"TOKENWIRE_PORT": "abc"}, None, "error: TOKENWIRE_PORT: 'abc' is not a port number"),
        ([], {"TOKENWIRE_PORT": "70000"}, None, "error: TOKENWIRE_PORT: '70000'"),
        ([], {}, "[server]\nport = 99999\n", "$.server.port"),
        ([], {}, "[server]\nkey_cache_ttl_s = -5\n", "$.server.key_cache_ttl_s"),
        (["--log-format", "xml"], {}, None, "error: --log-format: 'xml' is not one of"),
        ([], {"TOKENWIRE_LOG_FORMAT": "xml"}, None, "error: TOKENWIRE_LOG_FORMAT: 'xml'"),
        (["--metrics-port", "0"], {}, None, "--metrics-port"),
        ([], {"TOKENWIRE_METRICS_PORT": "x"}, None, "error: TOKENWIRE_METRICS_PORT: 'x'"),
        (
            ["--port", "9000", "--metrics-port", "9000"],
            {},
            None,
            "error: server.metrics_port: 9000 is the API's port too",
        ),
        ([], {}, "[server]\nmetrics_port = 8000\n", "error: server.metrics_port: 8000"),
    ],
)
def test_serve_refuses_bad_ports_and_values_before_starting(
    args: list[str], env: dict[str, str], config: str | None, message: str, tmp_path: Path
) -> None:
    """serve exits non-zero naming the bad port or config value, without a traceback or a server."""
    if config is not None:
        (tmp_path / "bad.toml").write_text(config)
        args = [*args, "--config", str(tmp_path / "bad.toml")]
    proc = subprocess.run(
        [sys.executable, "-m", "tokenwire.cli", "serve", *args],
        env={**os.environ, "TOKENWIRE_DATA_DIR": str(tmp_path / "data"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "listening on" not in proc.stderr
    if message.startswith("error:") or message.startswith("$"):
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "data").exists(), "nothing is created before the settings are valid"


def test_sim_upstream_says_where_it_listens(tmp_path: Path) -> None:
    """sim-upstream prints one line with its URL once it accepts connections."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwire.cli", "sim-upstream", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "sim-upstream printed nothing"
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, line
        models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert models.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)


@pytest.mark.parametrize(
    "args",
    [["--itl-ms", "-5"], ["--ttft-ms", "-0.5"], ["--port", "0"], ["--port", "70000"]],
)
def test_sim_upstream_refuses_negative_delays_and_bad_ports(args: list[str]) -> None:
    """sim-upstream exits with a usage error naming the option instead of serving."""
    proc = subprocess.run(
        [sys.executable, "-m", "tokenwire.cli", "sim-upstream", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert args[0] in proc.stderr and "Traceback" not in proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("which", ["--port", "--metrics-port"])
def test_serve_refuses_a_port_in_use_before_making_anything(which: str, tmp_path: Path) -> None:
    """A port (the API's or the metrics listener's) already taken: one error line naming it,
    exit 1, and no database or keys made."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        ports = {"--port": str(_free_port()), "--metrics-port": str(_free_port()), which: busy}
        proc = subprocess.run(
            [sys.executable, "-m", "tokenwire.cli", "serve", *itertools.chain(*ports.items())],
            env={**os.environ, "TOKENWIRE_DATA_DIR": str(tmp_path / "data")},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 1, proc.stderr
    what = "the API" if which == "--port" else "metrics"
    assert f"error: cannot listen on 127.0.0.1:{busy} for {what}" in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "data").exists()
