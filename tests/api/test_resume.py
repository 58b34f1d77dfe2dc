"""Resumable streams: cut a stream anywhere, resume it over SSE or WebSocket, billed once."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from websockets.asyncio.client import connect

from tokenwire.accounting.ledger import Ledger, LedgerRow
from tokenwire.app import build_state, close_state
from tokenwire.config import load_settings
from tokenwire.providers.sim import plan
from tokenwire.storage.engine import make_engine
from tokenwire.streams.memory_store import MemoryStreamStore
from tokenwire.testing import GatewayServer, SimUpstreamServer, priced_model
from tokenwire.wire.schema import decode_chat_request

OVERRIDES = """
[server]
stream_grace_s = 30.0
stream_retention_s = 300.0

[providers.sim]
kind = "sim"
ttft_ms = 0.0
itl_ms = 2.0
""" + priced_model()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    with GatewayServer(Path(tmp_path_factory.mktemp("resume")), overrides=OVERRIDES) as server:
        yield server


def chat(content: str, tokens: int = 40, model: str = "sim") -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": content}],
    }


def expected_text(body: dict[str, Any]) -> str:
    return plan(decode_chat_request(json.dumps(body).encode())).text


def raw_sse(
    gateway: GatewayServer,
    path: str,
    payload: bytes | None,
    headers: dict[str, str],
    cut_after: int | None,
) -> tuple[list[tuple[int, dict[str, Any]]], bool, str]:
    """Read a stream over a raw socket; close it after ``cut_after`` events (None: to the end).

    Returns (events as (id, chunk)), whether [DONE] arrived, and the X-Stream-Id header.
    """
    method = "POST" if payload is not None else "GET"
    head = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {headers.pop('key')}",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if payload is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + (payload or b""))
    buffer = b""
    events: list[tuple[int, dict[str, Any]]] = []
    done = False
    stream_id = ""
    try:
        while not done and (cut_after is None or len(events) < cut_after):
            data = sock.recv(65536)
            if not data:
                break
            buffer += data
            if not stream_id and b"\r\n\r\n" in buffer:
                header_block = buffer.split(b"\r\n\r\n", 1)[0].decode()
                for line in header_block.split("\r\n"):
                    if line.lower().startswith("x-stream-id:"):
                        stream_id = line.split(":", 1)[1].strip()
            while b"\n\n" in buffer.split(b"\r\n\r\n", 1)[-1]:
                head_part, _, body = buffer.partition(b"\r\n\r\n")
                frame, _, rest = body.partition(b"\n\n")
                buffer = head_part + b"\r\n\r\n" + rest
                lines = frame.decode().split("\n")
                # chunked encoding adds size lines; keep only SSE fields
                fields = [line for line in lines if line.startswith(("id: ", "data: "))]
                event_id = next((int(f[4:]) for f in fields if f.startswith("id: ")), None)
                data_line = next((f[6:] for f in fields if f.startswith("data: ")), None)
                if data_line == "[DONE]":
                    done = True
                    break
                if data_line is not None and event_id is not None:
                    events.append((event_id, json.loads(data_line)))
                    if cut_after is not None and len(events) >= cut_after:
                        break
    finally:
        sock.close()
    return events, done, stream_id


def text_of(events: list[tuple[int, dict[str, Any]]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content", "") for _, c in events if c.get("choices")
    )


async def ledger_rows(gateway: GatewayServer) -> list[LedgerRow]:
    engine = make_engine(gateway.settings.database_url)
    try:
        return await Ledger(engine).rows(limit=100_000)
    finally:
        await engine.dispose()


async def wait_settled(gateway: GatewayServer) -> None:
    deadline = time.monotonic() + 20
    while gateway.state.completions.live and time.monotonic() < deadline:  # noqa: ASYNC110 - another thread's state
        await asyncio.sleep(0.02)
    assert gateway.state.completions.live == {}


def test_sse_cut_and_resumed_with_last_event_id_is_complete(gateway: GatewayServer) -> None:
    """A resumable SSE stream cut after 5 events, resumed with Last-Event-ID, has every event once."""
    body = chat("resume me over sse", 60)
    first, done, stream_id = raw_sse(
        gateway,
        "/v1/chat/completions",
        json.dumps(body).encode(),
        {"key": gateway.api_key, "X-Tokenwire-Resumable": "true"},
        cut_after=5,
    )
    assert not done and stream_id and len(first) == 5
    rest, done, _ = raw_sse(
        gateway,
        f"/v1/chat/completions/{stream_id}/stream",
        None,
        {"key": gateway.api_key, "Last-Event-ID": str(first[-1][0])},
        cut_after=None,
    )
    assert done
    ids = [i for i, _ in first + rest]
    assert ids == list(range(1, len(ids) + 1))  # nothing missing, nothing twice
    assert text_of(first + rest) == expected_text(body)
    assert rest[-1][1]["usage"]["completion_tokens"] == 60


def test_resume_with_query_cursor_and_twice(gateway: GatewayServer) -> None:
    """starting_after works like Last-Event-ID, and a stream can be resumed more than once."""
    body = chat("resume twice", 50)
    a, _, stream_id = raw_sse(
        gateway,
        "/v1/chat/completions",
        json.dumps(body).encode(),
        {"key": gateway.api_key, "X-Tokenwire-Resumable": "1"},
        cut_after=3,
    )
    b, _, _ = raw_sse(
        gateway,
        f"/v1/chat/completions/{stream_id}/stream?starting_after={a[-1][0]}",
        None,
        {"key": gateway.api_key},
        cut_after=7,
    )
    c, done, _ = raw_sse(
        gateway,
        f"/v1/chat/completions/{stream_id}/stream?starting_after={b[-1][0]}",
        None,
        {"key": gateway.api_key},
        cut_after=None,
    )
    assert done
    assert [i for i, _ in a + b + c] == list(range(1, len(a + b + c) + 1))
    assert text_of(a + b + c) == expected_text(body)


def test_resume_errors(gateway: GatewayServer, tmp_path: Path) -> None:
    """Another key, an unknown id, a bad cursor and a cursor past the end get clear 4xx errors."""
    body = chat("errors", 5)
    events, done, stream_id = raw_sse(
        gateway,
        "/v1/chat/completions",
        json.dumps(body).encode(),
        {"key": gateway.api_key, "X-Tokenwire-Resumable": "1"},
        cut_after=None,
    )
    assert done
    url = f"{gateway.base_url}/v1/chat/completions/{stream_id}/stream"
    other = requests.get(url, headers={"Authorization": f"Bearer {gateway.admin_key}"}, timeout=10)
    assert other.status_code == 404 and other.json()["error"]["code"] == "stream_not_found"
    unknown = requests.get(
        f"{gateway.base_url}/v1/chat/completions/chatcmpl-nope/stream",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        timeout=10,
    )
    assert unknown.status_code == 404
    past = requests.get(
        url + "?starting_after=9999",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        timeout=10,
    )
    assert past.status_code == 410 and past.json()["error"]["code"] == "cursor_out_of_range"
    bad = requests.get(
        url,
        headers={"Authorization": f"Bearer {gateway.api_key}", "Last-Event-ID": "x"},
        timeout=10,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
    finished = requests.get(
        url + f"?starting_after={events[-1][0]}",
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        timeout=10,
    )
    assert finished.status_code == 200 and finished.text.strip().endswith("data: [DONE]")


def test_after_retention_a_stream_is_gone(tmp_path: Path) -> None:
    """Once its retention has passed, resuming a finished stream answers 410."""
    overrides = OVERRIDES.replace("stream_retention_s = 300.0", "stream_retention_s = 0.0")
    with GatewayServer(tmp_path, overrides=overrides) as short:
        _, done, stream_id = raw_sse(
            short,
            "/v1/chat/completions",
            json.dumps(chat("gone", 3)).encode(),
            {"key": short.api_key, "X-Tokenwire-Resumable": "1"},
            cut_after=None,
        )
        assert done
        deadline = time.monotonic() + 10  # the stream is kept at least until it has settled
        while short.state.completions.live and time.monotonic() < deadline:
            time.sleep(0.01)
        response = requests.get(
            f"{short.base_url}/v1/chat/completions/{stream_id}/stream",
            headers={"Authorization": f"Bearer {short.api_key}"},
            timeout=10,
        )
        assert response.status_code == 410 and response.json()["error"]["code"] == "stream_expired"


async def test_websocket_resume_on_a_new_socket(gateway: GatewayServer) -> None:
    """A resumable WS stream cut after a few chunks continues on another socket, nothing lost or repeated."""
    url = "ws" + gateway.base_url.removeprefix("http") + "/v1/ws/chat"
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    body = chat("resume me over ws", 60)
    seen: list[dict[str, Any]] = []
    async with connect(url, additional_headers=headers) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "chat.completion.create",
                    "request_id": "a",
                    "body": body,
                    "resumable": True,
                }
            )
        )
        while len(seen) < 4:
            seen.append(json.loads(await ws.recv()))
    stream_id = seen[0]["id"]
    async with connect(url, additional_headers=headers) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "chat.completion.resume",
                    "stream_id": stream_id,
                    "starting_after": seen[-1]["sequence_number"],
                }
            )
        )
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == "chat.completion.done":
                done = message
                break
            seen.append(message)
    numbers = [m["sequence_number"] for m in seen]
    assert numbers == sorted(set(numbers))
    text = "".join(m["choices"][0]["delta"].get("content", "") for m in seen if m["choices"])
    assert text == expected_text(body)
    assert done["request_id"] == stream_id and done["usage"]["completion_tokens"] == 60


async def test_idempotency_key_with_the_openai_sdk_runs_and_bills_once(
    gateway: GatewayServer,
) -> None:
    """The same Idempotency-Key sent twice by the openai SDK yields one generation and one charge."""
    client = openai.AsyncOpenAI(
        base_url=gateway.base_url + "/v1", api_key=gateway.api_key, max_retries=0
    )
    extra = {"Idempotency-Key": "order-42"}
    messages = [{"role": "user", "content": "charge me once"}]
    first = await client.chat.completions.create(
        model="priced-sim", messages=messages, max_tokens=20, extra_headers=extra
    )  # type: ignore[arg-type]
    second = await client.chat.completions.create(
        model="priced-sim", messages=messages, max_tokens=20, extra_headers=extra
    )  # type: ignore[arg-type]
    assert first.id == second.id
    assert first.choices[0].message.content == second.choices[0].message.content
    await wait_settled(gateway)
    deadline = time.monotonic() + 10
    rows = [r for r in await ledger_rows(gateway) if r.completion_id == first.id]
    while not rows and time.monotonic() < deadline:
        rows = [r for r in await ledger_rows(gateway) if r.completion_id == first.id]
    assert len(rows) == 1 and rows[0].charge_micro > 0
    with pytest.raises(openai.APIStatusError) as conflict:
        await client.chat.completions.create(
            model="priced-sim",
            messages=[{"role": "user", "content": "other"}],
            max_tokens=20,
            extra_headers=extra,
        )  # type: ignore[arg-type]
    assert conflict.value.status_code == 409
    await client.close()


def test_a_resumable_stream_without_reader_is_cancelled_after_the_grace_window(
    tmp_path: Path,
) -> None:
    """Nobody resumes: after stream_grace_s the upstream request is closed, billed for what was made."""
    with SimUpstreamServer(ttft_ms=0, itl_ms=20) as upstream:
        overrides = f"""
[server]
stream_grace_s = 0.5

[providers.upstream]
kind = "openai"
base_url = "{upstream.base_url}/v1"

[[models]]
id = "proxied-sim"
provider = "upstream"
upstream_model = "sim"
"""
        with GatewayServer(tmp_path, overrides=overrides) as gw:
            body = chat("abandoned", 1000, model="proxied-sim")
            _events, _, _stream_id = raw_sse(
                gw,
                "/v1/chat/completions",
                json.dumps(body).encode(),
                {"key": gw.api_key, "X-Tokenwire-Resumable": "1"},
                cut_after=2,
            )
            cut_at = time.monotonic()
            stats = lambda: requests.get(upstream.base_url + "/sim/stats", timeout=5).json()  # noqa: E731
            assert stats()["active_streams"] == 1  # still generating during the grace window
            deadline = cut_at + 5
            while stats()["cancelled_streams"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert stats()["cancelled_streams"] == 1
            assert time.monotonic() - cut_at >= 0.5
            rows = asyncio.run(ledger_rows(gw))
            deadline = time.monotonic() + 5
            while not rows and time.monotonic() < deadline:
                rows = asyncio.run(ledger_rows(gw))
            assert len(rows) == 1 and rows[0].status == "client_disconnected"
            assert 2 <= rows[0].completion_tokens < 1000


class _StallingStore(MemoryStreamStore):
    """A store whose ``add`` waits for ever (a slow shared store), telling when it is entered."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()

    async def add(self, generation: Any, idempotency_key: str | None) -> None:
        self.entered.set()
        await asyncio.Event().wait()


async def test_a_client_gone_while_its_resumable_stream_registers_is_settled_once(
    tmp_path: Path,
) -> None:
    """The request is cancelled while the store registers the stream: the generation still runs its settle (one ledger row, client_disconnected) and leaves ``live``, so nothing stays reserved."""
    settings = load_settings(data_dir=tmp_path, overrides=OVERRIDES)
    state = await build_state(settings)
    try:
        record, _ = await state.keys.create("t", grant_micro=10_000_000)
        store = _StallingStore()
        state.completions.streams = store
        body = chat("register me", 20, model="priced-sim")
        request = decode_chat_request(json.dumps(body).encode())
        start = asyncio.create_task(
            state.completions.start(record, request, body, "sse", resumable=True)
        )
        await store.entered.wait()
        (generation,) = state.completions.live.values()
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        await asyncio.wait_for(generation.wait_settled(), 10)
        assert state.completions.live == {}
        await state.completions.shutdown()  # flushes the batched ledger writer
        rows = await state.ledger.rows(key_id=record.id)
        assert [(r.completion_id, r.status) for r in rows] == [
            (generation.id, "client_disconnected")
        ]
        assert await state.ledger.balance(record.id) == 10_000_000 - rows[0].charge_micro
    finally:
        await asyncio.wait_for(close_state(state), 30)  # a never-started generation would hang it


def test_cancel_stops_a_resumable_sse_stream(gateway: GatewayServer) -> None:
    """POST .../cancel ends a running resumable stream with finish_reason cancelled, the usage so far and [DONE]; billed as cancelled."""
    key = {"Authorization": f"Bearer {gateway.api_key}"}
    body = chat("cancel me over http", tokens=20_000)
    with requests.post(
        gateway.base_url + "/v1/chat/completions",
        headers={**key, "X-Tokenwire-Resumable": "true"},
        json=body,
        stream=True,
        timeout=30,
    ) as response:
        assert response.status_code == 200
        stream_id = response.headers["x-stream-id"]
        lines = response.iter_lines(decode_unicode=True)
        chunks: list[dict[str, Any]] = []
        for line in lines:
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
            if len(chunks) == 3:
                break
        cancel = requests.post(
            f"{gateway.base_url}/v1/chat/completions/{stream_id}/cancel", headers=key, timeout=10
        )
        assert cancel.status_code == 200
        assert cancel.json() == {
            "object": "chat.completion.cancel",
            "id": stream_id,
            "already_ended": False,
        }
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    tail = [json.loads(data) for data in rest[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in tail if c["choices"]]
    assert finishes[-1] == "cancelled"
    generated = text_of([(0, c) for c in chunks + tail])
    assert 0 < len(generated) < len(expected_text(body))
    assert tail[-1]["usage"]["completion_tokens"] < 20_000
    again = requests.post(
        f"{gateway.base_url}/v1/chat/completions/{stream_id}/cancel", headers=key, timeout=10
    )
    assert again.status_code == 200 and again.json()["already_ended"] is True
    deadline = time.monotonic() + 10
    while True:  # the ledger writer batches: the row lands within moments
        statuses = [
            r.status for r in asyncio.run(ledger_rows(gateway)) if r.completion_id == stream_id
        ]
        if statuses or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert statuses == ["cancelled"]


def test_cancel_is_refused_for_unknown_foreign_and_plain_streams(gateway: GatewayServer) -> None:
    """Cancel answers 404 for an unknown id, another key's stream and a stream that is not resumable, and 401 without a key."""
    own = {"Authorization": f"Bearer {gateway.api_key}"}
    resumable = requests.post(
        gateway.base_url + "/v1/chat/completions",
        headers={**own, "X-Tokenwire-Resumable": "true"},
        json=chat("mine only", tokens=5),
        timeout=10,
    )
    plain = requests.post(
        gateway.base_url + "/v1/chat/completions",
        headers=own,
        json=chat("plain", tokens=5),
        timeout=10,
    )
    other = {"Authorization": f"Bearer {gateway.admin_key}"}
    for headers, stream_id in [
        (own, "chatcmpl-unknown"),
        (other, resumable.headers["x-stream-id"]),
        (own, plain.headers["x-stream-id"]),
    ]:
        response = requests.post(
            f"{gateway.base_url}/v1/chat/completions/{stream_id}/cancel",
            headers=headers,
            timeout=10,
        )
        assert response.status_code == 404, stream_id
        assert response.json()["error"]["code"] == "stream_not_found"
    response = requests.post(
        f"{gateway.base_url}/v1/chat/completions/{resumable.headers['x-stream-id']}/cancel",
        timeout=10,
    )
    assert response.status_code == 401
