"""The SSE response: a generation's events as ``text/event-stream``, written as they arrive.

An ASGI callable rather than Starlette's ``StreamingResponse`` so that it can (1) stop at once
when the client disconnects, even while idle (which detaches the reader and lets the
generation cancel its upstream), and (2) write every batch of events the log holds in one
``send`` (one event per send while the client keeps up; merged when it falls behind).
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from tokenwire.api.disconnect import cancel_on_disconnect
from tokenwire.api.errors import error_response
from tokenwire.streams.events import Event, StreamError
from tokenwire.streams.source import StreamSource
from tokenwire.wire import sse
from tokenwire.wire.chunks import ChunkEncoder


class SSEStream:
    """Streams one generation to one HTTP client.

    It waits for the first batch of events before sending headers, so an error before the
    first token keeps its HTTP status; after ``heartbeat_s`` with nothing it commits to 200
    and pings. The wait is guarded like the rest: a client gone meanwhile cancels it.
    """

    def __init__(
        self,
        generation: StreamSource,
        *,
        include_usage: bool,
        heartbeat_s: float,
        after: int = 0,
        retry_ms: int | None = None,
    ) -> None:
        self._generation = generation
        self._batches = generation.read(after=after, heartbeat_s=heartbeat_s)
        self._include_usage = include_usage
        self._seq = after
        self._retry = b"" if retry_ms is None else sse.retry(retry_ms)
        self._encoder = ChunkEncoder(
            completion_id=generation.id,
            created=generation.created,
            model=generation.model,
            include_usage=include_usage,
        )

    def _encode(self, batch: list[Event]) -> bytes:
        parts: list[bytes] = []
        encode = self._encoder.encode
        seq = self._seq
        for event in batch:
            seq += 1
            data = encode(event, include_usage=self._include_usage)
            if data is None:
                continue
            if isinstance(event, StreamError):
                parts.append(sse.event(data))
            else:
                parts.append(sse.event(data, event_id=seq))
        self._seq = seq
        return b"".join(parts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with cancel_on_disconnect(receive):
                try:
                    first: list[Event] | None = await anext(self._batches)
                except StopAsyncIteration:
                    first = []  # a resume after the stream's last event: nothing but [DONE]
                if first and isinstance(first[0], StreamError):
                    headers = {
                        **self._generation.response_headers,
                        "x-stream-id": self._generation.id,
                    }
                    await error_response(first[0].error, headers)(scope, receive, send)
                    return
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no"),
                            (b"x-stream-id", self._generation.id.encode()),
                            *(
                                (name.lower().encode(), value.encode())
                                for name, value in self._generation.response_headers.items()
                            ),
                        ],
                    }
                )
                await self._write(send, first)
        except OSError:
            pass  # the client went away while we wrote
        finally:
            await self._batches.aclose()

    async def _write(self, send: Send, first: list[Event] | None) -> None:
        body = {"type": "http.response.body", "body": b"", "more_body": True}
        body["body"] = self._retry + (sse.PING if first is None else self._encode(first))
        await send(body)
        async for batch in self._batches:
            body["body"] = sse.PING if batch is None else self._encode(batch)
            await send(body)
        await send({"type": "http.response.body", "body": sse.DONE, "more_body": False})
