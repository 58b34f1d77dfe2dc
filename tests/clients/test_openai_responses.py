"""The official ``openai`` Python SDK's Responses API against a live gateway, on every backend.

``client.responses.create`` with and without ``stream=True``, the ``client.responses.stream``
helper, a function-calling round trip, ``previous_response_id`` chaining and WebSocket mode
(``client.responses.connect``), against the in-process simulator (``sim``), the real local
model (``local``), and the Anthropic and Gemini loopback upstreams (``claude-sonnet-4.5``,
``gemini-2.5-flash``): every model is reachable from the Responses API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.responses import Response

from tokenwire.providers.sim import plan
from tokenwire.testing import GatewayServer
from tokenwire.testing_upstreams.anthropic_fake import AnthropicFake
from tokenwire.testing_upstreams.gemini_fake import REPLY_TOKENS, GeminiFakeThread
from tokenwire.wire.responses_request import responses_request_from
from tokenwire.wire.schema import chat_request_from

BACKENDS = ["sim", "local", "claude-sonnet-4.5", "gemini-2.5-flash"]
TOOL_BACKENDS = ["sim", "claude-sonnet-4.5", "gemini-2.5-flash"]  # local cannot call tools
TOOLS: Any = [
    {
        "type": "function",
        "name": "lookup",
        "description": "Look something up.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    }
]
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


class Upstreams:
    """The gateway and the fakes behind it."""

    def __init__(self, gateway: GatewayServer, anthropic: AnthropicFake) -> None:
        self.gateway = gateway
        self.anthropic = anthropic


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    """One gateway serving sim, local, and the Anthropic and Gemini fakes."""
    with AnthropicFake(api_key="test-key") as anthropic, GeminiFakeThread(api_key="k") as gemini:
        overrides = f"""
[providers.anthropic]
kind = "anthropic"
base_url = "{anthropic.base_url}"
api_key_env = "ANTHROPIC_API_KEY"
first_token_timeout_s = 10.0
idle_timeout_s = 10.0

[providers.gemini]
kind = "gemini"
base_url = "{gemini.base_url}"
api_key_env = "GEMINI_API_KEY"
"""
        env = {"ANTHROPIC_API_KEY": "test-key", "GEMINI_API_KEY": "k"}
        with GatewayServer(
            tmp_path_factory.mktemp("responses-sdk"), overrides=overrides, env=env
        ) as gateway:
            yield Upstreams(gateway, anthropic)


@pytest.fixture
def client(upstreams: Upstreams) -> Iterator[openai.OpenAI]:
    gateway = upstreams.gateway
    with openai.OpenAI(
        base_url=gateway.base_url + "/v1", api_key=gateway.api_key, max_retries=0, timeout=120
    ) as sdk:
        yield sdk


def ask(model: str, text: str = "Tell me about streaming gateways", **extra: Any) -> dict[str, Any]:
    """A Responses request: one user turn, a short answer (the local model is slow)."""
    return {
        "model": model,
        "instructions": "Be brief.",
        "input": text,
        "max_output_tokens": 12,
        **extra,
    }


def expected_text(body: dict[str, Any], history: list[dict[str, Any]] | None = None) -> str | None:
    """The exact answer when the backend is deterministic (sim, the fakes); None for local."""
    model = body["model"]
    if model == "sim":
        request = chat_request_from(responses_request_from(body).chat_body(history or []))
        return plan(request).text
    limit = body.get("max_output_tokens")
    if model == "claude-sonnet-4.5":
        words = f"Echo: {body['input']}".split(" ")
        return " ".join(words[:limit])
    if model == "gemini-2.5-flash":
        return "".join(REPLY_TOKENS[:limit])
    return None


def check_response(response: Response, body: dict[str, Any]) -> None:
    """A finished response: id, model, status, one message with the expected text, usage."""
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == body["model"]
    assert response.status in ("completed", "incomplete")
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.output_text.strip()
    text = expected_text(body)
    if text is not None:
        assert response.output_text == text
    assert response.usage is not None and response.usage.input_tokens > 0
    limit = body.get("max_output_tokens") or 16
    assert 0 < response.usage.output_tokens <= limit + 3  # Gemini's thoughts count too
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.instructions == "Be brief."
    assert response.max_output_tokens == body.get("max_output_tokens")


@pytest.mark.parametrize("model", BACKENDS)
def test_create_without_stream(client: openai.OpenAI, model: str) -> None:
    """``responses.create``: one response object with the backend's answer and usage."""
    body = ask(model)
    response = client.responses.create(**body)
    check_response(response, body)
    assert client.responses.retrieve(response.id).output_text == response.output_text


@pytest.mark.parametrize("model", BACKENDS)
def test_create_with_stream(client: openai.OpenAI, model: str) -> None:
    """``stream=True``: OpenAI's events in order, numbered 0, 1, 2…, deltas adding up to the text."""
    body = ask(model)
    events = list(client.responses.create(**body, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response  # type: ignore[union-attr]
    assert deltas == done.text == final.output_text
    check_response(final, body)
    assert events[0].response.id == final.id  # type: ignore[union-attr]


@pytest.mark.parametrize("model", BACKENDS)
def test_stream_helper(client: openai.OpenAI, model: str) -> None:
    """``responses.stream(...)``: the helper's text snapshots and final response agree (the
    helper's final response needs ``response.completed``: room to finish is given)."""
    body = ask(model)
    if model != "local":  # sim and the fakes finish on their own; the local model may not
        del body["max_output_tokens"]
    with client.responses.stream(**body) as stream:
        events = list(stream)
        snapshots = [e.snapshot for e in events if e.type == "response.output_text.delta"]
        if events[-1].type == "response.incomplete":  # the local model may talk longer
            assert model == "local"
            final = events[-1].response
        else:
            final = stream.get_final_response()
    check_response(final, body)
    assert snapshots and snapshots[-1] == final.output_text


@pytest.mark.parametrize("model", TOOL_BACKENDS)
def test_function_call_round_trip(client: openai.OpenAI, model: str) -> None:
    """A forced tool call comes back as a function_call item; its output, chained by
    previous_response_id, gets an answer."""
    first = client.responses.create(
        model=model, input="Rome", tools=TOOLS, tool_choice="required", max_output_tokens=40
    )
    assert first.status == "completed"
    (call,) = first.output
    assert call.type == "function_call" and call.name == "lookup" and call.call_id
    assert isinstance(json.loads(call.arguments), dict)
    second = client.responses.create(
        model=model,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=TOOLS,
        max_output_tokens=12,
    )
    assert second.previous_response_id == first.id
    assert second.status in ("completed", "incomplete") and second.output_text
    if model == "claude-sonnet-4.5":
        assert second.output_text == "Echo: sunny"  # the fake echoes the tool result


def test_function_call_items_as_input_reach_the_local_model(client: openai.OpenAI) -> None:
    """The local model cannot call tools, but a conversation holding a call and its output
    (sent as input items) is answered."""
    response = client.responses.create(
        model="local",
        input=[
            {"role": "user", "content": "What is the weather in Rome?"},
            {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ],
        max_output_tokens=8,
    )
    assert response.status in ("completed", "incomplete") and response.output_text.strip()
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="local", input="x", tools=TOOLS, tool_choice="required")
    assert refused.value.body["param"] == "tool_choice"  # type: ignore[index]


@pytest.mark.parametrize("model", BACKENDS)
def test_previous_response_id_chains_the_conversation(
    client: openai.OpenAI, upstreams: Upstreams, model: str
) -> None:
    """A chained response continues the stored conversation: the upstream gets every turn."""
    first = client.responses.create(**ask(model, "First question"))
    second = client.responses.create(**ask(model, "Second question"), previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    if model == "sim":
        history = [
            {"role": "user", "content": "First question"},
            {"role": "assistant", "content": first.output_text},
        ]
        body = ask(model, "Second question", previous_response_id=first.id)
        assert second.output_text == expected_text(body, history)
    if model == "claude-sonnet-4.5":
        turns = upstreams.anthropic.requests[-1].body["messages"]
        assert [turn["role"] for turn in turns] == ["user", "assistant", "user"]
        assert upstreams.anthropic.requests[-1].body["system"] == "Be brief."
    third = client.responses.create(**ask(model, "Third"), previous_response_id=second.id)
    assert third.usage is not None and third.usage.input_tokens > second.usage.input_tokens


@pytest.mark.parametrize("model", BACKENDS)
def test_websocket_mode(upstreams: Upstreams, model: str) -> None:
    """``responses.connect()``: the same events over WebSocket, chaining with store=false
    (the socket remembers), and an error event for an unknown model."""
    gateway = upstreams.gateway

    async def session() -> list[Any]:
        async with (
            openai.AsyncOpenAI(
                base_url=gateway.base_url + "/v1", api_key=gateway.api_key, max_retries=0
            ) as sdk,
            sdk.responses.connect() as connection,
        ):
            results: list[Any] = []
            for text, previous in (("Hello over a socket", None), ("And again", "first")):
                extra = {} if previous is None else {"previous_response_id": results[0].id}
                await connection.response.create(**ask(model, text), store=False, **extra)
                async for event in connection:
                    if event.type in TERMINAL:
                        results.append(event.response)  # type: ignore[union-attr]
                        break
            await connection.response.create(model="no-such-model", input="x")
            async for event in connection:
                results.append(event)
                break
            return results

    first, second, error = asyncio.run(session())
    check_response(first, ask(model, "Hello over a socket"))
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens
    assert error.type == "error" and error.status == 404
    assert error.error.code == "model_not_found" and error.error.param == "model"


def test_resumable_stream_resumed_with_retrieve(client: openai.OpenAI) -> None:
    """A resumable stream (its retry line included) reads in the SDK, and
    ``responses.retrieve(id, stream=True, starting_after=N)`` gives the events after N."""
    events = list(
        client.responses.create(
            model="sim",
            input="resume me",
            stream=True,
            extra_headers={"X-Tokenwire-Resumable": "true"},
        )
    )
    response_id = events[0].response.id  # type: ignore[union-attr]
    again = list(client.responses.retrieve(response_id, stream=True, starting_after=5))
    assert [e.model_dump() for e in again] == [e.model_dump() for e in events[6:]]
