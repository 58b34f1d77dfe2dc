"""``tokenwire serve`` as a real process, through a realistic run: what its logs hold and don't.

One gateway process starts on a fresh data dir (so it prints its first keys), with provider
keys for loopback upstreams (sim-upstream as OpenAI, the Anthropic and Gemini fakes, and an
Anthropic provider whose key the fake refuses), a webhook secret, a server secret and a
metrics listener. The run uses SSE, JSON and WebSocket (header, ``auth`` message and ticket),
creates, rotates and revokes keys, tops up through the signed webhook, and provokes errors.

Then: no API key, provider key, ticket or secret appears anywhere in the log stream (stderr).
The first-start keys are printed on **stdout**, once, by design: that is the operator's one
chance to copy them, and stdout is not the log stream (the tests below check both sides).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from tokenwire.api.webhooks import signature_header
from tokenwire.testing import Scrape, SimUpstreamServer, read_sse_answer
from tokenwire.testing_cluster import free_port, spawn_gateway, wait_ready
from tokenwire.testing_upstreams.anthropic_fake import AnthropicFake
from tokenwire.testing_upstreams.gemini_fake import GeminiFakeThread

COMPLETION_FIELDS = {
    "completion_id",
    "key_id",
    "model",
    "provider",
    "transport",
    "api",
    "status",
    "finish_reason",
    "error_code",
    "error_status",
    "ttft_ms",
    "itl_ms",
    "duration_ms",
    "prompt_tokens",
    "completion_tokens",
    "usage_estimated",
    "cost_micro",
    "client",
    "upstream_attempts",
}


@dataclass
class Run:
    """What the run produced and what it must not reveal."""

    stdout: str
    log: str  # stderr: the log stream
    secrets: dict[str, str]  # what each one is -> its value
    api_key_id: str = ""
    statuses: dict[str, int] = field(default_factory=dict)
    stream_ids: dict[str, str] = field(default_factory=dict)
    metrics_listener: str = ""  # the scrape from the metrics port, without a key

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.splitlines()]

    def completions(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == "completion"]


def config(sim: str, anthropic: str, gemini: str) -> str:
    return f"""
[accounting]
free_grant_usd = "5"

[routing]
max_attempts = 2
backoff_base_s = 0.0
backoff_max_s = 0.0

[providers.sim]
kind = "sim"
ttft_ms = 0.0
itl_ms = 1.0

[providers.openai]
kind = "openai"
base_url = "{sim}/v1"
api_key_env = "OPENAI_API_KEY"

[providers.anthropic]
kind = "anthropic"
base_url = "{anthropic}"
api_key_env = "ANTHROPIC_API_KEY"

[providers.gemini]
kind = "gemini"
base_url = "{gemini}"
api_key_env = "GEMINI_API_KEY"

[providers.refused]
kind = "anthropic"
base_url = "{anthropic}"
api_key_env = "TW_TEST_WRONG_ANTHROPIC_KEY"

[[models]]
id = "claude-refused"
provider = "refused"
upstream_model = "claude-sonnet-4-5"
"""


def body(model: str, content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def drive(base: str, metrics_base: str, run: Run) -> None:
    """The realistic run against the gateway at ``base``."""
    api, admin = run.secrets["api key"], run.secrets["admin key"]
    ws_url = "ws" + base.removeprefix("http") + "/v1/ws/chat"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def post(name: str, path: str, key: str | None, payload: Any, **headers: str) -> Any:
            if key is not None:
                headers.update(bearer(key))
            async with http.post(base + path, json=payload, headers=headers) as response:
                run.statuses[name] = response.status
                run.stream_ids[name] = response.headers.get("x-stream-id", "")
                if response.content_type == "text/event-stream":
                    if path == "/v1/chat/completions":
                        return await read_sse_answer(response.content)
                    return await response.read()  # another API's events, read to the end
                return await response.json()

        # streams and JSON through every provider, and their failures
        for model in ("sim", "gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash"):
            await post(f"sse {model}", "/v1/chat/completions", api, body(model, stream=True))
        await post("json sim", "/v1/chat/completions", api, body("sim"))
        refused, fault = body("claude-refused", stream=True), body("gpt-4.1", "sim-fault:500")
        await post("refused upstream", "/v1/chat/completions", api, refused)
        await post("upstream 500", "/v1/chat/completions", api, {**fault, "stream": True})
        await post("bad body", "/v1/chat/completions", api, {"model": "sim", "messages": "x"})
        await post("unknown model", "/v1/chat/completions", api, body("no-such-model"))
        await post("bad key", "/v1/chat/completions", "tw-" + "z" * 43, body("sim"))

        # the other APIs on the same generations: Messages (key in x-api-key), Responses
        messages = {**body("claude-sonnet-4.5"), "max_tokens": 16, "stream": True}
        await post("messages", "/v1/messages", None, messages, **{"x-api-key": api})
        responses = {"model": "gpt-4.1", "input": "Hello there", "stream": True}
        await post("responses", "/v1/responses", api, responses)

        # WebSocket: header auth (compatible), auth message (envelope), a browser ticket
        async with connect(ws_url, additional_headers=bearer(api)) as ws:
            await ws.send(json.dumps(body("sim", "over ws")))
            while await ws.recv() != "[DONE]":
                pass
        async with connect(ws_url) as ws:
            await ws.send(json.dumps({"type": "auth", "api_key": api}))
            assert json.loads(await ws.recv()) == {"type": "auth.ok"}
            create = {"type": "chat.completion.create", "request_id": "r1"}
            await ws.send(json.dumps({**create, "body": body("gpt-4.1", "envelope")}))
            while json.loads(await ws.recv())["type"] != "chat.completion.done":
                pass
        ticket = await post("ticket", "/v1/ws/tickets", api, {})
        run.secrets["ws ticket"] = ticket["ticket"]
        async with connect(ws_url, subprotocols=ticket["subprotocols"]) as ws:
            await ws.send(json.dumps(body("sim", "by ticket")))
            while await ws.recv() != "[DONE]":
                pass
        async with connect(ws_url) as ws:  # a wrong key in an auth message: closed 3000
            await ws.send(json.dumps({"type": "auth", "api_key": "tw-" + "w" * 43}))
            with pytest.raises(Exception, match="3000"):
                await ws.recv()

        # the admin API: create, rotate, revoke; then the old and revoked keys are refused
        created = await post("create key", "/v1/admin/keys", admin, {"name": "ops"})
        run.secrets["created key"] = created["key"]
        rotated = await post("rotate key", f"/v1/admin/keys/{created['id']}/rotate", admin, {})
        run.secrets["rotated key"] = rotated["key"]
        await post("old key", "/v1/chat/completions", created["key"], body("sim"))
        await post("revoke", f"/v1/admin/keys/{created['id']}/revoke", admin, {})
        await post("revoked key", "/v1/chat/completions", rotated["key"], body("sim"))

        # the payment webhook, signed with the secret and with a wrong one
        event = {
            "id": "evt_1",
            "type": "payment.succeeded",
            "data": {"key_id": run.api_key_id, "amount_usd": "3.00", "payment_id": "pi_1"},
        }
        raw = json.dumps(event).encode()
        for name, secret in (("webhook", run.secrets["webhook secret"]), ("bad webhook", "x")):
            signature = signature_header(secret, raw, int(time.time()))
            async with http.post(
                base + "/v1/billing/webhook",
                data=raw,
                headers={"Tokenwire-Signature": signature, "Content-Type": "application/json"},
            ) as response:
                run.statuses[name] = response.status

        # a key where it does not belong: in a URL (the access log prints URLs)
        async with http.get(base + f"/v1/models?api_key={api}") as response:
            run.statuses["key in url"] = response.status

        # metrics: the listener without a key; the main port only for the admin key
        async with http.get(metrics_base + "/metrics") as response:
            run.statuses["metrics listener"] = response.status
            run.metrics_listener = await response.text()
        async with http.get(metrics_base + "/v1/models", headers=bearer(api)) as response:
            run.statuses["api on metrics listener"] = response.status
        for name, headers in (
            ("metrics no key", {}),
            ("metrics api key", bearer(api)),
            ("metrics admin key", bearer(admin)),
        ):
            async with http.get(base + "/metrics", headers=headers) as response:
                run.statuses[name] = response.status

        # let every generation settle (its log line is written then)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            async with http.get(base + "/v1/admin/runtime", headers=bearer(admin)) as response:
                if (await response.json())["live_generations"] == 0:
                    break
            await asyncio.sleep(0.02)  # the polling interval


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """The whole run, once; the process has exited when the tests look at what it wrote."""
    root = tmp_path_factory.mktemp("serve")
    provider_keys = {
        "OPENAI_API_KEY": "sk-proj-" + secrets.token_urlsafe(32),
        "ANTHROPIC_API_KEY": "sk-ant-api03-" + secrets.token_urlsafe(32),
        "GEMINI_API_KEY": "AIza" + secrets.token_urlsafe(28),
        "DEEPSEEK_API_KEY": "sk-" + secrets.token_hex(16),
        "TW_TEST_WRONG_ANTHROPIC_KEY": "sk-ant-api03-" + secrets.token_urlsafe(32),
    }
    webhook_secret = "whsec_" + secrets.token_urlsafe(24)
    server_secret = secrets.token_urlsafe(48)
    with (
        SimUpstreamServer(ttft_ms=0, itl_ms=1) as sim,
        AnthropicFake(api_key=provider_keys["ANTHROPIC_API_KEY"]) as anthropic,
        GeminiFakeThread(api_key=provider_keys["GEMINI_API_KEY"]) as gemini,
    ):
        config_path = root / "tokenwire.toml"
        config_path.write_text(config(sim.base_url, anthropic.base_url, gemini.base_url))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}
        env.update(provider_keys)
        env["TOKENWIRE_WEBHOOK_SECRET"] = webhook_secret
        env["TOKENWIRE_SECRET"] = server_secret
        metrics_port = free_port()
        gateway = spawn_gateway(
            "gateway",
            root,
            data_dir=root / "data",
            env=env,
            args=["--config", str(config_path), "--metrics-port", str(metrics_port)],
            separate_stdout=True,
        )
        try:

            async def main() -> Run:
                async with aiohttp.ClientSession() as session:
                    await wait_ready(session, gateway)
                keys = gateway.first_keys()
                run = Run(
                    stdout="",
                    log="",
                    secrets={
                        **{f"provider key {name}": value for name, value in provider_keys.items()},
                        "webhook secret": webhook_secret,
                        "server secret": server_secret,
                        "admin key": keys["admin"][1],
                        "api key": keys["api"][1],
                    },
                    api_key_id=keys["api"][0],
                )
                await drive(gateway.base_url, f"http://127.0.0.1:{metrics_port}", run)
                return run

            result = asyncio.run(main())
        finally:
            gateway.process.send_signal(signal.SIGTERM)
            gateway.process.wait(timeout=30)
        assert gateway.stdout_path is not None
        result.stdout = gateway.stdout_path.read_text()
        result.log = gateway.log_path.read_text()
        yield result


def test_no_secret_reaches_the_log_stream(run: Run) -> None:
    """No API key (printed, created, rotated), ticket, provider key, webhook secret or server
    secret appears in any log line, whole or by its last 16 characters."""
    assert run.log.count("\n") > 30  # a real run logged plenty
    for what, value in run.secrets.items():
        assert value not in run.log, what
        assert value[-16:] not in run.log, what
    assert run.statuses["key in url"] == 401
    assert "api_key=tw-[redacted]" in run.log  # the URL was logged, the key in it was not


def test_first_keys_go_to_stdout_once_and_nothing_else_does(run: Run) -> None:
    """The first start prints the admin and API key on stdout, once each (the operator's only
    copy); stdout holds no log line and no other secret."""
    assert run.stdout.count(run.secrets["admin key"]) == 1
    assert run.stdout.count(run.secrets["api key"]) == 1
    assert "First start" in run.stdout
    for what, value in run.secrets.items():
        if what not in ("admin key", "api key"):
            assert value not in run.stdout, what
    assert not [line for line in run.stdout.splitlines() if line.startswith("{")]


def test_every_log_line_is_json_with_the_standard_fields(run: Run) -> None:
    """stderr is not a terminal, so every line (tokenwire's, uvicorn's, its access log) is one
    JSON object with ts, level, logger and message."""
    lines = run.lines()
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= line.keys(), line
    loggers = {line["logger"] for line in lines}
    assert {"uvicorn.error", "uvicorn.access", "tokenwire.completion"} <= loggers
    access = [line for line in lines if line.get("event") == "access"]
    assert any(
        a["method"] == "POST" and a["path"] == "/v1/chat/completions" and a["status"] == 200
        for a in access
    )
    assert any(line.get("event") == "websocket" and line["status"] == "accepted" for line in lines)
    assert lines[-1]["message"].startswith("Finished server process")  # the log is complete


def test_one_completion_line_per_completion_with_its_fields(run: Run) -> None:
    """Each completion logs one line with every documented field; the SSE one names its
    model, provider, transport, status, timings, tokens, cost, client and attempts."""
    completions = run.completions()
    ids = [line["completion_id"] for line in completions]
    assert len(ids) == len(set(ids)) == 12  # 4 SSE, 1 JSON, 2 failed, 3 WebSocket, 2 APIs
    for line in completions:
        assert line.keys() >= COMPLETION_FIELDS, line
        assert line["key_id"].startswith("key_")
    by_id = {line["completion_id"]: line for line in completions}
    sse = by_id[run.stream_ids["sse gpt-4.1"]]
    assert sse["model"] == "gpt-4.1" and sse["provider"] == "openai"
    assert sse["transport"] == "sse" and sse["api"] == "chat"
    assert sse["status"] == "completed" and sse["finish_reason"] in ("stop", "length")
    assert sse["key_id"] == run.api_key_id
    assert sse["client"] == "127.0.0.1"
    assert sse["upstream_attempts"] == 1
    assert sse["ttft_ms"] >= 0 and sse["duration_ms"] >= sse["ttft_ms"]
    assert sse["prompt_tokens"] > 0 and sse["completion_tokens"] > 0
    assert sse["cost_micro"] == 2 * sse["prompt_tokens"] + 8 * sse["completion_tokens"]
    transports = sorted(line["transport"] for line in completions)
    assert transports.count("ws") == 2 and transports.count("ws-envelope") == 1
    apis = {line["completion_id"]: line["api"] for line in completions}
    assert apis[run.stream_ids["messages"]] == "messages"
    assert run.stream_ids["messages"].startswith("msg_")
    assert apis[run.stream_ids["responses"]] == "responses"
    assert sorted(apis.values()).count("chat") == 10
    failed = by_id[run.stream_ids["upstream 500"]]
    assert failed["status"] == "upstream_error" and failed["error_status"] == 500
    assert failed["upstream_attempts"] == 2 and failed["level"] == "warning"


def test_errors_carry_the_completion_id(run: Run) -> None:
    """The operator's error about a refused provider key names the completion it broke (and
    not the key)."""
    refused_id = run.stream_ids["refused upstream"]
    assert run.statuses["refused upstream"] == 502
    errors = [
        line
        for line in run.lines()
        if line["level"] == "error" and "refused the gateway's credentials" in line["message"]
    ]
    assert errors and all(line.get("completion_id") == refused_id for line in errors)


def test_metrics_listener_needs_no_key_and_the_main_port_stays_closed(run: Run) -> None:
    """The metrics port answers GET /metrics without a key (and nothing else: 404); the main
    port still wants the admin key (401 without, 403 for an API key)."""
    assert run.statuses["metrics listener"] == 200
    scraped = Scrape.parse(run.metrics_listener)
    completed = {"model": "gpt-4.1", "outcome": "completed"}
    assert scraped.total("tokenwire_requests_total", **completed, api="chat") == 2
    assert scraped.total("tokenwire_requests_total", **completed, api="responses") == 1
    assert run.statuses["api on metrics listener"] == 404
    assert run.statuses["metrics no key"] == 401
    assert run.statuses["metrics api key"] == 403
    assert run.statuses["metrics admin key"] == 200
