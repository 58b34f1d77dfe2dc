"""``tokenwire chat`` against a real gateway: one-shot answers (text and ``--json``) in a
subprocess, and the interactive session in a pseudo-terminal (pexpect), where Ctrl-C stops an
answer (cancelled upstream: its ledger row says so) and the prompt comes back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from tokenwire.testing import FAST_SIM, GatewayServer, paced_sim, priced_model, sim_plan

OVERRIDES = FAST_SIM + paced_sim("slow", itl_ms=40.0) + priced_model("slow-sim", "slow")
TRANSPORTS = pytest.mark.parametrize("transport", ["sse", "ws"])


@pytest.fixture(scope="module")
def chat_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """A gateway with the instant ``sim`` and ``slow-sim`` (priced, 40 ms per token)."""
    with GatewayServer(Path(tmp_path_factory.mktemp("chat")), overrides=OVERRIDES) as server:
        yield server


def chat_env(gateway: GatewayServer, key: str, state_dir: Path) -> dict[str, str]:
    """The environment of a ``tokenwire chat`` process: the gateway, the key, a history dir."""
    return {
        **os.environ,
        "TOKENWIRE_BASE_URL": gateway.base_url,
        "TOKENWIRE_API_KEY": key,
        "XDG_STATE_HOME": str(state_dir),
        "NO_COLOR": "1",
        "TERM": "dumb",
    }


def run_chat(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwire.cli", "chat", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@TRANSPORTS
def test_a_prompt_streams_its_answer_and_a_footer(
    chat_gateway: GatewayServer, tmp_path: Path, transport: str
) -> None:
    """`tokenwire chat "…" -m slow-sim` prints exactly the model's answer on stdout, and TTFT, tokens/s, tokens and the charged cost on stderr."""
    env = chat_env(chat_gateway, chat_gateway.api_key, tmp_path)
    done = run_chat(
        env, "Name a river", "-m", "slow-sim", "--max-tokens", "6", "--transport", transport
    )
    assert done.returncode == 0, done.stderr
    messages = [{"role": "user", "content": "Name a river"}]
    expected = sim_plan({"model": "sim", "messages": messages, "max_tokens": 6})
    assert done.stdout == expected.text + "\n"
    prompt_tokens = expected.prompt_tokens
    cost = (3 * prompt_tokens + 15 * 6) / 1_000_000
    assert "TTFT " in done.stderr and " tokens/s" in done.stderr
    assert f"{prompt_tokens} → 6 tokens" in done.stderr
    assert f"${cost:.6f}" in done.stderr


def test_json_prints_the_chunks_with_usage_last(
    chat_gateway: GatewayServer, tmp_path: Path
) -> None:
    """--json prints one chat.completion.chunk per line, a system message is sent first, and the last line is the usage chunk with cost_micro."""
    env = chat_env(chat_gateway, chat_gateway.api_key, tmp_path)
    done = run_chat(
        env, "Hello", "-m", "sim", "--max-tokens", "4", "--json", "--system", "Be brief"
    )
    assert done.returncode == 0, done.stderr
    chunks = [json.loads(line) for line in done.stdout.splitlines()]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    messages = [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Hello"},
    ]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == sim_plan({"model": "sim", "messages": messages, "max_tokens": 4}).text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-1]["usage"]["cost_micro"] == 0  # sim is free


def test_a_bad_key_is_one_error_line(chat_gateway: GatewayServer, tmp_path: Path) -> None:
    """A refused key prints `error: 401 …` on stderr and exits 130-free with a failure status, no traceback."""
    done = run_chat(chat_env(chat_gateway, "tw-nope", tmp_path), "Hello")
    assert done.returncode != 0
    assert done.stderr.startswith("error: 401 invalid_api_key")
    assert "Traceback" not in done.stderr


@TRANSPORTS
def test_ctrl_c_cancels_the_answer_upstream_and_the_prompt_comes_back(
    chat_gateway: GatewayServer, tmp_path: Path, transport: str
) -> None:
    """Interactive: an answer streams; Ctrl-C stops it (footer says cancelled, the ledger row is `cancelled` with far fewer than its 300 tokens), the prompt returns and the session goes on; Ctrl-D ends it."""
    _, key = chat_gateway.create_key(f"cli-{transport}", credits_usd="1")
    env = chat_env(chat_gateway, key, tmp_path)
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "tokenwire.cli",
            "chat",
            "-m",
            "slow-sim",
            "--max-tokens",
            "300",
            "--transport",
            transport,
        ],
        env=env,
        encoding="utf-8",
        timeout=30,
    )
    try:
        child.expect("> ")
        child.sendline("Tell me everything")
        messages = [{"role": "user", "content": "Tell me everything"}]
        tokens = sim_plan({"model": "sim", "messages": messages, "max_tokens": 300}).tokens
        child.expect_exact("".join(tokens[:3]))  # it streams
        child.sendintr()
        child.expect("cancelled")
        child.expect("> ")  # the session goes on
        (row,) = chat_gateway.usage_rows(key, 1)
        assert row["status"] == "cancelled"
        assert 3 <= row["completion_tokens"] < 100
        child.sendline("/reset")
        child.expect("conversation forgotten")
        child.expect("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert (tmp_path / "tokenwire" / "chat_history").read_text().count("Tell me everything") == 1
