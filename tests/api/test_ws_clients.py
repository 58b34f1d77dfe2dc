"""Real WebSocket clients in compatible mode, written the way their users write them.

* Node ``ws`` (``tests/clients/node/ws_compat.mjs``) parses every message as JSON and closes on
  ``finish_reason == "stop"``: the server's ``[DONE]`` grace must keep it from crashing.
* Python ``websocket-client`` and ``websockets`` read until ``[DONE]``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from websocket import create_connection
from websockets.sync.client import connect

from tokenwire.providers.sim import SimPlan, plan
from tokenwire.testing import GatewayServer
from tokenwire.wire.schema import decode_chat_request

NODE_DIR = Path(__file__).parent.parent / "clients" / "node"
SCRIPT = NODE_DIR / "ws_compat.mjs"


def ws_url(gateway: GatewayServer) -> str:
    return "ws" + gateway.base_url.removeprefix("http") + "/v1/ws/chat"


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": [{"role": "user", "content": content}], **extra}


def expected(body: dict[str, Any]) -> SimPlan:
    """What the simulator emits for this body."""
    return plan(decode_chat_request(json.dumps({**body, "stream": True}).encode()))


def run_node(gateway: GatewayServer, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Run ws_compat.mjs against the gateway with this request body."""
    node = shutil.which("node")
    assert node is not None, "node is not on PATH"
    assert (NODE_DIR / "node_modules" / "ws").is_dir(), "run `npm install` in tests/clients/node"
    return subprocess.run(
        [node, str(SCRIPT), ws_url(gateway), gateway.api_key],
        cwd=NODE_DIR,
        env={**os.environ, "TW_REQUEST": json.dumps(body)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("attempt", range(5))
def test_node_ws_closes_on_stop_without_crashing(gateway: GatewayServer, attempt: int) -> None:
    """Node ws closing on finish_reason 'stop' prints the sim's text and exits 0 (no [DONE] crash)."""
    body = chat(f"hello from node ws, attempt {attempt}", stream=True)
    sim = expected(body)
    assert sim.finish_reason == "stop"
    proc = run_node(gateway, body)
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    assert proc.stdout == sim.text
    assert "SyntaxError" not in proc.stderr


def test_node_ws_crashes_on_a_late_done_without_the_grace(gateway: GatewayServer) -> None:
    """Control: a request that never ends with 'stop' makes the same script choke on [DONE]."""
    body = chat("no stop here", stream=True, max_tokens=3)  # finish_reason 'length'
    proc = run_node(gateway, body)
    assert proc.returncode == 1
    assert "SyntaxError" in proc.stderr
    assert proc.stdout == expected(body).text


def test_websocket_client_reads_until_done(gateway: GatewayServer) -> None:
    """websocket-client: create_connection with a Bearer header, recv() until [DONE], full text."""
    body = chat("hello from websocket-client", stream=True)
    ws = create_connection(
        ws_url(gateway), header={"Authorization": f"Bearer {gateway.api_key}"}, timeout=10
    )
    try:
        ws.send(json.dumps(body))
        received = ""
        text = ""
        while not received.endswith("[DONE]"):
            message = ws.recv()
            received += message
            if message != "[DONE]":
                chunk = json.loads(message)
                text += chunk["choices"][0]["delta"].get("content") or ""
    finally:
        ws.close()
    assert text == expected(body).text
    assert received.endswith('"finish_reason":"stop"}]}[DONE]')


def test_websockets_sync_client_reads_until_done(gateway: GatewayServer) -> None:
    """websockets (sync client): several requests on one socket, each read until [DONE]."""
    bodies = [chat("hello from websockets", stream=True), chat("and again", max_tokens=5)]
    texts: list[str] = []
    finishes: list[str] = []
    with connect(
        ws_url(gateway),
        additional_headers={"Authorization": f"Bearer {gateway.api_key}"},
        open_timeout=10,
    ) as ws:
        for body in bodies:
            ws.send(json.dumps(body))
            text = ""
            while (message := ws.recv(timeout=10)) != "[DONE]":
                choice = json.loads(message)["choices"][0]
                text += choice["delta"].get("content") or ""
                if choice["finish_reason"]:
                    finishes.append(choice["finish_reason"])
            texts.append(text)
    assert texts == [expected(body).text for body in bodies]
    assert finishes == ["stop", "length"]
