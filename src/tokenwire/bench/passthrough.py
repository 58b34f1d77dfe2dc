"""The ``bare`` row's server: a pass-through on the gateway's own stack, and nothing else.

``python -m tokenwire.bench.passthrough --port P --upstream URL`` serves
``POST /v1/chat/completions`` by sending the body unchanged to ``URL/v1/chat/completions``
and relaying the upstream's status and bytes as they arrive. It runs on what the gateway runs
on (uvicorn with httptools and uvloop, the upstream pool of ``providers/connections.py``)
and does none of the gateway's work: no key, limit, validation, routing, event log,
translation, ledger, metrics or log line. Its row is the floor of this stack: the distance
from ``direct`` to ``bare`` is the HTTP front and the upstream client, from ``bare`` to
``sse`` is what tokenwire does. A bench tool, not a product: it has no configuration and
answers any ``GET`` with ``ok`` (bench's readiness poll).
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.types import Message, Receive, Scope, Send

from tokenwire.providers.connections import ConnectFailed, ReadTimeout, ReplyBroken, UpstreamPool

_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]


class PassThrough:
    """The ASGI app: one upstream POST per request, its reply relayed chunk by chunk."""

    def __init__(self, upstream: str) -> None:
        self._url = upstream.rstrip("/") + "/v1/chat/completions"
        self._pool = UpstreamPool(connect_timeout_s=10, idle_timeout_s=300, max_connections=0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # a WebSocket handshake: refused by uvicorn when the app returns
        if scope["method"] != "POST":
            await _reply(send, 200, b"ok")
            return
        body = await _body(receive)
        if body is None:
            return  # the client went away
        try:
            reply = await self._pool.post(self._url, body, {"content-type": "application/json"})
        except (ConnectFailed, ReplyBroken, ReadTimeout) as exc:
            await _reply(send, 502, f"upstream failed: {exc}".encode())
            return
        try:
            content_type = reply.headers.get("content-type", "text/event-stream")
            await send(
                {
                    "type": "http.response.start",
                    "status": reply.status,
                    "headers": [(b"content-type", content_type.encode())],
                }
            )
            while data := await reply.readany():
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            reply.release()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _body(receive: Receive) -> bytes | None:
    """The request body; None if the client disconnected first."""
    parts: list[bytes] = []
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _reply(send: Send, status: int, text: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _TEXT})
    await send({"type": "http.response.body", "body": text})


def main(argv: list[str] | None = None) -> None:
    """Serve the pass-through on 127.0.0.1 until stopped (SIGTERM or SIGINT)."""
    parser = argparse.ArgumentParser(prog="python -m tokenwire.bench.passthrough")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's base URL")
    args = parser.parse_args(argv)
    uvicorn.run(
        PassThrough(args.upstream),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        backlog=4096,
        access_log=False,
        log_level="warning",
        timeout_keep_alive=75,  # as the gateway's (app.server_options)
    )


if __name__ == "__main__":
    main()
