"""Logged events as bytes, for a stream log kept outside the process (Redis Streams).

Each event is one short JSON array whose first item says what it is, so a reader in another
gateway process rebuilds exactly the events the generating process logged::

    ["t", text]                                   TextDelta
    ["c", index, id, name, arguments]             ToolCallDelta
    ["f", reason]                                 Finish
    ["u", prompt_tokens, completion_tokens, est,  Usage (the cache counts only when
     cache_write, cache_read]                    one is not 0; older writers: never)
    ["e", status, type, code, message, param]     StreamError (as a RecordedError)

``Routed`` and ``AttemptFailed`` never reach a log, so they have no form here.
"""

from __future__ import annotations

from typing import Any, cast

import msgspec

from tokenwire.errors import GatewayError, RecordedError
from tokenwire.streams.events import (
    Event,
    Finish,
    FinishReason,
    StreamError,
    TextDelta,
    ToolCallDelta,
    Usage,
)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(list[Any]).decode


class CorruptEvent(ValueError):
    """Bytes in a shared stream log that are not an event this version understands."""


def _error_fields(error: GatewayError) -> list[Any]:
    body = error.to_body()["error"]
    return ["e", error.http_status, body["type"], body["code"], body["message"], body["param"]]


def encode_event(event: Event) -> bytes:
    """One logged event as bytes."""
    if isinstance(event, TextDelta):
        return _encode(["t", event.text])
    if isinstance(event, ToolCallDelta):
        return _encode(["c", event.index, event.id, event.name, event.arguments])
    if isinstance(event, Finish):
        return _encode(["f", event.reason])
    if isinstance(event, Usage):
        item = ["u", event.prompt_tokens, event.completion_tokens, event.estimated]
        if event.cache_write_tokens or event.cache_read_tokens:
            item += [event.cache_write_tokens, event.cache_read_tokens]
        return _encode(item)
    if isinstance(event, StreamError):
        return _encode(_error_fields(event.error))
    raise TypeError(f"{type(event).__name__} is never logged")


def decode_event(data: bytes) -> Event:
    """The event ``encode_event`` wrote; :class:`CorruptEvent` for anything else."""
    try:
        item = _decode(data)
        kind = item[0]
        if kind == "t":
            return TextDelta(str(item[1]))
        if kind == "c":
            return ToolCallDelta(int(item[1]), item[2], item[3], str(item[4]))
        if kind == "f":
            return Finish(cast(FinishReason, item[1]))
        if kind == "u":
            cache = (int(item[4]), int(item[5])) if len(item) > 4 else (0, 0)
            return Usage(int(item[1]), int(item[2]), bool(item[3]), *cache)
        if kind == "e":
            error = RecordedError(
                str(item[4]),
                status=int(item[1]),
                error_type=str(item[2]),
                code=item[3],
                param=item[5],
            )
            return StreamError(error)
    except (msgspec.DecodeError, IndexError, TypeError, ValueError) as exc:
        raise CorruptEvent(f"unreadable stream event {data[:80]!r}") from exc
    raise CorruptEvent(f"unknown stream event kind {kind!r}")


def is_last(event: Event) -> bool:
    """True for the event a log ends with: ``Usage`` (after ``Finish``) or ``StreamError``."""
    return isinstance(event, Usage | StreamError)
