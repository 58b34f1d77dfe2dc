"""Anthropic Messages API requests (``POST /v1/messages``) as the gateway's ``ChatRequest``.

:func:`messages_request_from` validates a decoded body with msgspec and translates it into the
same typed :class:`~tokenwire.wire.schema.ChatRequest` that chat completions use, so every
model in the catalog serves it. The Anthropic provider translates that request back into the
same Messages body (a Claude model receives what the client sent, in meaning), the others
translate it into their own::

    system (string or text blocks)      a system message
    messages[].content string           the turn's text
      text blocks                       text parts
      image (base64 | url source)       image_url parts (a data: URL for base64)
      document (base64 PDF)             a file part (a data: URL)
      tool_use (assistant)              tool_calls (``input`` as JSON ``arguments``)
      tool_result (user)                a tool message per block, before the turn's other
                                        content; text blocks joined; ``is_error`` prefixes
                                        the text with "Error: " (chat has no such flag)
    max_tokens (required)               max_tokens
    stop_sequences (at most 4)          stop
    temperature, top_p, top_k           temperature, top_p, top_k
    tools (custom tools)                function tools (``input_schema`` → parameters)
    tool_choice auto|any|tool|none      auto | required | {function} | none
      disable_parallel_tool_use         parallel_tool_calls: false
    metadata.user_id                    user
    stream                              stream (with usage: the stream reports it)

Ignored, as they do not change the answer: ``cache_control`` (anywhere), ``service_tier``,
``inference_geo``, ``speed``, ``diagnostics``, ``thinking: {"type": "disabled"}``. Refused
with a 400 naming the field: any other ``thinking``, server tools (a ``tools[i].type`` other
than ``custom``), ``container``, ``mcp_servers``, ``context_management``, ``output_config``,
``output_format``, ``thinking`` and ``redacted_thinking`` blocks, images in tool results,
document sources other than a base64 PDF, citations, image ``file`` sources, more than four
stop sequences. Unknown fields are ignored, as chat completions ignores them.

The translated body (``msgspec.to_builtins`` of the request) is what an OpenAI-compatible
upstream receives.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from tokenwire.errors import InvalidRequest, UnsupportedParameter
from tokenwire.wire import schema
from tokenwire.wire.anthropic import IMAGE_TYPES
from tokenwire.wire.schema import MAX_OUTPUT_TOKENS, ChatRequest, Name, ShortText, TokenLimit
from tokenwire.wire.untrusted import param_from_message

MAX_STOP_SEQUENCES = 4
"""What the chat request (and OpenAI) can carry; Anthropic allows more."""

# -- the request, as Anthropic documents it ---------------------------------------------------


class TextBlock(msgspec.Struct, tag_field="type", tag="text"):
    text: str
    citations: list[Any] | None = None


class Base64Source(msgspec.Struct, tag_field="type", tag="base64"):
    media_type: Annotated[str, msgspec.Meta(max_length=128)]
    data: str


class URLSource(msgspec.Struct, tag_field="type", tag="url"):
    url: str


class FileSource(msgspec.Struct, tag_field="type", tag="file"):
    file_id: str


class PlainTextSource(msgspec.Struct, tag_field="type", tag="text"):
    media_type: str
    data: str


class ContentSource(msgspec.Struct, tag_field="type", tag="content"):
    content: str | list[Any]


class ImageBlock(msgspec.Struct, tag_field="type", tag="image"):
    source: Base64Source | URLSource | FileSource


class CitationsConfig(msgspec.Struct):
    enabled: bool = False


class DocumentBlock(msgspec.Struct, tag_field="type", tag="document"):
    source: Base64Source | URLSource | FileSource | PlainTextSource | ContentSource
    title: str | None = None
    context: str | None = None
    citations: CitationsConfig | None = None


class ToolUseBlock(msgspec.Struct, tag_field="type", tag="tool_use"):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    name: Name
    input: dict[str, Any]


class ToolResultBlock(msgspec.Struct, tag_field="type", tag="tool_result"):
    tool_use_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    content: str | list[TextBlock | ImageBlock | DocumentBlock] | None = None
    is_error: bool = False


class ThinkingBlock(msgspec.Struct, tag_field="type", tag="thinking"):
    thinking: str = ""
    signature: str = ""


class RedactedThinkingBlock(msgspec.Struct, tag_field="type", tag="redacted_thinking"):
    data: str = ""


ContentBlock = (
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock
)


class MessageParam(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolParam(msgspec.Struct):
    """A client tool (``type`` absent or ``custom``); server tools are refused."""

    name: Name
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: Annotated[str, msgspec.Meta(max_length=128)] | None = None


class ToolChoiceAuto(msgspec.Struct, tag_field="type", tag="auto"):
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(msgspec.Struct, tag_field="type", tag="any"):
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(msgspec.Struct, tag_field="type", tag="tool"):
    name: Name
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(msgspec.Struct, tag_field="type", tag="none"):
    pass


class Metadata(msgspec.Struct, forbid_unknown_fields=True):
    user_id: ShortText | None = None


class ThinkingConfig(msgspec.Struct):
    type: Annotated[str, msgspec.Meta(max_length=64)]


StopSequence = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class MessagesRequest(msgspec.Struct):
    """A validated ``POST /v1/messages`` body (the fields the gateway reads)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    messages: Annotated[list[MessageParam], msgspec.Meta(min_length=1)]
    max_tokens: TokenLimit
    system: str | list[TextBlock] | None = None
    stop_sequences: list[StopSequence] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=1, le=MAX_OUTPUT_TOKENS)] | None = None
    tools: Annotated[list[ToolParam], msgspec.Meta(max_length=128)] | None = None
    tool_choice: ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone | None = None
    metadata: Metadata | None = None
    stream: bool = False
    thinking: ThinkingConfig | None = None


_UNSUPPORTED_FIELDS = (
    "container",
    "mcp_servers",
    "context_management",
    "output_config",
    "output_format",
)
_WHOLE_NUMBER_FIELDS = ("max_tokens", "top_k")


# -- validation ---------------------------------------------------------------------------------


def _unsupported(param: str, what: str) -> UnsupportedParameter:
    return UnsupportedParameter(f"{what} is not supported by this gateway.", param=param)


def messages_request_from(body: Any) -> MessagesRequest:
    """Validate a decoded Messages body, or raise ``InvalidRequest`` naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    for name in _UNSUPPORTED_FIELDS:
        if body.get(name) is not None:
            raise _unsupported(name, f"'{name}'")
    values = dict(body)
    for name in _WHOLE_NUMBER_FIELDS:
        value = values.get(name)
        if isinstance(value, float) and value.is_integer():
            values[name] = int(value)
    try:
        request = msgspec.convert(values, MessagesRequest)
    except msgspec.ValidationError as exc:
        text = str(exc)
        raise InvalidRequest(
            f"Invalid request: {text}", param=param_from_message(text), code="invalid_value"
        ) from None
    if request.thinking is not None and request.thinking.type != "disabled":
        raise _unsupported("thinking", "Extended thinking")
    if request.stop_sequences is not None and len(request.stop_sequences) > MAX_STOP_SEQUENCES:
        raise _unsupported(
            "stop_sequences", f"More than {MAX_STOP_SEQUENCES} entries in 'stop_sequences'"
        )
    return request


# -- translation ------------------------------------------------------------------------------


def _text_parts(blocks: list[TextBlock], param: str) -> list[schema.TextOnlyPart]:
    for j, block in enumerate(blocks):
        if block.citations:
            raise _unsupported(f"{param}[{j}].citations", "Citations")
    return [schema.TextOnlyPart(type="text", text=block.text) for block in blocks]


def _image(block: ImageBlock, param: str) -> schema.ImageUrlPart:
    source = block.source
    if isinstance(source, Base64Source):
        if source.media_type not in IMAGE_TYPES:
            raise InvalidRequest(
                f"An image's media_type must be one of {', '.join(sorted(IMAGE_TYPES))}.",
                param=f"{param}.source.media_type",
                code="invalid_value",
            )
        url = f"data:{source.media_type};base64,{source.data}"
    elif isinstance(source, URLSource):
        url = source.url
    else:
        raise _unsupported(f"{param}.source.type", "An image 'file' source")
    return schema.ImageUrlPart(image_url=schema.ImageUrl(url=url))


def _document(block: DocumentBlock, param: str) -> schema.FilePart:
    if block.citations is not None and block.citations.enabled:
        raise _unsupported(f"{param}.citations", "Citations")
    source = block.source
    if not isinstance(source, Base64Source) or source.media_type != "application/pdf":
        raise _unsupported(f"{param}.source", "A document source other than a base64 PDF")
    file_data = f"data:application/pdf;base64,{source.data}"
    return schema.FilePart(file=schema.FileRef(file_data=file_data, filename=block.title))


def _tool_result(block: ToolResultBlock, param: str) -> schema.ToolMessage:
    content = block.content
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        texts: list[str] = []
        for j, part in enumerate(content):
            if not isinstance(part, TextBlock):
                what = "Content other than text in a tool result"
                raise _unsupported(f"{param}.content[{j}]", what)
            texts.append(part.text)
        text = "\n".join(texts)
    if block.is_error:
        text = f"Error: {text}" if text else "Error"
    return schema.ToolMessage(content=text, tool_call_id=block.tool_use_id)


def _user_turn(message: MessageParam, index: int) -> list[schema.Message]:
    if isinstance(message.content, str):
        return [schema.UserMessage(content=message.content)]
    results: list[schema.Message] = []
    parts: list[schema.UserPart] = []
    for j, block in enumerate(message.content):
        param = f"messages[{index}].content[{j}]"
        if isinstance(block, TextBlock):
            if block.citations:
                raise _unsupported(f"{param}.citations", "Citations")
            parts.append(schema.TextPart(text=block.text))
        elif isinstance(block, ImageBlock):
            parts.append(_image(block, param))
        elif isinstance(block, DocumentBlock):
            parts.append(_document(block, param))
        elif isinstance(block, ToolResultBlock):
            results.append(_tool_result(block, param))
        else:
            raise InvalidRequest(
                f"A '{block_type(block)}' block cannot be in a user turn.", param=f"{param}.type"
            )
    if parts or not results:
        results.append(schema.UserMessage(content=parts))
    return results


def _assistant_turn(message: MessageParam, index: int) -> schema.AssistantMessage:
    if isinstance(message.content, str):
        return schema.AssistantMessage(content=message.content)
    texts: list[str] = []
    calls: list[schema.ToolCall] = []
    for j, block in enumerate(message.content):
        param = f"messages[{index}].content[{j}]"
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            arguments = msgspec.json.encode(block.input).decode()
            calls.append(schema.ToolCall(block.id, schema.FunctionCall(block.name, arguments)))
        elif isinstance(block, ThinkingBlock | RedactedThinkingBlock):
            raise _unsupported(f"{param}.type", f"A '{block_type(block)}' block")
        else:
            raise InvalidRequest(
                f"A '{block_type(block)}' block cannot be in an assistant turn.",
                param=f"{param}.type",
            )
    return schema.AssistantMessage(content="".join(texts), tool_calls=calls or None)


def block_type(block: msgspec.Struct) -> str:
    """The ``type`` tag of a content block."""
    return str(block.__struct_config__.tag)


def _tools(tools: list[ToolParam]) -> list[schema.Tool]:
    result: list[schema.Tool] = []
    for i, tool in enumerate(tools):
        if tool.type not in (None, "custom"):
            raise _unsupported(f"tools[{i}].type", f"The server tool {tool.type!r}")
        if tool.input_schema is None:
            raise InvalidRequest(
                "A tool needs an 'input_schema'.",
                param=f"tools[{i}].input_schema",
                code="invalid_value",
            )
        definition = schema.FunctionDefinition(
            name=tool.name, description=tool.description, parameters=tool.input_schema
        )
        result.append(schema.FunctionTool(function=definition))
    return result


def _tool_choice(request: MessagesRequest) -> tuple[schema.ToolChoice | None, bool | None]:
    choice = request.tool_choice
    if choice is None:
        return None, None
    if isinstance(choice, ToolChoiceNone):
        return "none", None
    parallel = False if choice.disable_parallel_tool_use else None
    if isinstance(choice, ToolChoiceAuto):
        return "auto", parallel
    if not request.tools:
        raise InvalidRequest("'tool_choice' needs 'tools'.", param="tool_choice")
    if isinstance(choice, ToolChoiceAny):
        return "required", parallel
    if choice.name not in {tool.name for tool in request.tools}:
        raise InvalidRequest(
            f"'tool_choice' names {choice.name!r}, which is not in 'tools'.",
            param="tool_choice.name",
        )
    return schema.FunctionChoice(function=schema.NamedFunction(name=choice.name)), parallel


def to_chat_request(request: MessagesRequest) -> ChatRequest:
    """The chat request that means what ``request`` means (see the module docstring)."""
    messages: list[schema.Message] = []
    if isinstance(request.system, str):
        if request.system:
            messages.append(schema.SystemMessage(content=request.system))
    elif request.system:
        messages.append(schema.SystemMessage(content=_text_parts(request.system, "system")))
    for i, message in enumerate(request.messages):
        if message.role == "user":
            messages.extend(_user_turn(message, i))
        else:
            messages.append(_assistant_turn(message, i))
    tool_choice, parallel = _tool_choice(request)
    return ChatRequest(
        model=request.model,
        messages=messages,
        stream=request.stream,
        stream_options=schema.StreamOptions(include_usage=True) if request.stream else None,
        max_tokens=request.max_tokens,
        stop=request.stop_sequences or None,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        tools=_tools(request.tools) if request.tools else None,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        user=request.metadata.user_id if request.metadata is not None else None,
    )


def chat_body(request: ChatRequest) -> dict[str, Any]:
    """The chat-completions JSON object of ``request`` (for OpenAI-compatible upstreams)."""
    body: dict[str, Any] = msgspec.to_builtins(request)
    return body
