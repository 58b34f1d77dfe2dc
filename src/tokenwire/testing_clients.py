"""Test helpers: streaming clients that record what arrived, and when, over SSE and WebSocket.

The drain tests need to know how every stream ended (``[DONE]`` after a finish, or an in-band
error, and a WebSocket's ``session.closing`` and close code); the proxy tests need to know
how the bytes arrived (each network read and the events it completed, with its time), to
tell tokens that arrive one by one from a buffered lump. :class:`Recording` holds both.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tokenwire.wire.sse import DONE_DATA, SSEParser


@dataclass
class Recording:
    """What one client read from one streamed completion."""

    text: str = ""
    done: bool = False  # SSE / compatible: [DONE]; envelope: chat.completion.done
    finish_reason: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    stream_id: str | None = None
    last_event: int = 0  # SSE ``id:`` / envelope ``sequence_number``
    # (monotonic time, content chunks completed) per network read (SSE) or message (WS)
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    closing: dict[str, Any] | None = None  # a WebSocket's session.closing
    close_code: int | None = None  # the WebSocket close code the server sent
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the first content came
    told: asyncio.Event = field(default_factory=asyncio.Event)  # session.closing, or a close

    def add_chunk(self, chunk: dict[str, Any]) -> int:
        """Fold one chunk in (an error object, a content or finish chunk); content pieces."""
        if "error" in chunk and chunk.get("type") in (None, "error"):
            self.errors.append(chunk["error"])
            return 0
        self.stream_id = chunk.get("id", self.stream_id)
        self.last_event = chunk.get("sequence_number", self.last_event)
        pieces = 0
        for choice in chunk.get("choices") or ():
            content = choice["delta"].get("content")
            if content:
                self.text += content
                pieces += 1
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if pieces:
            self.started.set()
        return pieces

    @property
    def ended_by(self) -> str:
        """``"done"``, the in-band error's code, or ``"cut"`` (the stream just stopped)."""
        if self.errors:
            return str(self.errors[-1].get("code"))
        return "done" if self.done else "cut"


async def record_sse(response: aiohttp.ClientResponse, recording: Recording) -> Recording:
    """Read an SSE chat-completions body to its end, recording every read."""
    recording.stream_id = response.headers.get("x-stream-id")
    parser = SSEParser()
    try:
        async for data in response.content.iter_any():
            pieces = 0
            for event in parser.feed(data):
                if event.data == DONE_DATA:
                    recording.done = True
                    continue
                if event.id is not None:
                    recording.last_event = int(event.id)
                pieces += recording.add_chunk(json.loads(event.data))
            recording.arrivals.append((time.monotonic(), pieces))
    except aiohttp.ClientPayloadError:
        pass  # the connection ended without the chunked terminator: recorded as cut
    return recording


async def record_ws(
    ws: ClientConnection, recording: Recording, request_id: str | None = None
) -> Recording:
    """Read one request's messages until it ends: compatible mode (no ``request_id``) at
    ``[DONE]`` (which follows an error too), envelope mode at the ``done`` or ``error`` of
    ``request_id``. A ``session.closing`` is recorded, and the close code if the server
    closes the socket first."""
    try:
        while not (recording.done or (recording.errors and request_id is not None)):
            message = await ws.recv()
            assert isinstance(message, str)
            if message == DONE_DATA:
                recording.done = True
                continue
            data = json.loads(message)
            kind = data.get("type")
            if kind == "session.closing":
                recording.closing = data
                recording.told.set()
            elif kind == "chat.completion.done":
                if data["request_id"] == request_id:
                    recording.done = True
                    recording.finish_reason = data["finish_reason"]
            elif request_id is None or data.get("request_id") == request_id:
                recording.arrivals.append((time.monotonic(), recording.add_chunk(data)))
    except ConnectionClosed as exc:
        recording.close_code = exc.rcvd.code if exc.rcvd is not None else None
        recording.told.set()
    return recording


async def wait_closed(ws: ClientConnection, recording: Recording) -> Recording:
    """Read (recording a ``session.closing``) until the server closes; its close code."""
    try:
        while True:
            message = await ws.recv()
            if isinstance(message, str) and message.startswith('{"type":"session.closing"'):
                recording.closing = json.loads(message)
                recording.told.set()
    except ConnectionClosed as exc:
        recording.close_code = exc.rcvd.code if exc.rcvd is not None else None
        recording.told.set()
    return recording


class KeepAlive:
    """One HTTP/1.1 keep-alive connection, for requests sent on it after the drain began."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> KeepAlive:
        """A connection that has served one ``GET /healthz`` and is now idle."""
        conn = cls(*await asyncio.open_connection(host, port))
        status, _, _ = await conn.request("GET", "/healthz")  # opened and used: now idle
        assert status == 200
        return conn

    async def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, data: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: gateway\r\nContent-Length: {len(data)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.writer.write(head.encode() + b"\r\n" + data)
        status_line = await self.reader.readline()
        response_headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            response_headers[name.strip().lower()] = value.strip()
        content = await self.reader.readexactly(int(response_headers["content-length"]))
        return int(status_line.split()[1]), response_headers, content

    async def closed_by_server(self) -> bool:
        """Whether the server closed the connection (reads end-of-file)."""
        return await self.reader.read(1) == b""

    def close(self) -> None:
        self.writer.close()
