"""Chat Completions frames on each transport (sans-I/O): three small :class:`FrameEncoder`\\ s.

All three carry the same ``chat.completion.chunk`` JSON
(:class:`~tokenwire.wire.chunks.ChunkEncoder`) and differ only in framing:

* :class:`ChatSSEFrames`: ``id: N`` + ``data: chunk``; the in-band error without an id;
  ``: ping`` while idle; ``data: [DONE]`` last.
* :class:`ChatCompatFrames` (``/v1/ws/chat`` compatible mode): the bare chunk, or the in-band
  error object (``[DONE]`` follows after a grace period, which is the socket's business).
* :class:`ChatEnvelopeFrames` (envelope mode): the chunk plus ``type``, ``request_id`` and
  ``sequence_number``; ``error`` messages; ``chat.completion.done`` last, unless it failed.
"""

from __future__ import annotations

from tokenwire.streams.events import Event, Finish, StreamError, TextDelta, Usage
from tokenwire.streams.source import StreamSource
from tokenwire.wire import sse
from tokenwire.wire import ws as proto
from tokenwire.wire.chunks import ChunkEncoder, error_json


def chunk_encoder(source: StreamSource) -> ChunkEncoder:
    """The chunk encoder for a stream (the usage chunk as its creating request asked)."""
    return ChunkEncoder(
        completion_id=source.id,
        created=source.created,
        model=source.model,
        include_usage=source.include_usage,
    )


class _ChatFrames:
    """What every Chat Completions encoder shares: the stream's chunk encoder, no start frames."""

    __slots__ = ("_chunks", "_include_usage")

    def __init__(self, source: StreamSource) -> None:
        self._chunks = chunk_encoder(source)
        self._include_usage = source.include_usage

    def start(self, out: list[bytes]) -> None:
        return None

    def ping(self, out: list[bytes]) -> None:
        return None

    def end(self, out: list[bytes]) -> None:
        return None


class ChatSSEFrames(_ChatFrames):
    """Chat Completions over SSE (``POST /v1/chat/completions``, resumes)."""

    __slots__ = ()

    def event(self, event: Event, number: int, out: list[bytes]) -> None:
        if type(event) is TextDelta:  # the hot path: sse.event(…, event_id=number), inlined
            out.append(b"id: %d\ndata: %s\n\n" % (number, self._chunks.text(event.text)))
        elif type(event) is StreamError:
            out.append(sse.event(error_json(event.error)))  # no id: not a resumable position
        else:
            data = self._chunks.encode(event, include_usage=self._include_usage)
            if data is not None:
                out.append(sse.event(data, event_id=number))

    def ping(self, out: list[bytes]) -> None:
        out.append(sse.PING)

    def end(self, out: list[bytes]) -> None:
        out.append(sse.DONE)


class ChatCompatFrames(_ChatFrames):
    """Chat Completions over ``/v1/ws/chat``, compatible mode: what SSE carries after ``data:``.

    ``[DONE]`` follows after a grace period for the client's close (``api/ws.py``).
    """

    __slots__ = ()

    def event(self, event: Event, number: int, out: list[bytes]) -> None:
        data = self._chunks.encode(event, include_usage=self._include_usage)
        if data is not None:
            out.append(data)


class ChatEnvelopeFrames(_ChatFrames):
    """Chat Completions over ``/v1/ws/chat`` in envelope mode, for one ``request_id``."""

    __slots__ = ("_finish", "_number", "_request_id", "_source", "_usage")

    def __init__(self, source: StreamSource, request_id: str, after: int = 0) -> None:
        super().__init__(source)
        self._source = source
        self._request_id = request_id
        self._number = after
        self._finish: str | None = None
        self._usage: Usage | None = None

    def event(self, event: Event, number: int, out: list[bytes]) -> None:
        self._number = number
        if type(event) is StreamError:
            out.append(proto.error_message(event.error, self._request_id))
            return
        if type(event) is Finish:
            self._finish = event.reason
        elif type(event) is Usage:
            self._usage = event
        chunk = self._chunks.encode(event, include_usage=self._include_usage)
        if chunk is not None:
            out.append(proto.envelope_chunk(chunk, self._request_id, number))

    def end(self, out: list[bytes]) -> None:
        source = self._source
        finish = self._finish or source.finish_reason  # a resume may start after the finish
        if finish is not None and source.error is None:
            usage = self._usage or source.usage
            out.append(proto.done_message(self._request_id, source.id, finish, usage, self._number))
