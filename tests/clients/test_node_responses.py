"""The ``openai`` npm package's Responses streaming under Node (``node/responses_stream.mjs``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tokenwire.providers.sim import plan
from tokenwire.testing import GatewayServer
from tokenwire.wire.responses_request import responses_request_from
from tokenwire.wire.schema import chat_request_from

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "responses_stream.mjs"


def run_node(
    gateway: GatewayServer, mode: str, request: dict[str, Any], model: str = "sim"
) -> tuple[int, list[dict[str, Any]]]:
    """Run the script; its exit status and the JSON lines it printed."""
    node = shutil.which("node")
    assert node is not None, "node is not on PATH"
    proc = subprocess.run(
        [node, str(SCRIPT), gateway.base_url + "/v1", gateway.api_key, model],
        cwd=NODE_DIR,
        env={**os.environ, "TW_MODE": mode, "TW_REQUEST": json.dumps(request)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"node printed nothing; stderr:\n{proc.stderr}"
    return proc.returncode, lines


@pytest.mark.parametrize("mode", ["create", "stream"])
def test_node_streams_a_response(gateway: GatewayServer, mode: str) -> None:
    """``responses.create({stream: true})`` and ``responses.stream()``: every event numbered
    0, 1, 2…, the sim's exact text, completed with usage."""
    request = {"input": "hello from node", "instructions": "Be brief."}
    code, lines = run_node(gateway, mode, request)
    assert code == 0, lines[-1]
    events = [line for line in lines if line["type"] == "event"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["event"] == "response.created" and events[-1]["event"] == "response.completed"
    result = lines[-1]
    sim = plan(chat_request_from(responses_request_from({"model": "sim", **request}).chat_body([])))
    assert result["text"] == result["output_text"] == sim.text
    assert result["status"] == "completed" and result["id"].startswith("resp_")
    assert result["usage"]["input_tokens"] == sim.prompt_tokens
    assert result["usage"]["output_tokens"] == sim.completion_tokens


def test_node_sees_a_refusal_as_an_api_error(gateway: GatewayServer) -> None:
    """A field the gateway does not take: the SDK raises with status 400."""
    code, lines = run_node(gateway, "create", {"background": True})
    assert code == 1
    assert lines[-1]["type"] == "error" and lines[-1]["status"] == 400
