"""Logged events as bytes, for a stream log kept outside the process (Redis Streams).

Each event is one short JSON array whose first item says what it is, so a reader in another
gateway process rebuilds exactly the events the generating process logged::

    ["t", text]                                   TextDelta
    ["c", index, id, name, arguments]             ToolCallDelta
    ["f", reason]                                 Finish
    ["u", prompt_tokens, completion_tokens, est,  Usage (trailing items only when needed:
     cache_write, cache_read, charge_micro]      the cache counts when one is not 0 or a
                                                  charge follows, the charge when set)
    ["e", status, type, code, message, param]     StreamError (as a RecordedError)
    ["e", status, type, code, message, param, {…}]  … with fields beyond OpenAI's four

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


_OPENAI_ERROR_FIELDS = frozenset({"message", "type", "code", "param"})


def _error_fields(error: GatewayError) -> list[Any]:
    body = error.to_body()["error"]
    fields = ["e", error.http_status, body["type"], body["code"], body["message"], body["param"]]
    extra = {k: v for k, v in body.items() if k not in _OPENAI_ERROR_FIELDS}
    return [*fields, extra] if extra else fields


def encode_event(event: Event) -> bytes:
    """One logged event as bytes."""
    if isinstance(event, TextDelta):
        return _encode(["t", event.text])
    if isinstance(event, ToolCallDelta):
        return _encode(["c", event.index, event.id, event.name, event.arguments])
    if isinstance(event, Finish):
        return _encode(["f", event.reason])
    if isinstance(event, Usage):
        item: list[object] = ["u", event.prompt_tokens, event.completion_tokens, event.estimated]
        if event.cache_write_tokens or event.cache_read_tokens or event.charge_micro is not None:
            item += [event.cache_write_tokens, event.cache_read_tokens]
        if event.charge_micro is not None:
            item.append(event.charge_micro)
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
            return Usage(
                int(item[1]),
                int(item[2]),
                bool(item[3]),
                cache_write_tokens=int(item[4]) if len(item) > 5 else 0,
                cache_read_tokens=int(item[5]) if len(item) > 5 else 0,
                charge_micro=int(item[6]) if len(item) > 6 else None,
            )
        if kind == "e":
            error = RecordedError(
                str(item[4]),
                status=int(item[1]),
                error_type=str(item[2]),
                code=item[3],
                param=item[5],
                extra=dict(item[6]) if len(item) > 6 else None,
            )
            return StreamError(error)
    except (msgspec.DecodeError, IndexError, TypeError, ValueError) as exc:
        raise CorruptEvent(f"unreadable stream event {data[:80]!r}") from exc
    raise CorruptEvent(f"unknown stream event kind {kind!r}")


def is_last(event: Event) -> bool:
    """True for the event a log ends with: ``Usage`` (after ``Finish``) or ``StreamError``."""
    return isinstance(event, Usage | StreamError)
