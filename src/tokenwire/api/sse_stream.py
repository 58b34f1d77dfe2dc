"""The SSE response: a generation's events as ``text/event-stream``, written as they arrive.

An ASGI callable rather than Starlette's ``StreamingResponse`` so that it can (1) stop at once
when the client disconnects, even while idle (which detaches the reader and lets the
generation cancel its upstream), and (2) write every batch of events the log holds in one
``send`` (one event per send while the client keeps up; merged when it falls behind), the
last batch with ``data: [DONE]`` and the end of the response.

What the frames say is the encoder's business (``wire/frames.py``): Chat Completions chunks,
Responses events, Anthropic Messages events all go through this one response.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenwire.api.disconnect import cancel_on_disconnect
from tokenwire.api.errors import error_response
from tokenwire.errors import GatewayError
from tokenwire.streams.codec import is_last
from tokenwire.streams.events import Event, StreamError
from tokenwire.streams.source import StreamSource
from tokenwire.wire import sse
from tokenwire.wire.frames import FrameEncoder, FrameLoop

ErrorRenderer = Callable[[GatewayError, dict[str, str]], Response]
"""How an error before the first event is answered (status, headers and the API's JSON body)."""


class SSEStream:
    """Streams one generation to one HTTP client.

    It waits for the first batch of events before sending headers, so an error before the
    first token keeps its HTTP status (rendered by ``render_error``); after ``heartbeat_s``
    with nothing it commits to 200 and pings. The wait is guarded like the rest: a client gone
    meanwhile cancels it. ``read_after`` is where reading the log starts (a resume; the
    encoder may start earlier than the client's cursor and skip what it already has).
    """

    def __init__(
        self,
        generation: StreamSource,
        encoder: FrameEncoder,
        *,
        heartbeat_s: float,
        read_after: int = 0,
        retry_ms: int | None = None,
        render_error: ErrorRenderer = error_response,
    ) -> None:
        self._generation = generation
        self._batches = generation.read(after=read_after, heartbeat_s=heartbeat_s)
        self._frames = FrameLoop(encoder, after=read_after)
        self._retry = b"" if retry_ms is None else sse.retry(retry_ms)
        self._render_error = render_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with cancel_on_disconnect(scope, receive):
                try:
                    first: list[Event] | None = await anext(self._batches)
                except StopAsyncIteration:
                    first = []  # a resume after the stream's last event: nothing but [DONE]
                if first and isinstance(first[0], StreamError):
                    headers = {
                        **self._generation.response_headers,
                        "x-stream-id": self._generation.id,
                    }
                    await self._render_error(first[0].error, headers)(scope, receive, send)
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

    def _join(self, frames: list[bytes]) -> bytes:
        """The frames as one write; the ``retry:`` line (resumable streams) starts the first
        event that has data (not a ``: ping`` comment)."""
        if self._retry:
            for index, frame in enumerate(frames):
                if not frame.startswith(b":"):
                    frames[index] = self._retry + frame
                    self._retry = b""
                    break
        return b"".join(frames)

    async def _write(self, send: Send, first: list[Event] | None) -> None:
        """Every batch in one ``send``; the batch holding the log's last event goes with the
        end (``data: [DONE]``) in the final message, so one write ends the response."""
        frames = self._frames.frames
        out = frames(first)
        if not (first and is_last(first[-1])):
            body = {"type": "http.response.body", "body": self._join(out), "more_body": True}
            await send(body)
            out = []
            async for batch in self._batches:
                out = frames(batch)
                if batch and is_last(batch[-1]):
                    break
                body["body"] = self._join(out) if self._retry else b"".join(out)
                await send(body)
                out = []
        out += self._frames.end()
        await send({"type": "http.response.body", "body": self._join(out), "more_body": False})
