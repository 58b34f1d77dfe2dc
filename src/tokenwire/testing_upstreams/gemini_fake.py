"""A fake Gemini API (Generative Language ``v1beta``) on loopback, for tests.

It speaks the wire format of the real service: ``POST /v1beta/models/{model}:generateContent``
answers one pretty-printed ``GenerateContentResponse``; ``:streamGenerateContent?alt=sse``
answers ``data: {json}\\r\\n\\r\\n`` events (without ``alt=sse``, a JSON array), each with the
cumulative ``usageMetadata``, ``modelVersion`` and ``responseId``, the last with
``finishReason``; errors are ``{"error": {"code", "message", "status", "details"?}}``.

* **Auth**: ``x-goog-api-key`` (or ``?key=``); none → 403 ``PERMISSION_DENIED``, a wrong one →
  400 ``INVALID_ARGUMENT`` with the ``ErrorInfo`` reason ``API_KEY_INVALID`` (as Google does).
* **Reply**: the words of :data:`REPLY_TOKENS` (one token each, :data:`TOKENS_PER_CHUNK` per
  event), cut at ``generationConfig.maxOutputTokens`` (``MAX_TOKENS``) or before the first
  ``stopSequences`` hit (``STOP``). Usage: prompt = words of every text part,
  candidates = tokens sent, thoughts = :data:`THOUGHT_TOKENS`.
* **Tools**: with ``toolConfig.functionCallingConfig.mode`` ``ANY``, one event holding a
  ``functionCall`` per allowed function (or the first declared one), arguments made up from its
  schema, then ``STOP``.
* **Requests** are checked for shape (roles, parts, config names) → 400 ``INVALID_ARGUMENT``,
  and recorded in :attr:`GeminiFake.requests`.
* **Faults**, per request: ``FAULT:<kind>[@<n>]`` in the last user message, or the header
  ``x-fake-fault: <kind>[@<n>]``; ``n`` text events are sent before a stream fault (default 0).
  ``500`` ``503`` ``429`` (HTTP errors; 429 carries ``RetryInfo`` of 7 s), ``reset`` (the TCP
  connection is aborted), ``stall`` (nothing more until the client leaves or the fake
  closes), ``malformed`` (an event that is not JSON), ``nofinish`` (the stream ends without a
  ``finishReason``), ``safety`` (``finishReason: SAFETY``, no content), ``error`` (an in-band
  ``{"error": …}`` event).
* **Counters** for cancellation tests: ``open_streams``, ``closed_streams``, ``disconnects``
  (the client went away mid-stream), ``completed_streams``; also at ``GET /fake/stats``.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

_WORDS = "Alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november"
REPLY_TOKENS = [word if i == 0 else " " + word for i, word in enumerate(_WORDS.split(" "))]
TOKENS_PER_CHUNK = 2
THOUGHT_TOKENS = 3
RETRY_DELAY = "7s"
_UNREGISTERED = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)
_BAD_KEY = [  # Google's details for a wrong key
    {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }
]
_FAULT = re.compile(r"FAULT:([a-z0-9]+)(?:@(\d+))?")
_PART_KINDS = ("text", "inlineData", "fileData", "functionCall", "functionResponse")
_CONFIG_KEYS = {
    "stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema", "candidateCount",
    "maxOutputTokens", "temperature", "topP", "topK", "seed", "presencePenalty",
    "frequencyPenalty", "responseLogprobs", "logprobs", "thinkingConfig",
}  # fmt: skip
_STATUS = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def encode(value: Any, *, indent: int | None = None) -> bytes:
    """JSON as Google writes it: ``": "`` after keys, ``<`` and ``>`` escaped."""
    text = json.dumps(value, ensure_ascii=False, indent=indent, separators=(",", ": "))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").encode()


def error_body(status: int, message: str, details: list[Any] | None = None) -> bytes:
    """Google's error body, pretty-printed."""
    error: dict[str, Any] = {"code": status, "message": message, "status": _STATUS[status]}
    if details:
        error["details"] = details
    return encode({"error": error}, indent=2) + b"\n"


@dataclass
class RecordedRequest:
    """One request the fake received."""

    model: str
    action: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class _Plan:
    chunks: list[list[dict[str, Any]]] = field(default_factory=list)  # parts per event
    finish: str = "STOP"
    tokens: int = 0


def _texts(body: dict[str, Any]) -> list[str]:
    contents = [body.get("systemInstruction") or {}, *body.get("contents", [])]
    return [p["text"] for c in contents for p in c.get("parts", []) if "text" in p]


def _problem(body: Any) -> str | None:
    """Why Google would refuse this request body, or None."""
    if not isinstance(body, dict) or not body.get("contents"):
        return "* GenerateContentRequest.contents: contents is not specified"
    for i, content in enumerate(body["contents"]):
        if content.get("role") not in ("user", "model"):
            return f"Please use a valid role: user, model. (contents[{i}])"
        if not content.get("parts"):
            return (
                f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
            )
        for part in content["parts"]:
            kinds = [k for k in _PART_KINDS if k in part]
            if len(kinds) != 1:
                return f"contents[{i}]: a part must hold exactly one of {_PART_KINDS}"
            call = part.get("functionCall") or part.get("functionResponse")
            if call is not None and not call.get("name"):
                return f"contents[{i}]: function parts need a name"
            if "functionResponse" in part and not isinstance(call.get("response"), dict):
                return f"contents[{i}]: functionResponse.response must be an object"
    unknown = set(body.get("generationConfig", {})) - _CONFIG_KEYS
    if unknown:
        return f'Invalid JSON payload received. Unknown name "{sorted(unknown)[0]}"'
    mode = body.get("toolConfig", {}).get("functionCallingConfig", {}).get("mode", "AUTO")
    if mode not in ("AUTO", "ANY", "NONE"):
        return f"Invalid value at 'tool_config.function_calling_config.mode' ({mode})"
    return None


def _sample(schema: dict[str, Any]) -> Any:
    """A value that fits a JSON (or OpenAPI) schema."""
    kind = str(schema.get("type", "object" if "properties" in schema else "")).lower()
    if kind == "object":
        return {k: _sample(v) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return [_sample(schema.get("items", {"type": "string"}))]
    if kind == "string":
        return schema.get("enum", ["alpha"])[0]
    return {"integer": 1, "number": 1.5, "boolean": True}.get(kind)


def plan(body: dict[str, Any]) -> _Plan:
    """What the fake answers to ``body`` when no fault is asked for."""
    config = body.get("generationConfig", {})
    calling = body.get("toolConfig", {}).get("functionCallingConfig", {})
    declarations = [d for t in body.get("tools", []) for d in t.get("functionDeclarations", [])]
    if declarations and calling.get("mode") == "ANY":
        names = calling.get("allowedFunctionNames") or [declarations[0]["name"]]
        schemas = {
            d["name"]: d.get("parametersJsonSchema") or d.get("parameters") or {}
            for d in declarations
        }
        parts: list[dict[str, Any]] = [
            {"functionCall": {"name": n, "args": _sample(schemas.get(n) or {"type": "object"})}}
            for n in names
        ]
        parts[0]["thoughtSignature"] = "ZmFrZS1zaWduYXR1cmU="
        return _Plan([parts], "STOP", 10 * len(parts))
    limit = config.get("maxOutputTokens", len(REPLY_TOKENS))
    stops = config.get("stopSequences", [])
    result, text, tokens = _Plan(), "", list[str]()
    for token in REPLY_TOKENS:
        if len(tokens) >= limit:
            result.finish = "MAX_TOKENS"
            break
        hits = [i for i in ((text + token).find(s) for s in stops) if i >= 0]
        if hits:
            if min(hits) > len(text):
                tokens.append(token[: min(hits) - len(text)])
            break
        tokens.append(token)
        text += token
    result.tokens = len(tokens)
    for start in range(0, len(tokens), TOKENS_PER_CHUNK):
        result.chunks.append([{"text": "".join(tokens[start : start + TOKENS_PER_CHUNK])}])
    if not result.chunks:  # stopped before the first token: one empty text part
        result.chunks.append([{"text": ""}])
    return result


class GeminiFake:
    """The fake server; ``await start()``, use :attr:`base_url`, ``await close()``."""

    def __init__(self, *, api_key: str = "k") -> None:
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.open_streams = 0
        self.closed_streams = 0
        self.disconnects = 0
        self.completed_streams = 0
        self.port = 0
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, int]:
        """The connection counters."""
        return {
            "open_streams": self.open_streams,
            "closed_streams": self.closed_streams,
            "disconnects": self.disconnects,
            "completed_streams": self.completed_streams,
        }

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1beta/models/{name}", self._handle)
        app.router.add_get("/fake/stats", self._stats)
        self._release = asyncio.Event()
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        self._release.set()  # let stalled streams end
        if self._runner is not None:
            await self._runner.cleanup()

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    def _error(self, status: int, message: str, details: list[Any] | None = None) -> web.Response:
        return web.Response(
            status=status,
            body=error_body(status, message, details),
            content_type="application/json",
            charset="UTF-8",
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        model, _, action = request.match_info["name"].rpartition(":")
        if action not in ("generateContent", "streamGenerateContent"):
            return self._error(404, f"Method not found: {action}")
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            return self._error(403, _UNREGISTERED)
        if key != self.api_key:
            return self._error(400, "API key not valid. Please pass a valid API key.", _BAD_KEY)
        try:
            body = json.loads(await request.read())
        except ValueError:
            return self._error(400, "Invalid JSON payload received.")
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(RecordedRequest(model, action, dict(request.query), headers, body))
        problem = _problem(body)
        if problem is not None:
            return self._error(400, problem)
        user = [c for c in body["contents"] if c["role"] == "user"]
        last = " ".join(p.get("text", "") for p in (user[-1]["parts"] if user else []))
        spec = request.headers.get("x-fake-fault")
        match = _FAULT.fullmatch("FAULT:" + spec) if spec else _FAULT.search(last)
        fault, after = (match.group(1), int(match.group(2) or 0)) if match else ("", 0)
        if fault == "429":
            details = [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": RETRY_DELAY}
            ]
            return self._error(429, "You exceeded your current quota.", details)
        if fault in ("500", "503"):
            message = (
                "Internal error encountered." if fault == "500" else "The model is overloaded."
            )
            return self._error(int(fault), message)
        response_id = f"fake-{len(self.requests):06d}"
        prompt_tokens = max(1, sum(len(t.split()) for t in _texts(body)))
        result = plan(body)

        def chunk(
            parts: list[dict[str, Any]] | None, sent: int, finish: str | None
        ) -> dict[str, Any]:
            candidate: dict[str, Any] = {}
            if parts is not None:
                candidate["content"] = {"parts": parts, "role": "model"}
            if finish is not None:
                candidate["finishReason"] = finish
            candidate["index"] = 0
            if finish == "SAFETY":
                rating = {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}
                candidate["safetyRatings"] = [{**rating, "blocked": True}]
            return {
                "candidates": [candidate],
                "usageMetadata": {
                    "promptTokenCount": prompt_tokens,
                    "candidatesTokenCount": sent,
                    "totalTokenCount": prompt_tokens + sent + THOUGHT_TOKENS,
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
                    "thoughtsTokenCount": THOUGHT_TOKENS,
                },
                "modelVersion": model,
                "responseId": response_id,
            }

        if action == "generateContent":
            parts = [p for c in result.chunks for p in c]
            if parts and all("text" in p for p in parts):
                parts = [{"text": "".join(p["text"] for p in parts)}]
            payload = encode(chunk(parts, result.tokens, result.finish), indent=2) + b"\n"
            return web.Response(body=payload, content_type="application/json", charset="UTF-8")
        events: list[bytes] = []
        sent = 0
        limit = after if fault else len(result.chunks)
        for n, parts in enumerate(result.chunks[:limit]):
            last_one = n == len(result.chunks) - 1 and not fault
            sent = result.tokens if last_one else sent + TOKENS_PER_CHUNK
            events.append(encode(chunk(parts, sent, result.finish if last_one else None)))
        if fault == "safety":
            events.append(encode(chunk(None, sent, "SAFETY")))
        elif fault == "error":
            error = {
                "code": 500,
                "message": "An internal error has occurred.",
                "status": "INTERNAL",
            }
            events.append(encode({"error": error}))
        elif fault == "malformed":
            events.append(b'{"candidates": [{"content": {"parts": [{"text": "br')
        if request.query.get("alt") != "sse":
            body_bytes = b"[" + b",\r\n".join(events) + b"]"
            return web.Response(body=body_bytes, content_type="application/json", charset="UTF-8")
        return await self._stream(request, events, fault)

    async def _stream(
        self, request: web.Request, events: list[bytes], fault: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        self.open_streams += 1
        try:
            await response.prepare(request)
            for data in events:
                await response.write(b"data: " + data + b"\r\n\r\n")
            if fault == "reset":
                if request.transport is not None:
                    request.transport.abort()
                return response
            if fault == "stall":
                await self._release.wait()
                return response
            await response.write_eof()
            self.completed_streams += 1
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        finally:
            self.open_streams -= 1
            self.closed_streams += 1


class GeminiFakeThread:
    """A :class:`GeminiFake` on its own event loop in a daemon thread, for sync tests."""

    def __init__(self, *, api_key: str = "k") -> None:
        self.fake = GeminiFake(api_key=api_key)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return self.fake.base_url

    def __enter__(self) -> GeminiFakeThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self._loop).result(10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
