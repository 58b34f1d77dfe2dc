"""Events to frames: the encoder protocol every client API implements, and the one loop (sans-I/O).

A generation's log holds typed events (``streams/events.py``). What a client receives is a
sequence of *frames*: the bytes of one SSE event (``id: 3\\ndata: {…}\\n\\n``,
``event: response.output_text.delta\\ndata: {…}\\n\\n``) or of one WebSocket text message.
Each API on each transport is a :class:`FrameEncoder`; :class:`FrameLoop` is the only code
that walks a log's batches and feeds an encoder, so adding an API is writing an encoder, never
another loop. Transports (``api/sse_stream.py``, ``api/ws.py``) only move the frames.

An encoder's life, for one client reading one completion::

    start()            once, before the first event's frames: response.created, message_start
                       (not called when the log's first event is a StreamError: the request
                       failed before anything began, and event() renders a request error)
    event(e, n)        per event, n = its number in the log (a merged text delta carries the
                       number of its last delta); StreamError included: the in-band error
    ping()             the log was idle for the heartbeat (SSE): a comment, Anthropic's ping
    end()              after the log's last event: data: [DONE], chat.completion.done,
                       message_stop; possibly nothing (Responses ends with response.completed)

Each method appends frames to ``out`` (no list per event). Frames are complete on their own:
the SSE transport joins a batch's frames into one write, the WebSocket transport sends each
as one message. The hot path, a text delta, is one ``event`` call that appends one frame built
by template concatenation; encoders keep it that way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from tokenwire.streams.events import Event, StreamError, TextDelta


class FrameEncoder(Protocol):
    """One API's frames on one transport, for one client of one completion."""

    def start(self, out: list[bytes]) -> None:
        """Frames before the first event's (none for Chat Completions)."""
        ...

    def event(self, event: Event, number: int, out: list[bytes]) -> None:
        """Frames for one event numbered ``number`` in the log (none for bookkeeping events)."""
        ...

    def ping(self, out: list[bytes]) -> None:
        """A keep-alive while the log is idle (SSE; WebSocket transports never ask)."""
        ...

    def end(self, out: list[bytes]) -> None:
        """Frames after the log's last event."""
        ...


class FrameLoop:
    """The one events→frames loop: numbers a log's batches and feeds them to an encoder.

    ``after`` is the number of the last event already delivered (a resume); ``merge`` joins
    consecutive text deltas of a batch into one (WebSocket: a client that fell behind gets
    fewer, larger frames; see :func:`merge_text`).
    """

    __slots__ = ("_encoder", "_merge", "_seq", "_started")

    def __init__(self, encoder: FrameEncoder, *, after: int = 0, merge: bool = False) -> None:
        self._encoder = encoder
        self._merge = merge
        self._seq = after
        self._started = False

    @property
    def number(self) -> int:
        """The number of the last event read."""
        return self._seq

    def frames(self, batch: list[Event] | None) -> list[bytes]:
        """The frames of one batch (``None``: the heartbeat passed idle)."""
        out: list[bytes] = []
        encoder = self._encoder
        if not self._started:
            self._started = True
            if not batch or type(batch[0]) is not StreamError:
                encoder.start(out)
        if batch is None:
            encoder.ping(out)
            return out
        event = encoder.event
        seq = self._seq
        if self._merge:
            for merged, number in merge_text(batch, seq):
                event(merged, number, out)
            self._seq = seq + len(batch)
        else:
            for item in batch:
                seq += 1
                event(item, seq, out)
            self._seq = seq
        return out

    def end(self) -> list[bytes]:
        """The frames after the log's last event."""
        out: list[bytes] = []
        if not self._started:  # nothing was read (a resume after the last event)
            self._started = True
            self._encoder.start(out)
        self._encoder.end(out)
        return out


def merge_text(batch: list[Event], start_seq: int) -> Iterator[tuple[Event, int]]:
    """Events with their sequence numbers, consecutive text deltas merged into one.

    A merged delta carries the number of the last event it contains, so a resume
    ``starting_after`` that number loses nothing and repeats nothing.
    """
    seq = start_seq
    pending: list[str] = []
    for event in batch:
        seq += 1
        if type(event) is TextDelta:
            pending.append(event.text)
            continue
        if pending:
            yield TextDelta("".join(pending)), seq - 1
            pending = []
        yield event, seq
    if pending:
        yield TextDelta("".join(pending)), seq
