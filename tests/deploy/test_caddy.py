"""The shipped Caddyfile parses (``caddy adapt``) and sets what streaming needs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

CADDYFILE = Path(__file__).resolve().parents[2] / "deploy" / "caddy" / "Caddyfile"


def test_caddyfile_adapts_with_streaming_settings() -> None:
    """caddy adapt accepts the Caddyfile; its reverse proxy flushes at once, balances over both instances, keeps long read timeouts and tries another instance on failure."""
    caddy = shutil.which("caddy")
    assert caddy is not None, "caddy is not installed (scripts/test installs it)"
    adapted = subprocess.run(
        [caddy, "adapt", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert adapted.returncode == 0, adapted.stderr
    assert "not formatted" not in adapted.stderr, adapted.stderr  # `caddy fmt` leaves it as is
    config: dict[str, Any] = json.loads(adapted.stdout)
    (server,) = config["apps"]["http"]["servers"].values()
    (route,) = server["routes"]
    (proxy,) = route["handle"]
    assert proxy["handler"] == "reverse_proxy"
    assert proxy["flush_interval"] == -1
    assert [u["dial"] for u in proxy["upstreams"]] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert proxy["load_balancing"]["try_duration"] > 0
    transport = proxy["transport"]
    assert transport["read_timeout"] >= 600 * 10**9  # nanoseconds
    assert transport["keep_alive"]["idle_timeout"] > 0
