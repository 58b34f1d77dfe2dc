"""Messages between the runner and a load-generator process: msgpack, length-prefixed.

The runner writes commands to the worker's stdin and reads replies from its stdout. A row is
two steps so that resource sampling covers only the load: ``Prepare`` (build requests, open
WebSockets) → ``Prepared``, then ``Go`` → ``Progress``… → ``RowDone``. ``Release`` →
``Released`` closes the worker's connections before the gateway's counts are taken.
"""

from __future__ import annotations

import asyncio
import struct

import msgspec

from tokenwire.bench.metrics import RequestRecord


class RowSpec(msgspec.Struct, frozen=True):
    """Everything a worker needs to run one row."""

    row_id: str
    scenario: str
    transport: str  # "sse" | "json" | "ws"
    url: str
    headers: dict[str, str]
    model: str
    concurrency: int
    requests_per_user: int
    duration_s: float | None
    tokens: int
    ramp_s: float
    timeout_s: float
    keep_alive: bool = True
    streams_per_socket: int = 1
    ws_mode: str = "envelope"  # "envelope" | "compat"
    ws_compression: bool = False


class Prepare(msgspec.Struct, tag="prepare", frozen=True):
    spec: RowSpec


class Go(msgspec.Struct, tag="go", frozen=True):
    pass


class Release(msgspec.Struct, tag="release", frozen=True):
    """Close every connection the worker holds (keep-alive pools, WebSockets)."""


class Quit(msgspec.Struct, tag="quit", frozen=True):
    pass


Command = Prepare | Go | Release | Quit


class Ready(msgspec.Struct, tag="ready", frozen=True):
    pid: int


class Prepared(msgspec.Struct, tag="prepared", frozen=True):
    """The row is ready to go, or cannot run (``unsupported``: the server lacks the transport)."""

    connect_s: float = 0.0
    unsupported: str | None = None
    compression: bool | None = None  # WebSocket: was permessage-deflate negotiated


class Progress(msgspec.Struct, tag="progress", frozen=True):
    done: int


class RowDone(msgspec.Struct, tag="done", frozen=True):
    wall_s: float
    records: list[RequestRecord]


class Released(msgspec.Struct, tag="released", frozen=True):
    pass


class Failed(msgspec.Struct, tag="failed", frozen=True):
    message: str


Reply = Ready | Prepared | Progress | RowDone | Released | Failed

_HEADER = struct.Struct(">I")
_encode = msgspec.msgpack.Encoder().encode
_decode_command = msgspec.msgpack.Decoder(Command).decode
_decode_reply = msgspec.msgpack.Decoder(Reply).decode


def frame(message: Command | Reply) -> bytes:
    """A message as one length-prefixed frame."""
    payload = _encode(message)
    return _HEADER.pack(len(payload)) + payload


async def read_payload(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload, or None at end of stream."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None


async def read_command(reader: asyncio.StreamReader) -> Command | None:
    """The next command (None when the runner closed the pipe)."""
    payload = await read_payload(reader)
    return None if payload is None else _decode_command(payload)


async def read_reply(reader: asyncio.StreamReader) -> Reply | None:
    """The next reply (None when the worker closed its stdout, e.g. it died)."""
    payload = await read_payload(reader)
    return None if payload is None else _decode_reply(payload)
