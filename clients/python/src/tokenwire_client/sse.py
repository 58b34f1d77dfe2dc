"""Server-Sent Events parsing without I/O (WHATWG HTML, "server-sent events").

:class:`SSEParser` is an incremental parser: feed it bytes as they arrive, get whole events
back. It is the one SSE parser of the project: this SDK reads the gateway's streams with it,
and the gateway reads OpenAI-compatible upstreams with it (``tokenwire.wire.sse``).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_EVENT_BYTES = 1 << 20
"""The parser's default bound on one line (buffered until its newline) and one event's data."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: its data (lines joined by ``\\n``), type, and last event id."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSETooLarge(ValueError):
    """A line or an event's data grew past the parser's ``max_event_bytes``."""


class SSEParser:
    """Incremental SSE parser: ``feed(bytes)`` returns the events completed by those bytes.

    A peer that never ends a line (or an event) would grow the buffer without bound: past
    ``max_event_bytes`` of one line or of one event's data, ``feed`` raises
    :class:`SSETooLarge`.
    """

    __slots__ = (
        "_buffer",
        "_data",
        "_event",
        "_last_id",
        "_max",
        "_retry",
        "_size",
        "_skip_lf",
        "_started",
    )

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._size = 0  # of the pending event's data
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None
        self._skip_lf = False
        self._started = False

    @property
    def last_event_id(self) -> str | None:
        """The last ``id:`` seen, as a client would send in ``Last-Event-ID``."""
        return self._last_id

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse more bytes; return every event they complete."""
        if self._started and not self._buffer and not self._data and not self._skip_lf:
            whole = self._whole_data_events(chunk)
            if whole is not None:
                return whole
        buffer = self._buffer + chunk
        if self._skip_lf and buffer:
            self._skip_lf = False
            if buffer.startswith(b"\n"):
                buffer = buffer[1:]
        if not self._started and buffer:
            if len(buffer) < 3 and b"\xef\xbb\xbf".startswith(buffer):
                self._buffer = buffer  # maybe a BOM split across chunks: wait for the rest
                return []
            if buffer.startswith(b"\xef\xbb\xbf"):
                buffer = buffer[3:]
            self._started = True
        events: list[SSEEvent] = []
        if b"\r" not in buffer:  # the common case: LF line endings only
            *lines, self._buffer = buffer.split(b"\n")
            for raw in lines:
                dispatched = self._line(raw.decode("utf-8", "replace"))
                if dispatched is not None:
                    events.append(dispatched)
            self._check_buffer()
            return events
        start = 0
        length = len(buffer)
        while start < length:
            newline = buffer.find(b"\n", start)
            carriage = buffer.find(b"\r", start, newline if newline != -1 else length)
            if carriage != -1:
                end = carriage
                if carriage + 1 == length:
                    step, self._skip_lf = 1, True  # an LF may follow in the next chunk
                else:
                    step = 2 if buffer[carriage + 1 : carriage + 2] == b"\n" else 1
            elif newline != -1:
                end, step = newline, 1
            else:
                break
            dispatched = self._line(buffer[start:end].decode("utf-8", "replace"))
            if dispatched is not None:
                events.append(dispatched)
            start = end + step
        self._buffer = buffer[start:]
        self._check_buffer()
        return events

    def _whole_data_events(self, chunk: bytes) -> list[SSEEvent] | None:
        """The events of ``chunk`` if it is whole events of one ``data: `` line each (what
        nearly every chunk of an LLM stream is: one token's JSON), else None for the line
        parser. The same events as the line parser gives, in a few C-level scans; called
        between events only (nothing buffered, no data pending)."""
        last = len(chunk) - 2
        if chunk.find(b"\n") == last:  # one line, then the blank line: one event
            if (
                chunk[-1] != 10  # "\n"
                or not chunk.startswith(b"data: ")
                or b"\r" in chunk
                or last > self._max
            ):
                return None
            parts = [chunk[6:last]]
        else:
            if not chunk.endswith(b"\n\n") or b"\r" in chunk:
                return None
            parts = chunk[:last].split(b"\n\n")
            for part in parts:
                if not part.startswith(b"data: ") or b"\n" in part or len(part) > self._max:
                    return None
            parts = [part[6:] for part in parts]
        event = self._event or "message"
        self._event = ""
        last_id, retry = self._last_id, self._retry
        events = [SSEEvent(parts[0].decode("utf-8", "replace"), event, last_id, retry)]
        for part in parts[1:]:
            events.append(SSEEvent(part.decode("utf-8", "replace"), "message", last_id, retry))
        return events

    def _check_buffer(self) -> None:
        if len(self._buffer) > self._max:
            self._buffer = b""
            raise SSETooLarge(f"a line longer than {self._max} bytes")

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._size += len(value) + 1
            if self._size > self._max:
                raise SSETooLarge(f"an event longer than {self._max} bytes")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit() and len(value) <= 15:
            self._retry = int(value)  # ASCII digits only: "²".isdigit() is true
        return None

    def _dispatch(self) -> SSEEvent | None:
        self._size = 0
        if not self._data:
            self._event = ""
            return None
        result = SSEEvent(
            data="\n".join(self._data),
            event=self._event or "message",
            id=self._last_id,
            retry=self._retry,
        )
        self._data = []
        self._event = ""
        return result
