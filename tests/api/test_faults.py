"""Upstream faults before and after the first token, over SSE and WebSocket, and no leaks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from websockets.asyncio.client import connect

from tokenwire.testing import GatewayServer, SimUpstreamServer

# kind -> (status before the first token, status after it)
EXPECTED: dict[str, tuple[int, int]] = {
    "500": (500, 502),
    "503": (503, 502),
    "529": (529, 502),
    "429": (429, 502),
    "reset": (502, 502),
    "stall": (504, 504),
    "malformed": (502, 502),
    "truncated": (502, 502),
    "error": (502, 502),
}
CASES = [(kind, after) for kind in EXPECTED for after in (False, True)]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    with SimUpstreamServer(ttft_ms=0, itl_ms=1) as upstream:
        overrides = f"""
[providers.upstream]
kind = "openai"
base_url = "{upstream.base_url}/v1"
first_token_timeout_s = 0.5
idle_timeout_s = 0.5

[routing]
max_attempts = 1  # see each fault as it is (retries are the router tests' subject)

[[models]]
id = "proxied-sim"
provider = "upstream"
upstream_model = "sim"
"""
        with GatewayServer(Path(tmp_path_factory.mktemp("faults")), overrides=overrides) as gateway:
            yield gateway


def body(kind: str, after: bool) -> dict[str, Any]:
    fault = f"sim-fault:{kind}{'-after' if after else ''}"
    return {
        "model": "proxied-sim",
        "max_tokens": 20,
        "messages": [{"role": "user", "content": f"x {fault}"}],
    }


def sse_outcome(gateway: GatewayServer, kind: str, after: bool) -> tuple[int, str, int | None]:
    """(HTTP status, text before the failure, in-band or body error status)."""
    response = requests.post(
        gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        json={**body(kind, after), "stream": True},
        stream=True,
        timeout=30,
    )
    if response.status_code != 200:
        return (
            response.status_code,
            "",
            response.json()["error"].get("status", response.status_code),
        )
    text, status, lines = "", None, []
    for line in response.iter_lines(decode_unicode=True):
        if not line.startswith("data: "):
            continue
        lines.append(line[6:])
        if line == "data: [DONE]":
            break
        data = json.loads(line[6:])
        if "error" in data:
            status = data["error"]["status"]
        elif data["choices"]:
            text += data["choices"][0]["delta"].get("content", "")
    assert lines[-1] == "[DONE]"
    return 200, text, status


async def ws_outcome(gateway: GatewayServer, kind: str, after: bool) -> tuple[str, int | None]:
    """(text before the failure, error status) over WebSocket envelope mode."""
    url = "ws" + gateway.base_url.removeprefix("http") + "/v1/ws/chat"
    async with connect(
        url, additional_headers={"Authorization": f"Bearer {gateway.api_key}"}
    ) as ws:
        await ws.send(
            json.dumps(
                {"type": "chat.completion.create", "request_id": "f", "body": body(kind, after)}
            )
        )
        text = ""
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message["type"] == "error":
                return text, message["error"]["status"]
            if message["type"] == "chat.completion.done":
                return text, None
            if message["choices"]:
                text += message["choices"][0]["delta"].get("content", "")


@pytest.mark.parametrize(
    ("kind", "after"), CASES, ids=[f"{k}-{'after' if a else 'before'}" for k, a in CASES]
)
async def test_fault_reaches_the_client_cleanly_on_both_transports(
    faulty: GatewayServer, kind: str, after: bool
) -> None:
    """Before the first token: the HTTP status and error body; after it: partial text then an in-band error."""
    before_status, after_status = EXPECTED[kind]
    status, text, error_status = await asyncio.to_thread(sse_outcome, faulty, kind, after)
    ws_text, ws_status = await ws_outcome(faulty, kind, after)
    if after:
        assert status == 200
        assert text and ws_text == text  # the first token arrived on both
        assert error_status == ws_status == after_status
    else:
        assert status == error_status == ws_status == before_status
        assert text == ws_text == ""


async def test_no_task_connection_or_fd_leaks_after_500_faulty_requests(
    faulty: GatewayServer,
) -> None:
    """500 faulty requests later the gateway holds no extra tasks, generations or file descriptors."""
    loop = faulty.loop_of_server()
    process = psutil.Process()

    async def count_tasks() -> int:
        return len(asyncio.all_tasks())

    def snapshot() -> tuple[int, int]:
        tasks = asyncio.run_coroutine_threadsafe(count_tasks(), loop).result(5)
        return tasks, process.num_fds()

    async def quiet_snapshot(limit: tuple[int, int] | None = None) -> tuple[int, int]:
        """Tasks and fds once every generation has settled (and, given a limit, within it)."""
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            current = snapshot()
            settled = not faulty.state.completions.live
            within = limit is None or (current[0] <= limit[0] and current[1] <= limit[1])
            if (settled and within) or asyncio.get_running_loop().time() > deadline:
                return current
            await asyncio.sleep(0.05)

    await asyncio.to_thread(sse_outcome, faulty, "500", False)  # warm pools
    await ws_outcome(faulty, "500", False)
    before = await quiet_snapshot()
    kinds = [k for k in EXPECTED if k != "stall"]
    for i in range(250):
        kind, after = kinds[i % len(kinds)], bool(i % 2)
        await asyncio.to_thread(sse_outcome, faulty, kind, after)
        await ws_outcome(faulty, kind, after)
    after_tasks, after_fds = await quiet_snapshot((before[0] + 2, before[1] + 10))
    assert faulty.state.completions.live == {}
    assert after_tasks <= before[0] + 2, (before, after_tasks)
    assert after_fds <= before[1] + 10, (before, after_fds)
