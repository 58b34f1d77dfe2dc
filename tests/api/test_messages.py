"""``POST /v1/messages`` end to end: the official ``anthropic`` SDK against a real gateway.

Every backend kind answers the Messages API: the in-process simulator, the Anthropic Messages
API and the Gemini API (their loopback fakes) and the local model. The text, stop reason and
usage of each answer equal what Chat Completions gives for the same request, so the Messages
API is another view of the same generation. Errors arrive in Anthropic's shape with the
gateway's status; keys, limits, credits, the ledger and resumable streams work as for chat.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
import requests
import sqlalchemy as sa

from tokenwire.storage.engine import make_engine
from tokenwire.storage.tables import usage_ledger
from tokenwire.testing import FAST_SIM, GatewayServer, paced_sim, priced_model
from tokenwire.testing_upstreams.anthropic_fake import AnthropicFake
from tokenwire.testing_upstreams.gemini_fake import GeminiFakeThread

SYSTEM = "You are a terse assistant."
USER = "Tell me something about streaming gateways"
LOOKUP = {
    "name": "lookup",
    "description": "Look something up.",
    "input_schema": {
        "type": "object",
        "properties": {"query": {"type": "string"}},
        "required": ["query"],
    },
}
BACKENDS = ["sim", "claude", "gemini"]


@pytest.fixture(scope="module")
def claude() -> Iterator[AnthropicFake]:
    """The loopback Anthropic Messages API behind the ``claude`` model."""
    with AnthropicFake(api_key="ak") as fake:
        yield fake


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, claude: AnthropicFake
) -> Iterator[GatewayServer]:
    """A gateway serving sim, Claude (the Anthropic fake), Gemini (its fake) and priced models."""
    with GeminiFakeThread(api_key="gk") as gemini:
        overrides = (
            FAST_SIM
            + paced_sim("slow", ttft_ms=0.0, itl_ms=20.0)
            + priced_model()
            + f"""
[[models]]
id = "slow-sim"
provider = "slow"
upstream_model = "sim"

[providers.anthropic]
kind = "anthropic"
base_url = "{claude.base_url}"
api_key_env = "ANTHROPIC_API_KEY"

[[models]]
id = "claude"
provider = "anthropic"
upstream_model = "claude-sonnet-4-5"

[providers.gemini]
kind = "gemini"
base_url = "{gemini.base_url}"
api_key_env = "GEMINI_API_KEY"

[[models]]
id = "gemini"
provider = "gemini"
upstream_model = "gemini-2.5-flash"
"""
        )
        env = {"ANTHROPIC_API_KEY": "ak", "GEMINI_API_KEY": "gk"}
        data_dir = tmp_path_factory.mktemp("messages")
        with GatewayServer(data_dir, overrides=overrides, env=env) as server:
            yield server


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[anthropic.Anthropic]:
    """The ``anthropic`` SDK pointed at the gateway (it sends the key as ``x-api-key``)."""
    with anthropic.Anthropic(
        base_url=gateway.base_url, api_key=gateway.api_key, max_retries=0, timeout=20
    ) as sdk:
        yield sdk


def chat_answer(gateway: GatewayServer, model: str, **extra: Any) -> Any:
    """The Chat Completions answer to the same request (the reference)."""
    with openai.OpenAI(
        base_url=gateway.base_url + "/v1", api_key=gateway.api_key, max_retries=0, timeout=20
    ) as sdk:
        return sdk.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
            **extra,
        )


def ledger_rows(gateway: GatewayServer, key_id: str) -> list[dict[str, Any]]:
    """The key's ledger rows, oldest first."""

    async def read() -> list[dict[str, Any]]:
        engine = make_engine(gateway.settings.database_url)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(
                    sa.select(usage_ledger)
                    .where(usage_ledger.c.key_id == key_id)
                    .order_by(usage_ledger.c.created_at)
                )
                return [dict(row._mapping) for row in result]
        finally:
            await engine.dispose()

    return asyncio.run(read())


def wait_settled(gateway: GatewayServer) -> None:
    """Wait (bounded) until no completion is live: every ledger row is written."""
    deadline = time.monotonic() + 10
    while gateway.state.completions.live:
        assert time.monotonic() < deadline, "completions still live"
        time.sleep(0.01)  # the polling interval, not a synchronisation


def create_key(gateway: GatewayServer, **fields: Any) -> tuple[str, str]:
    """A new API key through the admin API: (id, plaintext)."""
    response = requests.post(
        gateway.base_url + "/v1/admin/keys",
        headers={"Authorization": f"Bearer {gateway.admin_key}"},
        json={"name": "messages-test", **fields},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return body["id"], body["key"]


# -- the answer is the chat answer ----------------------------------------------------------


@pytest.mark.parametrize("model", BACKENDS)
def test_create_equals_the_chat_completion(
    client: anthropic.Anthropic, gateway: GatewayServer, model: str
) -> None:
    """messages.create: the chat completion's text, stop reason and usage, as a message."""
    message = client.messages.create(
        model=model, max_tokens=6, system=SYSTEM, messages=[{"role": "user", "content": USER}]
    )
    reference = chat_answer(gateway, model, max_tokens=6)
    assert message.type == "message" and message.role == "assistant" and message.model == model
    assert message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == reference.choices[0].message.content  # type: ignore[union-attr]
    assert message.stop_reason == "max_tokens" and reference.choices[0].finish_reason == "length"
    assert message.usage.input_tokens == reference.usage.prompt_tokens
    assert message.usage.output_tokens == reference.usage.completion_tokens


@pytest.mark.parametrize("model", BACKENDS)
def test_stream_equals_the_chat_completion(
    client: anthropic.Anthropic, gateway: GatewayServer, model: str
) -> None:
    """messages.stream: the deltas add up to the chat text; the final message has its usage."""
    with client.messages.stream(
        model=model, max_tokens=200, system=SYSTEM, messages=[{"role": "user", "content": USER}]
    ) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    reference = chat_answer(gateway, model, max_tokens=200)
    assert len(deltas) > 1
    assert "".join(deltas) == final.content[0].text == reference.choices[0].message.content  # type: ignore[union-attr]
    stop_reasons = {"stop": "end_turn", "length": "max_tokens"}  # sim always fills max_tokens
    assert final.stop_reason == stop_reasons[reference.choices[0].finish_reason]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        reference.usage.prompt_tokens,
        reference.usage.completion_tokens,
    )


def test_raw_stream_events_in_anthropics_order(client: anthropic.Anthropic) -> None:
    """create(stream=True): message_start, block start, deltas, stop, message_delta, stop."""
    events = list(
        client.messages.create(
            model="sim", max_tokens=3, messages=[{"role": "user", "content": USER}], stream=True
        )
    )
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


@pytest.mark.parametrize("model", BACKENDS)
def test_tool_use_round_trip(client: anthropic.Anthropic, model: str) -> None:
    """A forced tool call comes back as tool_use; its tool_result gets an answer."""
    turn = [{"role": "user", "content": "Find streaming gateways"}]
    with client.messages.stream(
        model=model,
        max_tokens=100,
        tools=[LOOKUP],  # type: ignore[list-item]
        tool_choice={"type": "any"},
        messages=turn,  # type: ignore[arg-type]
    ) as stream:
        called = stream.get_final_message()
    assert called.stop_reason == "tool_use"
    (use,) = [block for block in called.content if block.type == "tool_use"]
    assert use.name == "lookup" and isinstance(use.input, dict) and "query" in use.input
    answer = client.messages.create(
        model=model,
        max_tokens=100,
        tools=[LOOKUP],  # type: ignore[list-item]
        messages=[
            *turn,  # type: ignore[list-item]
            {"role": "assistant", "content": called.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": "42 results"}
                ],
            },
        ],
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.content and answer.content[0].type == "text" and answer.content[0].text


def test_claude_receives_the_request_unchanged(
    client: anthropic.Anthropic, claude: AnthropicFake
) -> None:
    """What the Anthropic upstream receives is the client's request (model renamed)."""
    request = {
        "max_tokens": 50,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": [{"type": "text", "text": USER}]}],
        "stop_sequences": ["zzz"],
        "tools": [LOOKUP],
        "tool_choice": {"type": "auto"},
        "metadata": {"user_id": "u-1"},
    }
    sampling = {"temperature": 0.5, "top_p": 0.9, "top_k": 7}  # not in this SDK's signature
    client.messages.create(model="claude", **request, extra_body=sampling)  # type: ignore[call-overload]
    received = claude.requests[-1].body
    assert received == {**request, **sampling, "model": "claude-sonnet-4-5", "stream": True}


# -- errors in Anthropic's shape --------------------------------------------------------------


def test_authentication(gateway: GatewayServer) -> None:
    """x-api-key or Bearer works; a missing or wrong key is a 401 authentication_error."""
    body = {"model": "sim", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    url = gateway.base_url + "/v1/messages"
    for headers in ({"x-api-key": gateway.api_key}, {"Authorization": f"Bearer {gateway.api_key}"}):
        assert (
            requests.post(
                url, json=body, headers={**headers, "anthropic-version": "2023-06-01"}
            ).status_code
            == 200
        )
    for headers in ({}, {"x-api-key": "tw-wrong"}):
        response = requests.post(url, json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "authentication_error"
    with (
        anthropic.Anthropic(base_url=gateway.base_url, api_key="tw-wrong", max_retries=0) as sdk,
        pytest.raises(anthropic.AuthenticationError),
    ):
        sdk.messages.create(model="sim", max_tokens=2, messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("extra", "status", "error_type", "field"),
    [
        ({"max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            400,
            "invalid_request_error",
            "messages[0].role",
        ),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 2000}},
            400,
            "invalid_request_error",
            "thinking",
        ),
        ({"max_tokens": 10**6}, 400, "invalid_request_error", "max_tokens"),
        ({"model": "no-such-model"}, 404, "not_found_error", "model"),
    ],
)
def test_bad_requests_name_the_field(
    gateway: GatewayServer, extra: dict[str, Any], status: int, error_type: str, field: str
) -> None:
    """Bad input: Anthropic's error body with the status, the message naming the field."""
    body = {
        "model": "sim",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }
    response = requests.post(
        gateway.base_url + "/v1/messages", json=body, headers={"x-api-key": gateway.api_key}
    )
    assert response.status_code == status
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == error_type
    assert error["error"]["message"].startswith(field)


def test_no_credit_is_a_402_billing_error(gateway: GatewayServer) -> None:
    """A priced model with a key that has no credit: 402 billing_error, nothing billed."""
    key_id, key = create_key(gateway)
    with (
        anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0) as sdk,
        pytest.raises(anthropic.APIStatusError) as caught,
    ):
        sdk.messages.create(
            model="priced-sim", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 402
    assert caught.value.body["error"]["type"] == "billing_error"  # type: ignore[index]
    assert ledger_rows(gateway, key_id) == []


def test_rate_limit_is_a_429_with_retry_after(gateway: GatewayServer) -> None:
    """Past the key's rpm: 429 rate_limit_error with Retry-After, as the SDK reads it."""
    _, key = create_key(gateway, rpm=1)
    with anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0) as sdk:
        sdk.messages.create(model="sim", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.RateLimitError) as caught:
            sdk.messages.create(
                model="sim", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
            )
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_upstream_errors_keep_anthropics_types(client: anthropic.Anthropic) -> None:
    """An overloaded Claude upstream: 529 overloaded_error before the answer, an error event
    within it (the SDK raises either way)."""
    with pytest.raises(anthropic.APIStatusError) as before:
        client.messages.create(
            model="claude",
            max_tokens=20,
            messages=[{"role": "user", "content": "[[fault:529]] hi"}],
        )
    assert before.value.status_code == 529
    assert before.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    texts: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as within,
        client.messages.stream(
            model="claude",
            max_tokens=20,
            messages=[{"role": "user", "content": "[[fault:error:2]] a b c"}],
        ) as stream,
    ):
        texts.extend(stream.text_stream)
    assert texts == ["Echo:", " a"]
    assert "overloaded_error" in str(within.value)


# -- billing, cancel, resume -----------------------------------------------------------------


def test_priced_message_is_billed_once(gateway: GatewayServer) -> None:
    """One ledger row per answer (api messages, transport json / sse), its usage and cost."""
    key_id, key = create_key(gateway, credits_usd="1")
    with anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0) as sdk:
        message = sdk.messages.create(
            model="priced-sim", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
        with sdk.messages.stream(
            model="priced-sim", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            streamed = stream.get_final_message()
    wait_settled(gateway)
    rows = ledger_rows(gateway, key_id)
    assert [row["transport"] for row in rows] == ["json", "sse"]
    for row, answer in zip(rows, (message, streamed), strict=True):
        assert row["completion_id"] == answer.id and row["api"] == "messages"
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            answer.usage.input_tokens,
            answer.usage.output_tokens,
        )
        assert row["cost_micro"] == 3 * row["prompt_tokens"] + 15 * row["completion_tokens"]
        assert row["status"] == "completed"


def test_a_client_that_leaves_cancels_and_is_billed_once(gateway: GatewayServer) -> None:
    """Closing the stream after a few deltas cancels the generation; one row, for what was sent."""
    key_id, key = create_key(gateway, credits_usd="1")
    with (
        anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0) as sdk,
        sdk.messages.stream(
            model="slow-sim", max_tokens=2000, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        for count, _ in enumerate(stream.text_stream, 1):
            if count == 3:
                break
    wait_settled(gateway)
    (row,) = ledger_rows(gateway, key_id)
    assert row["status"] == "client_disconnected"
    assert 3 <= row["completion_tokens"] < 2000


def test_a_resumable_stream_resumes_after_the_last_event_id(gateway: GatewayServer) -> None:
    """A dropped resumable stream continues from Last-Event-ID: the halves are the whole."""
    body = {
        "model": "sim",
        "max_tokens": 12,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"x-api-key": gateway.api_key}
    url = gateway.base_url + "/v1/messages"
    whole = requests.post(url, json=body, headers=headers).text
    with requests.post(
        url, json=body, headers={**headers, "X-Tokenwire-Resumable": "true"}, stream=True
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        stream_id = response.headers["x-stream-id"]
        first = b""
        for chunk in response.iter_content(chunk_size=None):
            first += chunk
            if b"id: 5\n" in first:
                break
    first = first[: first.index(b"\n\n", first.index(b"id: 5\n")) + 2]
    message = json.loads(first.split(b"data: ", 1)[1].split(b"\n", 1)[0])["message"]
    assert message["id"] == stream_id
    rest = requests.get(
        f"{url}/{message['id']}/stream", headers={**headers, "Last-Event-ID": "5"}
    ).text
    whole_events = [e for e in whole.split("\n\n") if e]
    resumed = [e for e in (first.decode() + rest).split("\n\n") if e]

    def strip(events: list[str]) -> list[str]:
        return [_without_id(e) for e in events]

    assert strip(resumed) == strip(whole_events)


def _without_id(event: str) -> str:
    """An SSE event's text without its ids (each stream has its own) and the retry line that
    starts a resumable stream's first event."""
    lines = [line for line in event.split("\n") if not line.startswith(("id: ", "retry: "))]
    text = "\n".join(lines)
    if '"message_start"' in text:
        start = json.loads(text.split("data: ", 1)[1])
        start["message"]["id"] = "msg_X"
        start["message"]["usage"]["input_tokens"] = 0
        return json.dumps(start)
    return text


def test_an_idempotent_retry_gets_the_same_message(gateway: GatewayServer) -> None:
    """The same Idempotency-Key and body: the same message, one ledger row."""
    key_id, key = create_key(gateway, credits_usd="1")
    with anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0) as sdk:
        answers = [
            sdk.messages.create(
                model="priced-sim",
                max_tokens=5,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"Idempotency-Key": "retry-1"},
            )
            for _ in range(2)
        ]
    assert answers[0].id == answers[1].id and answers[0].content == answers[1].content
    wait_settled(gateway)
    assert len(ledger_rows(gateway, key_id)) == 1


@pytest.mark.local_model
def test_the_local_model_answers_the_messages_api(
    client: anthropic.Anthropic, gateway: GatewayServer
) -> None:
    """The local model: the same greedy text over Messages and Chat Completions."""
    message = client.messages.create(
        model="local",
        max_tokens=8,
        extra_body={"temperature": 0},
        system=SYSTEM,
        messages=[{"role": "user", "content": USER}],
    )
    reference = chat_answer(gateway, "local", max_tokens=8, temperature=0)
    assert message.content[0].text == reference.choices[0].message.content  # type: ignore[union-attr]
    assert message.usage.output_tokens == reference.usage.completion_tokens
    with client.messages.stream(
        model="local",
        max_tokens=8,
        extra_body={"temperature": 0},
        system=SYSTEM,
        messages=[{"role": "user", "content": USER}],
    ) as stream:
        assert "".join(stream.text_stream) == message.content[0].text  # type: ignore[union-attr]
