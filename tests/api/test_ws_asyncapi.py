"""Real ``/v1/ws/chat`` traffic checked against ``docs/websocket-asyncapi.yaml``.

The AsyncAPI document is loaded with PyYAML and its message payload schemas are compiled with
``jsonschema`` (Draft 2020-12); local ``$ref``s (``#/components/...``) resolve through a
``referencing`` registry holding the whole document. A live gateway is then driven through
every documented exchange (compatible mode with ``[DONE]``, a compatible error, envelope
``create`` with usage, tool calls, ``cancel``, ``resume``, a bad request, ``ping``/``pong``,
``auth``/``auth.ok``, and a drain: ``session.closing``, a refused request and a stream ended
with ``server_shutting_down``), and every message either side sent is validated against the payload
schemas of its direction: the operation with ``action: receive`` lists what the client sends,
``action: send`` what the server sends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from websockets.asyncio.client import ClientConnection, connect

from tokenwire.testing import GatewayServer, paced_sim

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "websocket-asyncapi.yaml"
BASE_URI = "urn:tokenwire:websocket-asyncapi"
CLIENT, SERVER = "client", "server"
RECV_TIMEOUT_S = 10.0

CLIENT_MESSAGES = {"compatibleRequest", "create", "cancel", "resume", "ping", "auth"}
SERVER_MESSAGES = {
    "compatibleChunk",
    "compatibleError",
    "done",
    "envelopeChunk",
    "completionDone",
    "error",
    "pong",
    "authOk",
    "sessionClosing",
}


# -- the document ----------------------------------------------------------------------------


def load_spec() -> dict[str, Any]:
    spec = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    assert isinstance(spec, dict)
    return spec


def resolve_pointer(document: dict[str, Any], ref: str) -> Any:
    """The value a local reference (``#/a/b``, RFC 6901 escapes) points at."""
    assert ref.startswith("#/"), f"not a local reference: {ref}"
    node: Any = document
    for token in ref[2:].split("/"):
        key = token.replace("~1", "/").replace("~0", "~")
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def follow(document: dict[str, Any], ref: str) -> tuple[str, dict[str, Any]]:
    """Follow a chain of ``$ref``-only objects; the final pointer and object."""
    seen = set()
    node = resolve_pointer(document, ref)
    while isinstance(node, dict) and set(node) == {"$ref"}:
        assert ref not in seen, f"reference cycle at {ref}"
        seen.add(ref)
        ref = node["$ref"]
        node = resolve_pointer(document, ref)
    assert isinstance(node, dict), ref
    return ref, node


def all_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from all_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_refs(item)


@dataclass(frozen=True)
class DocumentedMessage:
    name: str  # the key in the channel's ``messages`` map
    pointer: str  # where the message object lives (after following references)
    content_type: str
    validator: Draft202012Validator


def documented_messages(spec: dict[str, Any]) -> dict[str, dict[str, DocumentedMessage]]:
    """Each direction's messages, from the operations, with a validator for each payload."""
    registry: Registry[Any] = Registry().with_resource(
        BASE_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    directions = {"receive": CLIENT, "send": SERVER}
    result: dict[str, dict[str, DocumentedMessage]] = {CLIENT: {}, SERVER: {}}
    for name, operation in spec["operations"].items():
        direction = directions[operation["action"]]
        _, channel = follow(spec, operation["channel"]["$ref"])
        assert channel["address"] == "/v1/ws/chat", name
        for entry in operation["messages"]:
            channel_ref = entry["$ref"]
            assert channel_ref.startswith("#/channels/chat/messages/"), channel_ref
            message_name = channel_ref.rsplit("/", 1)[1]
            pointer, message = follow(spec, channel_ref)
            assert "payload" in message, pointer
            Draft202012Validator.check_schema(message["payload"])
            validator = Draft202012Validator(
                {"$ref": f"{BASE_URI}{pointer}/payload"}, registry=registry
            )
            content_type = message.get("contentType", spec["defaultContentType"])
            result[direction][message_name] = DocumentedMessage(
                message_name, pointer, content_type, validator
            )
    return result


SPEC = load_spec()
MESSAGES = documented_messages(SPEC)


def matching(direction: str, instance: Any) -> list[str]:
    """The names of the documented messages of ``direction`` whose payload ``instance`` fits."""
    return sorted(n for n, m in MESSAGES[direction].items() if m.validator.is_valid(instance))


def test_document_is_asyncapi_3_for_the_chat_channel() -> None:
    assert str(SPEC["asyncapi"]).startswith("3.0.")
    assert SPEC["channels"]["chat"]["address"] == "/v1/ws/chat"
    assert SPEC["defaultContentType"] == "application/json"
    for ref in all_refs(SPEC):  # every reference in the document resolves
        assert resolve_pointer(SPEC, ref) is not None, ref
    channel_messages = set(SPEC["channels"]["chat"]["messages"])
    assert set(MESSAGES[CLIENT]) == CLIENT_MESSAGES
    assert set(MESSAGES[SERVER]) == SERVER_MESSAGES
    assert channel_messages == CLIENT_MESSAGES | SERVER_MESSAGES
    assert MESSAGES[SERVER]["done"].content_type == "text/plain"


# -- the traffic -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    direction: str
    label: str  # the documented message this one is, by the protocol's context
    payload: Any  # the parsed JSON, or the text itself when it is not JSON
    is_json: bool


class Conversation:
    """Sends and receives on sockets, recording every message with its expected label."""

    def __init__(self) -> None:
        self.log: list[Message] = []

    async def send(self, ws: ClientConnection, label: str, payload: dict[str, Any]) -> None:
        self.log.append(Message(CLIENT, label, payload, True))
        await ws.send(json.dumps(payload))

    async def receive(self, ws: ClientConnection, *, compatible: bool = False) -> Message:
        text = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
        assert isinstance(text, str), "binary frame from the server"
        try:
            payload, is_json = json.loads(text), True
        except json.JSONDecodeError:
            payload, is_json = text, False
        if not is_json:
            label = "done"
        elif compatible:
            label = "compatibleError" if "error" in payload else "compatibleChunk"
        else:
            label = {
                "chat.completion.chunk": "envelopeChunk",
                "chat.completion.done": "completionDone",
                "error": "error",
                "pong": "pong",
                "auth.ok": "authOk",
                "session.closing": "sessionClosing",
            }.get(payload.get("type"), f"unexpected {payload.get('type')!r}")
        message = Message(SERVER, label, payload, is_json)
        self.log.append(message)
        return message

    async def compatible(self, ws: ClientConnection, body: dict[str, Any]) -> None:
        await self.send(ws, "compatibleRequest", body)
        while (await self.receive(ws, compatible=True)).label != "done":
            pass

    async def until_end(self, ws: ClientConnection, request_id: str, cancel: bool = False) -> str:
        """Read one envelope request to its ``done`` or ``error``; the label it ended with."""
        chunks = 0
        while True:
            message = await self.receive(ws)
            assert message.payload.get("request_id") == request_id, message
            if message.label != "envelopeChunk":
                return message.label
            chunks += 1
            if cancel and chunks == 1:
                cancel_message = {"type": "chat.completion.cancel", "request_id": request_id}
                await self.send(ws, "cancel", cancel_message)


def _ws_url(gateway: GatewayServer) -> str:
    return gateway.base_url.replace("http://", "ws://") + "/v1/ws/chat"


def _chat(**extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Check the AsyncAPI document"}]
    return {"model": "sim", "messages": messages, "stream": True, **extra}


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
USAGE = {"stream_options": {"include_usage": True}}


async def converse(gateway: GatewayServer) -> list[Message]:
    """Every documented exchange against a live gateway."""
    talk = Conversation()
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    async with connect(_ws_url(gateway), additional_headers=headers) as ws:
        await talk.compatible(ws, _chat(**USAGE))
        await talk.compatible(ws, _chat(model="no-such-model"))

        create = {"type": "chat.completion.create", "request_id": "usage", "body": _chat(**USAGE)}
        await talk.send(ws, "create", create)
        assert await talk.until_end(ws, "usage") == "completionDone"

        body = _chat(tools=TOOLS, tool_choice="required")
        await talk.send(
            ws, "create", {"type": "chat.completion.create", "request_id": "tool", "body": body}
        )
        assert await talk.until_end(ws, "tool") == "completionDone"

        body = _chat(max_tokens=-1)
        await talk.send(
            ws, "create", {"type": "chat.completion.create", "request_id": "bad", "body": body}
        )
        assert await talk.until_end(ws, "bad") == "error"

        body = _chat(max_tokens=4000, **USAGE)  # ~4 s: cancelled after its first chunk
        create = {"type": "chat.completion.create", "request_id": "long", "body": body}
        await talk.send(ws, "create", create)
        assert await talk.until_end(ws, "long", cancel=True) == "completionDone"
        assert talk.log[-1].payload["finish_reason"] == "cancelled"

        resume = {
            "type": "chat.completion.resume",
            "stream_id": "chatcmpl-x",
            "starting_after": 3,
            "request_id": "again",
        }
        await talk.send(ws, "resume", resume)
        assert await talk.until_end(ws, "again") == "error"

        await talk.send(ws, "ping", {"type": "ping"})
        assert (await talk.receive(ws)).label == "pong"

    async with connect(_ws_url(gateway)) as ws:  # no Authorization header
        await talk.send(ws, "auth", {"type": "auth", "api_key": gateway.api_key})
        assert (await talk.receive(ws)).label == "authOk"
        await talk.send(ws, "ping", {"type": "ping"})
        assert (await talk.receive(ws)).label == "pong"
    return talk.log


async def converse_during_a_drain(gateway: GatewayServer) -> list[Message]:
    """A drain: session.closing, a create refused with an error, the running request ended."""
    talk = Conversation()
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    async with connect(_ws_url(gateway), additional_headers=headers) as ws:
        body = _chat(model="paced", max_tokens=2000)  # ~40 s: ended by the drain
        await talk.send(
            ws, "create", {"type": "chat.completion.create", "request_id": "long", "body": body}
        )
        assert (await talk.receive(ws)).label == "envelopeChunk"
        gateway.begin_drain()
        while (await talk.receive(ws)).label != "sessionClosing":
            pass
        late = {"type": "chat.completion.create", "request_id": "late", "body": _chat()}
        await talk.send(ws, "create", late)
        ends: dict[str, str] = {}
        while len(ends) < 2:
            message = await talk.receive(ws)
            if message.label != "envelopeChunk":
                ends[message.payload["request_id"]] = message.payload["error"]["code"]
        assert ends == {"late": "server_shutting_down", "long": "server_shutting_down"}
    return talk.log


@pytest.fixture(scope="module")
def traffic(gateway: GatewayServer, tmp_path_factory: pytest.TempPathFactory) -> list[Message]:
    overrides = paced_sim("paced", ttft_ms=0.0, itl_ms=20.0) + "\n[server]\ndrain_timeout_s = 0.5\n"
    overrides += '[[models]]\nid = "paced"\nprovider = "paced"\nupstream_model = "sim"\n'
    with GatewayServer(tmp_path_factory.mktemp("drain"), overrides=overrides) as draining:
        return asyncio.run(converse(gateway)) + asyncio.run(converse_during_a_drain(draining))


def test_traffic_exercises_every_documented_message(traffic: list[Message]) -> None:
    assert {m.label for m in traffic if m.direction == CLIENT} == CLIENT_MESSAGES
    assert {m.label for m in traffic if m.direction == SERVER} == SERVER_MESSAGES


def test_every_message_fits_its_documented_payload(traffic: list[Message]) -> None:
    """Each message validates against the schema of the message it is in the protocol."""
    failures = []
    for message in traffic:
        documented = MESSAGES[message.direction].get(message.label)
        if documented is None:
            failures.append(f"{message.direction} {message.label}: {message.payload!r}")
            continue
        is_json = documented.content_type == "application/json"
        assert message.is_json == is_json, (message, documented.content_type)
        for error in documented.validator.iter_errors(message.payload):
            failures.append(f"{message.label} {error.json_path}: {error.message}")
    assert not failures, "\n".join(failures)


def test_every_message_matches_exactly_one_schema_of_its_direction(
    traffic: list[Message],
) -> None:
    """A receiver can tell every message apart by its payload schema alone."""
    ambiguous = {}
    for message in traffic:
        matches = matching(message.direction, message.payload)
        if matches != [message.label]:
            ambiguous[(message.direction, message.label)] = matches
    assert not ambiguous, f"(direction, message) -> matching schemas: {ambiguous}"


def test_wrong_messages_fail_validation(traffic: list[Message]) -> None:
    """The check can fail: broken variants of real messages match no documented message."""
    done = next(m.payload for m in traffic if m.label == "completionDone")
    chunk = next(m.payload for m in traffic if m.label == "envelopeChunk")
    error = next(m.payload for m in traffic if m.label == "error")
    compatible = next(m.payload for m in traffic if m.label == "compatibleChunk")
    create = next(m.payload for m in traffic if m.label == "create")
    done_without_usage = {k: v for k, v in done.items() if k != "usage"}
    assert not MESSAGES[SERVER]["completionDone"].validator.is_valid(done_without_usage)
    assert matching(SERVER, done_without_usage) == []
    wrong_server = [
        ("completionDone", {**done, "finish_reason": "finished"}),
        ("completionDone", {**done, "usage": {"prompt_tokens": 1}}),
        ("completionDone", {**done, "extra": 1}),
        ("envelopeChunk", {**chunk, "choices": chunk["choices"] * 2}),
        ("envelopeChunk", {**chunk, "object": "chat.completion"}),
        ("envelopeChunk", {**chunk, "sequence_number": 0}),
        ("envelopeChunk", {k: v for k, v in chunk.items() if k != "request_id"}),
        ("error", {**error, "error": {k: v for k, v in error["error"].items() if k != "status"}}),
        ("error", {**error, "error": {**error["error"], "status": 200}}),
        ("compatibleError", {"error": {k: v for k, v in error["error"].items() if k != "code"}}),
        ("compatibleChunk", {**compatible, "id": "cmpl-1"}),
        ("pong", {"type": "pong", "at": 1}),
        ("done", "DONE"),
    ]
    wrong_client = [
        ("create", {k: v for k, v in create.items() if k != "request_id"}),
        ("create", {**create, "request_id": ""}),
        ("create", {**create, "request_id": "x" * 129}),
        ("cancel", {"type": "chat.completion.cancel"}),
        (
            "resume",
            {"type": "chat.completion.resume", "stream_id": "chatcmpl-x", "starting_after": -1},
        ),
        ("auth", {"type": "auth"}),
        ("compatibleRequest", {"model": "sim", "messages": []}),
    ]
    for direction, cases in ((SERVER, wrong_server), (CLIENT, wrong_client)):
        for name, payload in cases:
            assert not MESSAGES[direction][name].validator.is_valid(payload), (name, payload)
            assert name not in matching(direction, payload)
