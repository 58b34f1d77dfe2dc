"""SSE behaviour over real HTTP: heartbeats, in-band errors after the 200, errors before it;
and, on a recorded ASGI ``send``, how a stream's events are grouped into messages."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message

from tokenwire.api.sse_stream import SSEStream
from tokenwire.streams.events import Event, Finish, TextDelta, Usage
from tokenwire.testing import GatewayServer, ServerThread

GOOD = {
    "id": "u",
    "object": "chat.completion.chunk",
    "choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}],
}


async def flaky(request: Request) -> Response:
    """Upstream whose behaviour depends on the user's message."""
    body = await request.json()
    mode = body["messages"][-1]["content"]
    if mode == "rate-limited":
        return JSONResponse(
            {
                "error": {
                    "message": "slow down",
                    "type": "rate_limit_error",
                    "code": "rate_limit_exceeded",
                }
            },
            status_code=429,
            headers={"Retry-After": "3"},
        )

    async def stream() -> AsyncIterator[bytes]:
        yield b"data: " + json.dumps(GOOD).encode() + b"\n\n"
        yield b"data: {this is not json\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def flaky_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    with ServerThread(
        Starlette(routes=[Route("/v1/chat/completions", flaky, methods=["POST"])])
    ) as up:
        overrides = f"""
[server]
sse_heartbeat_s = 0.05

[routing]
max_attempts = 1  # these tests see each upstream failure as it is, without retries

[providers.sim]
kind = "sim"
ttft_ms = 400.0
itl_ms = 1.0

[providers.slow]
kind = "sim"
ttft_ms = 0.0
itl_ms = 200.0

[[models]]
id = "slow-sim"
provider = "slow"

[providers.flaky]
kind = "openai"
base_url = "{up.base_url}/v1"

[[models]]
id = "flaky"
provider = "flaky"
"""
        with GatewayServer(tmp_path_factory.mktemp("flaky"), overrides=overrides) as gateway:
            yield gateway


def post(gateway: GatewayServer, model: str, content: str) -> requests.Response:
    return requests.post(
        gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        json={"model": model, "messages": [{"role": "user", "content": content}], "stream": True},
        stream=True,
        timeout=10,
    )


def test_heartbeat_comments_while_waiting_for_the_first_token(flaky_gateway: GatewayServer) -> None:
    """With no event for sse_heartbeat_s, the stream carries ': ping' comments, then the data."""
    response = post(flaky_gateway, "sim", "hello")
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    first_field = next(i for i, line in enumerate(lines) if not line.startswith(":"))
    assert first_field > 0
    assert all(line == ": ping" for line in lines[:first_field])
    assert lines[first_field] == "id: 1"
    assert lines[-1] == "data: [DONE]"


def test_heartbeat_comments_between_tokens(flaky_gateway: GatewayServer) -> None:
    """Tokens 200 ms apart with sse_heartbeat_s = 0.05: ': ping' comments come between them
    too, not only before the first, and every token arrives once, then [DONE]."""
    response = requests.post(
        flaky_gateway.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {flaky_gateway.api_key}"},
        json={
            "model": "slow-sim",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "hello"}],
            "stream": True,
        },
        stream=True,
        timeout=10,
    )
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    data = [i for i, line in enumerate(lines) if line.startswith("data: {")]
    contents = [json.loads(lines[i][6:])["choices"][0]["delta"].get("content") for i in data]
    assert len([c for c in contents if c]) == 3
    assert ": ping" in lines[data[0] : data[1]]
    assert ": ping" in lines[data[1] : data[2]]
    assert lines[-1] == "data: [DONE]"


def test_error_after_first_token_is_in_band_then_done(flaky_gateway: GatewayServer) -> None:
    """A failure mid-stream becomes data: {"error": …} with its status, then data: [DONE]."""
    response = post(flaky_gateway, "flaky", "break")
    assert response.status_code == 200
    data = [
        line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")
    ]
    assert json.loads(data[0])["choices"][0]["delta"]["content"] == "partial"
    error = json.loads(data[1])["error"]
    assert error["status"] == 502 and error["code"] == "upstream_error"
    assert "'flaky'" in error["message"]
    assert data[2:] == ["[DONE]"]


def test_error_before_first_token_keeps_http_status(flaky_gateway: GatewayServer) -> None:
    """An upstream 429 before any token reaches the client as a 429 with Retry-After."""
    response = post(flaky_gateway, "flaky", "rate-limited")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


def test_stream_id_header_matches_chunk_ids(flaky_gateway: GatewayServer) -> None:
    """X-Stream-Id is the completion id every chunk carries; SSE ids count up from 1."""
    response = post(flaky_gateway, "sim", "ids")
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    ids = [int(line[4:]) for line in lines if line.startswith("id: ")]
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert ids == list(range(1, len(ids) + 1))
    assert {c["id"] for c in chunks} == {response.headers["x-stream-id"]}


class Frames:
    """A FrameEncoder whose frames name what they stand for."""

    def start(self, out: list[bytes]) -> None:
        out.append(b"start;")

    def event(self, event: Event, number: int, out: list[bytes]) -> None:
        out.append(b"%s %d;" % (type(event).__name__.encode(), number))

    def ping(self, out: list[bytes]) -> None:
        out.append(b"ping;")

    def end(self, out: list[bytes]) -> None:
        out.append(b"[DONE];")


async def sent_messages(batches: list[list[Event]]) -> tuple[list[Message], list[str]]:
    """What an SSEStream over a log read as ``batches`` sends, and what its reader saw
    (``closed`` once the stream let go of it)."""
    reader: list[str] = []

    async def read(*, after: int, heartbeat_s: float) -> AsyncGenerator[list[Event] | None, None]:
        try:
            for batch in batches:
                yield batch
            reader.append("exhausted")
        finally:
            reader.append("closed")

    source: Any = SimpleNamespace(id="s1", response_headers={}, read=read)
    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(dict(message))

    async def receive() -> Message:
        raise AssertionError("the stream has no reason to read the request")

    await SSEStream(source, Frames(), heartbeat_s=15)({"type": "http"}, receive, send)
    return messages, reader


def bodies(messages: list[Message]) -> list[tuple[bytes, bool]]:
    return [(m["body"], m["more_body"]) for m in messages if m["type"] == "http.response.body"]


async def test_the_batch_with_the_last_event_goes_with_done_in_the_final_message() -> None:
    """The log's last event (usage) is in the message that ends the response, with [DONE]:
    one write for the end instead of two."""
    messages, reader = await sent_messages(
        [[TextDelta("a")], [TextDelta("b"), Finish("stop"), Usage(1, 2)]]
    )
    assert messages[0]["type"] == "http.response.start"
    assert bodies(messages) == [
        (b"start;TextDelta 1;", True),
        (b"TextDelta 2;Finish 3;Usage 4;[DONE];", False),
    ]
    assert reader == ["closed"]  # let go at the last event, not read to its end


async def test_a_whole_answer_in_the_first_batch_is_one_message() -> None:
    """Everything already in the log when the stream starts: the head's one body message."""
    messages, _ = await sent_messages([[TextDelta("a"), Finish("stop"), Usage(1, 1)]])
    assert bodies(messages) == [(b"start;TextDelta 1;Finish 2;Usage 3;[DONE];", False)]


async def test_a_log_that_ends_without_its_last_event_still_ends_with_done() -> None:
    """A reader that stops before a last event (a remote stream found ended) gets [DONE] in
    a message of its own."""
    messages, reader = await sent_messages([[TextDelta("a")], [TextDelta("b")]])
    assert bodies(messages) == [
        (b"start;TextDelta 1;", True),
        (b"TextDelta 2;", True),
        (b"[DONE];", False),
    ]
    assert reader == ["exhausted", "closed"]
