"""Google Gemini (Generative Language API ``v1beta``) behind the OpenAI chat-completions API.

Requests go to ``POST {base_url}/v1beta/models/{model}:streamGenerateContent?alt=sse`` with
the key in ``x-goog-api-key``; every ``data:`` event of the reply is one
``GenerateContentResponse``. There is no ``[DONE]``: the stream ends with the connection.
:func:`to_gemini` (request) and :class:`GeminiStream` (reply) are pure and tested on their own.

Request (OpenAI → Gemini)::

    system / developer messages      systemInstruction.parts[].text (all of them, in order)
    user / tool messages             contents[] role "user";  assistant → role "model"
    text parts, refusal              parts[].text
    image_url data:…;base64,…        parts[].inlineData {mimeType, data}
    image_url http(s)://…            parts[].fileData {mimeType guessed from the path, fileUri};
                                     a URL whose type cannot be guessed → 400 unsupported_parameter
    input_audio {data, format}       parts[].inlineData {mimeType "audio/<format>"}
    file {file_data: data URL}       parts[].inlineData  (file_id → 400 unsupported_parameter)
    assistant tool_calls             parts[].functionCall {name, args} (arguments must be a JSON
                                     object → else 400 naming the argument's param)
    tool message                     parts[].functionResponse {name (from the tool call with that
                                     id), response: the content if a JSON object, else
                                     {"content": parsed JSON or text}}
    consecutive same-role contents   merged into one content
    max_completion_tokens/max_tokens generationConfig.maxOutputTokens
    stop / temperature / top_p       generationConfig.stopSequences / temperature / topP
    top_k                            generationConfig.topK
    seed, presence/frequency_penalty generationConfig.seed / presencePenalty / frequencyPenalty
    response_format json_object      generationConfig.responseMimeType "application/json"
    response_format json_schema      … plus responseJsonSchema
    tools[].function                 tools[0].functionDeclarations[] {name, description,
                                     parametersJsonSchema (JSON Schema, passed unchanged)}
    tool_choice auto/none/required   toolConfig.functionCallingConfig.mode AUTO / NONE / ANY
    tool_choice {function: {name}}   mode ANY + allowedFunctionNames [name]
    logit_bias, logprobs, audio, …   400 unsupported_parameter;   user, n=1: ignored

Reply (Gemini → events)::

    candidates[0].content.parts[].text        TextDelta (thought summaries are skipped)
    parts[].functionCall {name, args}         ToolCallDelta, whole call at once: index n,
                                              id call_<n>_<hash of name and args>,
                                              arguments json.dumps(args)
    finishReason STOP                         Finish stop, or tool_calls after a function call
    MAX_TOKENS                                Finish length
    SAFETY RECITATION BLOCKLIST PROHIBITED_CONTENT SPII IMAGE_SAFETY
                                              Finish content_filter
    any other finishReason                    Finish stop
    promptFeedback.blockReason (no candidate) Finish content_filter
    usageMetadata of the first chunk          PromptUsage(promptTokenCount), billed if the stream
                                              is cut before its end
    usageMetadata of the last chunk           Usage(promptTokenCount, candidatesTokenCount +
                                              thoughtsTokenCount): thinking is billed as output;
                                              cachedContentTokenCount: the cache-read part
    HTTP error {"error": {code, message,      UpstreamStatusError, status kept, code = status
    status, details}} / error event           name; RetryInfo.retryDelay → retry_after_s
    end of stream without finishReason        UpstreamError

Not carried: thought signatures (Gemini 3 wants them back with earlier function calls; a
stateless gateway has nowhere to keep them) and function-call ids (none are sent; Gemini pairs
responses with calls by name and order).
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import msgspec

from tokenwire.errors import (
    InvalidRequest,
    UnsupportedParameter,
    UpstreamAuthError,
    UpstreamError,
    UpstreamStatusError,
)
from tokenwire.providers.base import ProviderCall
from tokenwire.providers.connections import UpstreamPool
from tokenwire.providers.http import MAX_TOKEN_COUNT, TokenCount, stream_events
from tokenwire.providers.openai_compat import parse_retry_after
from tokenwire.streams.events import (
    Event,
    Finish,
    FinishReason,
    PromptUsage,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from tokenwire.wire import schema
from tokenwire.wire.schema import ChatRequest, content_text

API_VERSION = "v1beta"
_FILTERED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}
_KEY_REFUSED = frozenset({"API_KEY_INVALID"})  # ErrorInfo reasons that blame the gateway's key

# --- request translation (pure) -------------------------------------------------------------


def to_gemini(call: ProviderCall) -> tuple[str, dict[str, Any]]:
    """The streaming request for ``call``: its path (with query) and its JSON body."""
    request = call.request
    for key, value in (
        ("logit_bias", request.logit_bias),
        ("logprobs", request.logprobs),
        ("top_logprobs", request.top_logprobs is not None),
        ("audio", request.audio),
        ("prediction", request.prediction),
    ):
        if value:
            raise UnsupportedParameter(f"Gemini models do not support {key!r}.", param=key)
    system, contents = _contents(request)
    body: dict[str, Any] = {}
    if system:
        body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    body["contents"] = contents
    if request.tools:
        body["tools"] = [{"functionDeclarations": _declarations(request.tools)}]
    tool_config = _tool_config(request)
    if tool_config is not None:
        body["toolConfig"] = {"functionCallingConfig": tool_config}
    config = _generation_config(request, call.output_limit)
    if config:
        body["generationConfig"] = config
    model = quote(call.upstream_model, safe="")
    return f"/{API_VERSION}/models/{model}:streamGenerateContent?alt=sse", body


def _contents(request: ChatRequest) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(request.messages):
        param = f"messages[{i}]"
        if isinstance(message, schema.SystemMessage | schema.DeveloperMessage):
            system.append(content_text(message.content))
            continue
        if isinstance(message, schema.UserMessage):
            role, parts = "user", _user_parts(message.content, f"{param}.content")
        elif isinstance(message, schema.AssistantMessage):
            role, parts = "model", _assistant_parts(message, param, call_names)
        else:
            role, parts = "user", [_tool_response(message, param, call_names)]
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    if not contents:
        raise InvalidRequest("Gemini needs a user or assistant message.", param="messages")
    return system, contents


def _user_parts(content: str | list[Any], param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if isinstance(part, schema.TextPart):
            if part.text:
                parts.append({"text": part.text})
        elif isinstance(part, schema.ImageUrlPart):
            parts.append(_media(part.image_url.url, f"{where}.image_url.url"))
        elif isinstance(part, schema.InputAudioPart):
            audio = part.input_audio
            mime = f"audio/{audio.format}"
            parts.append({"inlineData": {"mimeType": mime, "data": audio.data}})
        elif isinstance(part, schema.FilePart):
            if part.file.file_data is None:
                message = "Gemini cannot read OpenAI file ids; send 'file_data' (a data URL)."
                raise UnsupportedParameter(message, param=f"{where}.file.file_id")
            parts.append(_media(part.file.file_data, f"{where}.file.file_data"))
    return parts


def _media(url: str, param: str) -> dict[str, Any]:
    """A data URL becomes ``inlineData``; an http(s) URL ``fileData`` with a guessed type."""
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        mime, _, encoding = header.partition(";")
        if not comma or encoding != "base64" or not mime:
            raise InvalidRequest("Expected 'data:<media type>;base64,<data>'.", param=param)
        return {"inlineData": {"mimeType": mime, "data": data}}
    if url.startswith(("http://", "https://")):
        guessed = mimetypes.guess_type(urlsplit(url).path, strict=False)[0]
        if guessed is None:  # Gemini needs the type; a data URL carries it
            message = "The media type of this URL is unknown to Gemini; send a data URL instead."
            raise UnsupportedParameter(message, param=param)
        return {"fileData": {"mimeType": guessed, "fileUri": url}}
    raise InvalidRequest("Expected a base64 data URL or an http(s) URL.", param=param)


def _assistant_parts(
    message: schema.AssistantMessage, param: str, call_names: dict[str, str]
) -> list[dict[str, Any]]:
    text = content_text(message.content)
    if isinstance(message.content, list):
        text += "".join(p.refusal for p in message.content if isinstance(p, schema.RefusalPart))
    parts: list[dict[str, Any]] = [{"text": text}] if text else []
    for j, tool_call in enumerate(message.tool_calls or ()):
        name, arguments = tool_call.function.name, tool_call.function.arguments
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):  # not JSON, or nested beyond the parser
            args = None
        if not isinstance(args, dict):
            where = f"{param}.tool_calls[{j}].function.arguments"
            raise InvalidRequest("Tool call arguments must be a JSON object.", param=where)
        call_names[tool_call.id] = name
        parts.append({"functionCall": {"name": name, "args": args}})
    return parts


def _tool_response(
    message: schema.ToolMessage, param: str, call_names: dict[str, str]
) -> dict[str, Any]:
    name = call_names.get(message.tool_call_id)
    if name is None:
        text = f"No earlier assistant tool call has the id {message.tool_call_id!r}."
        raise InvalidRequest(text, param=f"{param}.tool_call_id")
    text = content_text(message.content)
    try:
        value: Any = json.loads(text)
    except (ValueError, RecursionError):  # plain text (or JSON too deep to read): sent as text
        value = text
    response = value if isinstance(value, dict) else {"content": value}
    return {"functionResponse": {"name": name, "response": response}}


def _declarations(tools: list[schema.Tool]) -> list[dict[str, Any]]:
    declarations: list[dict[str, Any]] = []
    for k, tool in enumerate(tools):
        if not isinstance(tool, schema.FunctionTool):
            raise UnsupportedParameter(
                "Gemini takes function tools only.", param=f"tools[{k}].type"
            )
        function = tool.function
        declaration: dict[str, Any] = {"name": function.name}
        if function.description:
            declaration["description"] = function.description
        if function.parameters:
            declaration["parametersJsonSchema"] = function.parameters
        declarations.append(declaration)
    return declarations


def _tool_config(request: ChatRequest) -> dict[str, Any] | None:
    choice = request.tool_choice
    if choice is None:
        return None
    if not request.tools:
        if choice in ("none", "auto"):
            return None
        raise InvalidRequest("'tool_choice' needs 'tools'.", param="tool_choice")
    if isinstance(choice, str):
        return {"mode": _MODES[choice]}
    if not isinstance(choice, schema.FunctionChoice):
        text = "Gemini takes tool_choice 'auto', 'none', 'required' or one named function."
        raise UnsupportedParameter(text, param="tool_choice")
    return {"mode": "ANY", "allowedFunctionNames": [choice.function.name]}


def _generation_config(request: ChatRequest, output_limit: int | None) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if output_limit is not None:
        config["maxOutputTokens"] = output_limit
    if request.stop_sequences:
        config["stopSequences"] = request.stop_sequences
    for name, value in (
        ("temperature", request.temperature),
        ("topP", request.top_p),
        ("topK", request.top_k),
        ("seed", request.seed),
        ("presencePenalty", request.presence_penalty),
        ("frequencyPenalty", request.frequency_penalty),
    ):
        if value is not None:
            config[name] = value
    response_format = request.response_format
    if isinstance(response_format, schema.JSONObjectFormat | schema.JSONSchemaFormat):
        config["responseMimeType"] = "application/json"
    if (
        isinstance(response_format, schema.JSONSchemaFormat)
        and response_format.json_schema.schema is not None
    ):
        config["responseJsonSchema"] = response_format.json_schema.schema
    return config


# --- reply translation (pure) ---------------------------------------------------------------


class _FunctionCall(msgspec.Struct):
    name: str = ""
    args: dict[str, Any] | None = None


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool = False
    function_call: _FunctionCall | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] = []


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: TokenCount = 0
    candidates_token_count: TokenCount = 0
    thoughts_token_count: TokenCount = 0
    cached_content_token_count: TokenCount = 0  # the part of the prompt read from a cache

    @property
    def cached(self) -> int:
        return min(self.cached_content_token_count, self.prompt_token_count)


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


class _Chunk(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = []
    usage_metadata: _UsageMetadata | None = None
    prompt_feedback: _PromptFeedback | None = None
    error: dict[str, Any] | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def tool_call_id(index: int, name: str, arguments: str) -> str:
    """A stable id for a Gemini function call, which has none: ``call_<index>_<hash>``."""
    digest = hashlib.blake2b(f"{name}\0{arguments}".encode(), digest_size=6).hexdigest()
    return f"call_{index}_{digest}"


def gemini_error(
    provider: str, status: int, body: bytes, retry_after: str | None = None
) -> UpstreamError:
    """A Gemini error body (``{"error": {code, message, status, details}}``) as a gateway error.

    The HTTP status is kept; the wait comes from ``Retry-After`` or else from the
    ``google.rpc.RetryInfo`` detail (``"retryDelay": "7s"``) that 429 replies carry. Google
    answers a wrong API key with 400 and the ``google.rpc.ErrorInfo`` reason
    ``API_KEY_INVALID``: that is the operator's key, an :class:`UpstreamAuthError`.
    """
    message = body[:500].decode("utf-8", "replace").strip() or "(empty body)"
    code: str | None = None
    retry_s = parse_retry_after(retry_after)
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        parsed = None
    if isinstance(parsed, list) and parsed:  # the JSON-array framing wraps errors too
        parsed = parsed[0]
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        err = parsed["error"]
        message = str(err.get("message") or message)
        code = str(err["status"]) if err.get("status") else None
        for detail in err.get("details") or ():
            if isinstance(detail, dict) and detail.get("reason") in _KEY_REFUSED:
                return UpstreamAuthError(provider, status)
            delay = detail.get("retryDelay") if isinstance(detail, dict) else None
            if retry_s is None and isinstance(delay, str) and delay.endswith("s"):
                retry_s = parse_retry_after(delay[:-1])
    label = f"{status} {code}" if code else str(status)
    return UpstreamStatusError(
        f"Upstream {provider!r} answered HTTP {label}: {message}",
        status=status,
        error_type=_ERROR_TYPES.get(status),
        code=code,
        retry_after_s=retry_s,
    )


class GeminiStream:
    """Turns decoded reply chunks into events; keeps what spans chunks (call index, usage)."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.finished = False
        self._calls = 0
        self._usage: _UsageMetadata | None = None

    done = False  # Gemini has no final event: the stream ends with the body (see :meth:`end`)

    def feed(self, data: str) -> list[Event]:
        """The events one SSE event's JSON data carries."""
        return self.feed_chunk(_decode_chunk(data))

    def feed_chunk(self, chunk: _Chunk) -> list[Event]:
        """The events one chunk carries (usage is held back for :meth:`end`)."""
        if chunk.error is not None:
            raw_code = chunk.error.get("code")
            status = raw_code if isinstance(raw_code, int) and 400 <= raw_code < 600 else 502
            raise gemini_error(self.provider, status, msgspec.json.encode({"error": chunk.error}))
        events: list[Event] = []
        if chunk.usage_metadata is not None:
            metadata = chunk.usage_metadata
            if self._usage is None and metadata.prompt_token_count:
                events.append(
                    PromptUsage(metadata.prompt_token_count, cache_read_tokens=metadata.cached)
                )
            self._usage = chunk.usage_metadata
        if not chunk.candidates:
            feedback = chunk.prompt_feedback
            if feedback is not None and feedback.block_reason and not self.finished:
                self.finished = True
                events.append(Finish("content_filter"))
            return events
        candidate = chunk.candidates[0]
        for part in candidate.content.parts if candidate.content is not None else ():
            if part.function_call is not None:
                call = part.function_call
                arguments = json.dumps(call.args or {}, ensure_ascii=False)
                index = self._calls
                self._calls += 1
                call_id = tool_call_id(index, call.name, arguments)
                events.append(ToolCallDelta(index, call_id, call.name, arguments))
            elif part.text and not part.thought:
                events.append(TextDelta(part.text))
        if candidate.finish_reason and not self.finished:
            self.finished = True
            events.append(Finish(self._finish_reason(candidate.finish_reason)))
        return events

    def _finish_reason(self, reason: str) -> FinishReason:
        if reason == "MAX_TOKENS":
            return "length"
        if reason in _FILTERED:
            return "content_filter"
        return "tool_calls" if self._calls and reason == "STOP" else "stop"

    def end(self) -> list[Event]:
        """The closing events once the stream is over: usage, or an error if it was cut."""
        if not self.finished:
            raise UpstreamError(f"Upstream {self.provider!r} ended without a finish reason.")
        usage = self._usage
        if usage is None:
            return []
        completion = usage.candidates_token_count + usage.thoughts_token_count
        if completion > MAX_TOKEN_COUNT:
            raise UpstreamError(f"Upstream {self.provider!r} reported {completion} output tokens.")
        return [Usage(usage.prompt_token_count, completion, cache_read_tokens=usage.cached)]


# --- the provider ---------------------------------------------------------------------------


class GeminiProvider:
    """Streams chat completions from the Gemini API over HTTP (one connection pool)."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None,
        connect_timeout_s: float = 10.0,
        first_token_timeout_s: float = 120.0,
        idle_timeout_s: float = 60.0,
        max_connections: int = 2048,
        keepalive_timeout_s: float = 4.0,
    ) -> None:
        self.name = name
        base = base_url.rstrip("/")
        self._base = base.removesuffix("/" + API_VERSION)  # the path carries the version
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self._headers["x-goog-api-key"] = api_key
        self._first_token_s = first_token_timeout_s
        self._pool = UpstreamPool(
            connect_timeout_s=connect_timeout_s,
            idle_timeout_s=idle_timeout_s,
            max_connections=max_connections,
            keepalive_timeout_s=keepalive_timeout_s,
        )

    def stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        return self._stream(call)

    async def _stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        path, body = to_gemini(call)  # a translation error surfaces before any I/O
        events = stream_events(
            self._pool,
            name=self.name,
            url=self._base + path,
            payload=msgspec.json.encode(body),
            headers=self._headers,
            translator=GeminiStream(self.name),
            first_token_timeout_s=self._first_token_s,
            error_for_status=gemini_error,
        )
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    async def aclose(self) -> None:
        await self._pool.aclose()
