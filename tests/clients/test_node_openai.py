"""The ``openai`` npm package under Node against a live gateway: Chat Completions
(``node/openai_stream.mjs``) and the Responses API's streaming (``node/responses_stream.mjs``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tokenwire.providers.sim import SimPlan, plan
from tokenwire.testing import GatewayServer
from tokenwire.wire.responses_request import responses_request_from
from tokenwire.wire.schema import chat_request_from, decode_chat_request

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "openai_stream.mjs"
RESPONSES_SCRIPT = NODE_DIR / "responses_stream.mjs"
# The script's default prompt; the expected text is computed from the same request.
DEFAULT_MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "hello from node"}]


def expected(**body: Any) -> SimPlan:
    """What the simulator emits for a ``sim`` request with these fields."""
    request = {"model": "sim", "messages": DEFAULT_MESSAGES, **body}
    return plan(decode_chat_request(json.dumps(request).encode()))


def run_node(
    gateway: GatewayServer,
    *,
    mode: str = "stream",
    request: dict[str, Any] | None = None,
    api_key: str | None = None,
    model: str = "sim",
    script: Path = SCRIPT,
) -> tuple[int, list[dict[str, Any]]]:
    """Run a script; its exit status and the JSON lines it printed."""
    node = shutil.which("node")
    assert node is not None, "node is not on PATH"
    env = {
        **os.environ,
        "TW_MODE": mode,
        "TW_REQUEST": json.dumps(request or {}),
    }
    proc = subprocess.run(
        [node, str(script), gateway.base_url + "/v1", api_key or gateway.api_key, model],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"node printed nothing; stderr:\n{proc.stderr}"
    return proc.returncode, lines


def result_of(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The final ``result`` line."""
    assert lines[-1]["type"] == "result", lines[-1]
    return lines[-1]


def test_node_streaming_text_and_usage(gateway: GatewayServer) -> None:
    """Streaming with include_usage: the sim's exact text, 'stop', usage and one chunk id."""
    code, lines = run_node(gateway)
    assert code == 0
    result = result_of(lines)
    sim = expected()
    assert result["mode"] == "stream"
    assert result["text"] == sim.text
    assert result["finish_reason"] == "stop"
    assert result["usage"] == {
        "prompt_tokens": sim.prompt_tokens,
        "completion_tokens": sim.completion_tokens,
        "total_tokens": sim.prompt_tokens + sim.completion_tokens,
    }
    assert len(result["ids"]) == 1
    assert result["ids"][0].startswith("chatcmpl-")
    chunks = [line for line in lines if line["type"] == "chunk"]
    assert [c["content"] for c in chunks if c["content"]] == list(sim.tokens)
    # the usage chunk is the last one, and the only one carrying usage
    assert [c["usage"] is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == ["stop"]


def test_node_streaming_max_tokens(gateway: GatewayServer) -> None:
    """Streaming with max_tokens: finish 'length' after exactly that many tokens."""
    code, lines = run_node(gateway, request={"max_tokens": 4, "seed": 9})
    assert code == 0
    result = result_of(lines)
    sim = expected(max_tokens=4, seed=9)
    assert len(sim.tokens) == 4
    assert result["text"] == sim.text
    assert result["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 4
    assert result["usage"]["prompt_tokens"] == sim.prompt_tokens
    contents = [line["content"] for line in lines if line["type"] == "chunk" and line["content"]]
    assert len(contents) == 4


def test_node_non_streaming(gateway: GatewayServer) -> None:
    """A non-streamed call from Node returns the sim's text, finish reason and usage."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name three rivers"},
    ]
    code, lines = run_node(gateway, mode="json", request={"messages": messages})
    assert code == 0
    result = result_of(lines)
    sim = plan(decode_chat_request(json.dumps({"model": "sim", "messages": messages}).encode()))
    assert result["mode"] == "json"
    assert result["text"] == sim.text
    assert result["finish_reason"] == "stop"
    assert result["usage"] == {
        "prompt_tokens": sim.prompt_tokens,
        "completion_tokens": sim.completion_tokens,
        "total_tokens": sim.prompt_tokens + sim.completion_tokens,
    }
    assert result["id"].startswith("chatcmpl-")
    assert result["text"] != expected().text  # the request really reached the gateway


@pytest.mark.parametrize("mode", ["stream", "json"])
def test_node_wrong_key(gateway: GatewayServer, mode: str) -> None:
    """A wrong key makes the Node SDK raise an AuthenticationError with status 401."""
    code, lines = run_node(gateway, mode=mode, api_key="tw-wrong-key")
    assert code == 1
    assert lines[-1]["type"] == "error"
    assert lines[-1]["status"] == 401
    assert lines[-1]["name"] == "AuthenticationError"
    assert lines[-1]["code"] == "invalid_api_key"


def test_node_unknown_model(gateway: GatewayServer) -> None:
    """An unknown model makes the Node SDK raise NotFoundError (404, model_not_found)."""
    code, lines = run_node(gateway, model="no-such-model")
    assert code == 1
    assert lines[-1]["type"] == "error"
    assert lines[-1]["status"] == 404
    assert lines[-1]["name"] == "NotFoundError"
    assert lines[-1]["code"] == "model_not_found"


@pytest.mark.parametrize("mode", ["create", "stream"])
def test_node_streams_a_response(gateway: GatewayServer, mode: str) -> None:
    """Responses: ``responses.create({stream: true})`` and ``responses.stream()``, every event
    numbered 0, 1, 2…, the sim's exact text, completed with usage."""
    request = {"input": "hello from node", "instructions": "Be brief."}
    code, lines = run_node(gateway, mode=mode, request=request, script=RESPONSES_SCRIPT)
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


def test_node_sees_a_responses_refusal_as_an_api_error(gateway: GatewayServer) -> None:
    """Responses: a field the gateway does not take makes the SDK raise with status 400."""
    code, lines = run_node(
        gateway, mode="create", request={"background": True}, script=RESPONSES_SCRIPT
    )
    assert code == 1
    assert lines[-1]["type"] == "error" and lines[-1]["status"] == 400
