"""A completion's end releases its limits at once on the in-process limiter
(``release_nowait``, nothing awaited); a release that fails there is logged while the stream
still ends and is billed. (That a one-stream key is admitted again the moment it reads the
end, on every transport and backend: ``tests/accounting/test_stream_limits_e2e.py``.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from tokenwire.limits.memory import MemoryRateLimiter
from tokenwire.testing import GatewayServer

BODY = {
    "model": "sim",
    "stream": True,
    "max_tokens": 5,
    "messages": [{"role": "user", "content": "hi"}],
}


def stream(gw: GatewayServer, key: str) -> tuple[int, bytes]:
    """One SSE completion read to its end: the status and the body."""
    response = requests.post(
        gw.base_url + "/v1/chat/completions",
        json=BODY,
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    return response.status_code, response.content


def test_a_release_that_fails_is_logged_and_the_stream_still_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A limiter whose release raises: the stream ends with ``[DONE]``, its ledger row is
    written, and the failure is logged with the completion's id."""

    def broken(*_args: Any) -> bool:
        raise RuntimeError("a bug in the limiter")

    monkeypatch.setattr(MemoryRateLimiter, "release_nowait", broken)
    with GatewayServer(tmp_path) as gw:
        _, key = gw.create_key("broken-release")
        status, body = stream(gw, key)
        assert status == 200, body
        assert body.rstrip().endswith(b"data: [DONE]")
        rows = gw.usage_rows(key, 1)
    assert len(rows) == 1
    failures = [r for r in caplog.records if "could not release the rate limits" in r.message]
    assert [r.getMessage().rsplit(" ", 1)[-1] for r in failures] == [rows[0]["completion_id"]]
    assert failures[0].exc_info is not None
