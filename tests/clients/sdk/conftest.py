"""A gateway for the SDK tests: a paced simulator behind a priced model, a short limit window."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenwire.testing import FAST_SIM, GatewayServer, paced_sim, priced_model

PRICED = "priced-sim"  # $3 / $15 per 1M tokens, served by a sim that takes 20 ms per token
WINDOW_S = 3.0  # the limits' window: a low-rpm key refills in seconds, not minutes
OVERRIDES = (
    FAST_SIM
    + paced_sim("paced", ttft_ms=0.0, itl_ms=20.0)
    + priced_model(PRICED, "paced")
    + priced_model("slow-sim", "slow")
    + paced_sim("slow", ttft_ms=0.0, itl_ms=40.0)
    + priced_model("late-sim", "late")
    + paced_sim("late", ttft_ms=1500.0, itl_ms=40.0)
    + f"""
[limits]
window_s = {WINDOW_S}
"""
)


@pytest.fixture(scope="module")
def sdk_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """One gateway per test module (SQLite, memory streams): models ``priced-sim`` (20 ms per
    token), ``slow-sim`` (40 ms per token) and ``late-sim`` (1.5 s to the first token), all priced; rpm and tpm per 3 s."""
    with GatewayServer(Path(tmp_path_factory.mktemp("sdk")), overrides=OVERRIDES) as server:
        yield server
