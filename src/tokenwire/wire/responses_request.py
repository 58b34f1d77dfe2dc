"""The Responses API request (``POST /v1/responses``, ``response.create``), decoded and
translated into a Chat Completions body (sans-I/O).

:func:`responses_request_from` validates the body with msgspec structs that name Responses
fields in their errors (``input[2].call_id``), refuses what the gateway does not support with a
400 naming the field, and returns a :class:`ResponsesPlan`: this turn's input as chat messages,
the chat fields (tools, limits, sampling), and the fields the response object echoes. The
caller prepends the conversation of ``previous_response_id`` and validates the result as a
:class:`~tokenwire.wire.schema.ChatRequest`, so every provider serves it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec

from tokenwire.errors import InvalidRequest
from tokenwire.wire.schema import MAX_OUTPUT_TOKENS, Name
from tokenwire.wire.untrusted import param_from_message

ShortText = Annotated[str, msgspec.Meta(max_length=512)]
MetadataKey = Annotated[str, msgspec.Meta(max_length=64)]


class InputText(msgspec.Struct, tag_field="type", tag="input_text"):
    text: str


class InputImage(msgspec.Struct, tag_field="type", tag="input_image", omit_defaults=True):
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] | None = None


class InputFile(msgspec.Struct, tag_field="type", tag="input_file", omit_defaults=True):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None
    file_url: str | None = None


class OutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] | None = None


class OutputRefusal(msgspec.Struct, tag_field="type", tag="refusal"):
    refusal: str


InputPart = InputText | InputImage | InputFile
ContentPart = InputText | InputImage | InputFile | OutputText | OutputRefusal


class MessageItem(msgspec.Struct, tag_field="type", tag="message"):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call"):
    call_id: Annotated[str, msgspec.Meta(min_length=1)]
    name: Name
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(msgspec.Struct, tag_field="type", tag="function_call_output"):
    call_id: Annotated[str, msgspec.Meta(min_length=1)]
    output: str | list[InputPart]
    id: str | None = None
    status: str | None = None


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem
ITEM_TYPES = ("message", "function_call", "function_call_output")


class FunctionToolParam(msgspec.Struct, tag_field="type", tag="function", omit_defaults=True):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(msgspec.Struct, tag_field="type", tag="function"):
    name: Name


ToolChoice = Literal["none", "auto", "required"] | ToolChoiceFunction


class TextFormatPlain(msgspec.Struct, tag_field="type", tag="text"):
    pass


class TextFormatJSONObject(msgspec.Struct, tag_field="type", tag="json_object"):
    pass


class TextFormatJSONSchema(msgspec.Struct, tag_field="type", tag="json_schema", omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, omit_defaults=True):
    format: TextFormatPlain | TextFormatJSONObject | TextFormatJSONSchema | None = None
    verbosity: None = None


class ReasoningConfig(msgspec.Struct, omit_defaults=True):
    effort: ShortText | None = None
    summary: None = None
    generate_summary: None = None


class ResponseStreamOptions(msgspec.Struct):
    include_obfuscation: bool | None = None


class ResponsesRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A validated Responses create body (HTTP) or ``response.create`` message (WebSocket)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    input: str | Annotated[list[InputItem], msgspec.Meta(max_length=10_000)] | None = None
    instructions: str | None = None
    tools: Annotated[list[FunctionToolParam], msgspec.Meta(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_OUTPUT_TOKENS)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    metadata: Annotated[dict[MetadataKey, ShortText], msgspec.Meta(max_length=16)] | None = None
    store: bool | None = None
    previous_response_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    stream: bool | None = None
    stream_options: ResponseStreamOptions | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    service_tier: ShortText | None = None
    user: ShortText | None = None
    safety_identifier: ShortText | None = None
    prompt_cache_key: ShortText | None = None
    truncation: Literal["disabled"] | None = None
    background: bool | None = None
    include: Annotated[list[str], msgspec.Meta(max_length=0)] | None = None
    top_logprobs: Literal[0] | None = None
    max_tool_calls: None = None


UNSUPPORTED: dict[str, str] = {
    "background": "background responses are not supported by this gateway",
    "conversation": "conversations are not supported; chain responses with previous_response_id",
    "prompt": "stored prompts are not supported; send input and instructions",
    "include": "no additional output data can be included",
    "top_logprobs": "log probabilities are not supported",
    "max_tool_calls": "built-in tools are not supported, so there are no tool calls to limit",
    "truncation": "only truncation 'disabled' is supported",
    "context_management": "context management is not supported",
    "prompt_cache_retention": "prompt cache retention is not supported",
    "prompt_cache_options": "prompt cache options are not supported",
    "moderation": "moderation is not supported",
    "image": "image options are not supported",
    "access_programs": "access programs are not supported",
    "background_options": "background responses are not supported by this gateway",
    "generate": "generate false (warming up without output) is not supported",
    "stream_id": "stream_id is only for WebSocket mode",
    "text.verbosity": "verbosity is not supported",
    "reasoning.summary": "reasoning summaries are not supported",
    "reasoning.generate_summary": "reasoning summaries are not supported",
}
"""Fields OpenAI knows that this gateway refuses (400 ``unsupported_parameter``), and why."""

_PARAM_NAMES = {"max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens"}


@dataclass
class ResponsesPlan:
    """What a validated Responses request asks for, in Chat Completions terms."""

    request: ResponsesRequest
    messages: list[dict[str, Any]]  # this turn's input as chat messages (no instructions)
    chat_fields: dict[str, Any]  # tools, tool_choice, limits, sampling… as chat fields
    echo: dict[str, Any] = field(default_factory=dict)  # the response object's request fields

    @property
    def store(self) -> bool:
        return self.request.store is not False

    @property
    def stream(self) -> bool:
        return bool(self.request.stream)

    def chat_body(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The Chat Completions body: instructions, the conversation so far, this input."""
        messages: list[dict[str, Any]] = []
        if self.request.instructions:
            messages.append({"role": "system", "content": self.request.instructions})
        messages.extend(history)
        messages.extend(self.messages)
        return {"model": self.request.model, "messages": messages, **self.chat_fields}


def responses_param(param: str | None) -> str | None:
    """A Chat Completions ``param`` from validating the translated body, in Responses terms."""
    if param is None:
        return None
    if param.startswith("messages"):
        return "input"
    return _PARAM_NAMES.get(param, param)


def responses_request_from(body: Any, *, websocket: bool = False) -> ResponsesPlan:
    """Validate a Responses body and translate it, or raise ``InvalidRequest`` naming the field.

    ``websocket``: a ``response.create`` message (its ``type`` is dropped; it always streams).
    """
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    values = dict(body)
    if websocket:
        values.pop("type", None)
        if "stream" in values:
            raise _unsupported("stream", "stream is implicit over WebSocket; do not send it")
    _refuse_unsupported(values)
    if isinstance(values.get("max_output_tokens"), float) and values["max_output_tokens"] % 1 == 0:
        values["max_output_tokens"] = int(values["max_output_tokens"])
    _require_types(values)
    items = values.get("input")
    if items == []:
        raise InvalidRequest(
            "'input' must hold at least one item.", param="input", code="invalid_value"
        )
    if isinstance(items, list):
        values["input"] = [_with_item_type(item, index) for index, item in enumerate(items)]
    try:
        request = msgspec.convert(values, ResponsesRequest)
    except msgspec.ValidationError as exc:
        text = str(exc)
        raise InvalidRequest(
            f"Invalid request: {text}", param=param_from_message(text), code="invalid_value"
        ) from None
    messages = _messages(request)
    if not messages and request.previous_response_id is None:
        raise InvalidRequest(
            "The request has no input: send 'input' (a string or a list of items).",
            param="input",
            code="missing_required_parameter",
        )
    return ResponsesPlan(request, messages, _chat_fields(request), _echo(request))


def _unsupported(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"'{param}' is not supported: {why}.", param=param, code="unsupported_parameter"
    )


def _refuse_unsupported(values: dict[str, Any]) -> None:
    """A 400 for a field OpenAI knows and this gateway does not do (its neutral value passes)."""
    neutral: tuple[object, ...] = (None, False, [], 0, "disabled")
    for name, why in UNSUPPORTED.items():
        outer, _, inner = name.partition(".")
        value = values.get(outer)
        if inner:
            value = value.get(inner) if isinstance(value, dict) else None
        if name == "generate":  # true is the default; false asks for no output
            value = None if value is True else value
            if value is False:
                raise _unsupported(name, why)
        if value is not None and not any(value is n or value == n for n in neutral):
            raise _unsupported(name, why)
    # Known to OpenAI but not to the struct (so not refused above as unknown): drop neutral ones.
    for name in ("conversation", "prompt", "context_management", "prompt_cache_retention"):
        values.pop(name, None)
    for name in ("prompt_cache_options", "moderation", "image", "access_programs"):
        values.pop(name, None)
    for name in ("background_options", "generate", "stream_id"):
        values.pop(name, None)


def _require_types(values: dict[str, Any]) -> None:
    """A 400 for a tool or a named tool choice without ``type``: msgspec takes a lone tagged
    struct without its tag, OpenAI does not."""
    tools = values.get("tools")
    places = (
        [(f"tools[{i}]", tool) for i, tool in enumerate(tools)] if isinstance(tools, list) else []
    )
    places.append(("tool_choice", values.get("tool_choice")))
    for param, value in places:
        if isinstance(value, dict) and "type" not in value:
            raise InvalidRequest(
                f"Invalid request: Object missing required field `type` - at `$.{param}`",
                param=f"{param}.type",
                code="invalid_value",
            )


def _with_item_type(item: Any, index: int) -> Any:
    """An input item with its ``type``: a bare ``{role, content}`` is a message; a type this
    gateway does not take is a 400 naming it."""
    if not isinstance(item, dict):
        return item
    if "type" not in item and "role" in item:
        return {**item, "type": "message"}
    kind = item.get("type")
    if isinstance(kind, str) and kind not in ITEM_TYPES:
        raise InvalidRequest(
            f"Input items of type {kind!r} are not supported; use one of {', '.join(ITEM_TYPES)}.",
            param=f"input[{index}].type",
            code="unsupported_value",
        )
    return item


def _messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """This turn's input as chat messages; consecutive function calls join one assistant turn."""
    if request.input is None:
        return []
    if isinstance(request.input, str):
        return [{"role": "user", "content": request.input}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(request.input):
        if isinstance(item, MessageItem):
            messages.append(_message(item, index))
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant":
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.call_id,
                    "content": _tool_output(item.output, index),
                }
            )
    return messages


def _message(item: MessageItem, index: int) -> dict[str, Any]:
    if isinstance(item.content, str):
        return {"role": item.role, "content": item.content}
    parts: list[dict[str, Any]] = []
    refusal: list[str] = []
    for number, part in enumerate(item.content):
        where = f"input[{index}].content[{number}]"
        if isinstance(part, InputText | OutputText):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, OutputRefusal) and item.role == "assistant":
            refusal.append(part.refusal)
        elif item.role != "user" or isinstance(part, OutputRefusal):
            raise InvalidRequest(
                f"A {item.role} message may hold only text parts.",
                param=f"{where}.type",
                code="unsupported_value",
            )
        else:
            parts.append(_media_part(part, where))
    message: dict[str, Any] = {"role": item.role, "content": parts}
    if refusal:
        message["refusal"] = "".join(refusal)
    return message


def _media_part(part: InputImage | InputFile, where: str) -> dict[str, Any]:
    if isinstance(part, InputImage):
        if part.image_url is None:
            raise InvalidRequest(
                "Images by file_id are not supported; send image_url (a URL or a data URL).",
                param=f"{where}.image_url",
                code="unsupported_value",
            )
        image: dict[str, Any] = {"url": part.image_url}
        if part.detail is not None:
            image["detail"] = part.detail
        return {"type": "image_url", "image_url": image}
    if part.file_url is not None:
        raise InvalidRequest(
            "Files by file_url are not supported; send file_data or file_id.",
            param=f"{where}.file_url",
            code="unsupported_value",
        )
    file = {
        name: value
        for name, value in (
            ("file_data", part.file_data),
            ("file_id", part.file_id),
            ("filename", part.filename),
        )
        if value is not None
    }
    return {"type": "file", "file": file}


def _tool_output(output: str | list[InputPart], index: int) -> str | list[dict[str, Any]]:
    if isinstance(output, str):
        return output
    parts: list[dict[str, Any]] = []
    for number, part in enumerate(output):
        if not isinstance(part, InputText):
            raise InvalidRequest(
                "A function call's output may hold only input_text parts.",
                param=f"input[{index}].output[{number}].type",
                code="unsupported_value",
            )
        parts.append({"type": "text", "text": part.text})
    return parts


def _chat_fields(request: ResponsesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {"stream": True}
    if request.tools:
        fields["tools"] = [
            {"type": "function", "function": msgspec.to_builtins(_definition(tool))}
            for tool in request.tools
        ]
    choice = request.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        fields["tool_choice"] = choice
    for name in ("parallel_tool_calls", "temperature", "top_p", "user", "service_tier"):
        value = getattr(request, name)
        if value is not None:
            fields[name] = value
    if request.max_output_tokens is not None:
        fields["max_completion_tokens"] = request.max_output_tokens
    if request.metadata is not None:
        fields["metadata"] = request.metadata
    if request.reasoning is not None and request.reasoning.effort is not None:
        fields["reasoning_effort"] = request.reasoning.effort
    text_format = None if request.text is None else request.text.format
    if isinstance(text_format, TextFormatJSONObject):
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(text_format, TextFormatJSONSchema):
        spec = msgspec.to_builtins(text_format)
        spec.pop("type", None)
        fields["response_format"] = {"type": "json_schema", "json_schema": spec}
    return fields


def _definition(tool: FunctionToolParam) -> dict[str, Any]:
    definition: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        definition["description"] = tool.description
    if tool.parameters is not None:
        definition["parameters"] = tool.parameters
    if tool.strict is not None:
        definition["strict"] = tool.strict
    return definition


def _echo(request: ResponsesRequest) -> dict[str, Any]:
    """The request's fields as the response object repeats them (OpenAI's defaults filled in)."""
    tools = [msgspec.to_builtins(tool) for tool in request.tools or ()]
    choice = request.tool_choice
    text_format: dict[str, Any] = {"type": "text"}
    if request.text is not None and request.text.format is not None:
        text_format = msgspec.to_builtins(request.text.format)
    return {
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": None,
        "metadata": request.metadata or {},
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": request.previous_response_id,
        "reasoning": {
            "effort": None if request.reasoning is None else request.reasoning.effort,
            "summary": None,
        },
        "service_tier": request.service_tier or "default",
        "store": request.store is not False,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "text": {"format": text_format},
        "tool_choice": (
            msgspec.to_builtins(choice)
            if isinstance(choice, ToolChoiceFunction)
            else choice or "auto"
        ),
        "tools": tools,
        "top_logprobs": 0,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "truncation": "disabled",
        "user": request.user,
        "background": False,
    }
