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

Ignored, as they do not change the answer: ``cache_control`` (anywhere), ``citations`` of
text blocks, ``service_tier``, ``inference_geo``, ``speed``, ``diagnostics``, ``thinking:
{"type": "disabled"}``, unknown fields (as chat completions ignores them). Refused with a 400
naming the field (the schema in ``/openapi.json`` says the same): any other ``thinking``,
server tools (a ``tools[i].type`` other than ``custom``), ``container``, ``mcp_servers``,
``context_management``, ``output_config``, ``output_format``, ``thinking`` and
``redacted_thinking`` blocks, images in tool results, image ``file`` sources, documents other
than a base64 PDF, document citations, more than four stop sequences, a ``tool_choice`` that
names no tool of ``tools`` (code ``tool_choice_not_in_tools``).

The translated body (``msgspec.to_builtins`` of the request) is what an OpenAI-compatible
upstream receives.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from tokenwire.errors import InvalidRequest, UnsupportedParameter
from tokenwire.wire import schema
from tokenwire.wire.anthropic import ImageType
from tokenwire.wire.schema import MAX_OUTPUT_TOKENS, ChatRequest, Name, ShortText, TokenLimit
from tokenwire.wire.untrusted import param_from_message, request_object

MAX_STOP_SEQUENCES = 4
"""What the chat request (and OpenAI) can carry; Anthropic allows more."""
TOOL_CHOICE_NOT_IN_TOOLS = "tool_choice_not_in_tools"
"""The code of a ``tool_choice`` that names a tool not in ``tools`` (or any, without tools):
a rule across two fields, which the request's JSON Schema cannot state."""

# -- the request, as Anthropic documents it ---------------------------------------------------


class TextBlock(msgspec.Struct, tag_field="type", tag="text"):
    """A text block (``cache_control`` and ``citations`` on it are ignored)."""

    text: str


class TextOnlyBlock(msgspec.Struct):
    """A text block where only text blocks are allowed (``system``, a tool result): its
    ``type`` is required, as in a union of blocks, which a lone tagged struct would not do."""

    type: Literal["text"]
    text: str


class Base64ImageSource(msgspec.Struct, tag_field="type", tag="base64"):
    media_type: ImageType
    data: str


class URLSource(msgspec.Struct, tag_field="type", tag="url"):
    url: str


class ImageBlock(msgspec.Struct, tag_field="type", tag="image"):
    source: Base64ImageSource | URLSource


class Base64PDFSource(msgspec.Struct):
    """A document's source: only base64 (its ``type`` required, as a lone tagged struct's
    would not be)."""

    type: Literal["base64"]
    media_type: Literal["application/pdf"]
    data: str


class CitationsConfig(msgspec.Struct):
    enabled: Literal[False] = False


class DocumentBlock(msgspec.Struct, tag_field="type", tag="document"):
    """A PDF document; only a base64 source can be carried to every provider."""

    source: Base64PDFSource
    title: str | None = None
    context: str | None = None
    citations: CitationsConfig | None = None


class ToolUseBlock(msgspec.Struct, tag_field="type", tag="tool_use"):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    name: Name
    input: dict[str, Any]


class ToolResultBlock(msgspec.Struct, tag_field="type", tag="tool_result"):
    tool_use_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    content: str | list[TextOnlyBlock] | None = None
    is_error: bool = False


class UserTurn(msgspec.Struct, tag_field="role", tag="user"):
    content: str | list[TextBlock | ImageBlock | DocumentBlock | ToolResultBlock]


class AssistantTurn(msgspec.Struct, tag_field="role", tag="assistant"):
    content: str | list[TextBlock | ToolUseBlock]


class ToolParam(msgspec.Struct):
    """A client tool; server tools (another ``type``) are refused."""

    name: Name
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None


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


class ThinkingDisabled(msgspec.Struct):
    type: Literal["disabled"]


StopSequence = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class MessagesRequest(msgspec.Struct):
    """A validated ``POST /v1/messages`` body (its schema is the one ``/openapi.json`` shows).

    The fields typed ``None`` are Anthropic features the gateway does not offer: present and
    not null, they are refused with a 400 naming them.
    """

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    messages: Annotated[list[UserTurn | AssistantTurn], msgspec.Meta(min_length=1)]
    max_tokens: TokenLimit
    system: str | list[TextOnlyBlock] | None = None
    stop_sequences: (
        Annotated[list[StopSequence], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None
    ) = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=1, le=MAX_OUTPUT_TOKENS)] | None = None
    tools: Annotated[list[ToolParam], msgspec.Meta(max_length=128)] | None = None
    tool_choice: ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone | None = None
    metadata: Metadata | None = None
    stream: bool = False
    thinking: ThinkingDisabled | None = None
    container: None = None
    mcp_servers: None = None
    context_management: None = None
    output_config: None = None
    output_format: None = None


_UNSUPPORTED = {
    "container": "Containers ('container')",
    "mcp_servers": "MCP servers ('mcp_servers')",
    "context_management": "'context_management'",
    "output_config": "'output_config'",
    "output_format": "Structured outputs ('output_format')",
    "thinking.type": "Extended thinking (a 'thinking' type other than disabled)",
}
"""What an unsupported field is, for the 400 that names it."""
_SERVER_TOOL = re.compile(r"tools\[\d+\]\.type")
_BLOCK_TYPE = re.compile(r"messages\[\d+\]\.content\[\d+\]\.type")
_WHOLE_NUMBER_FIELDS = ("max_tokens", "top_k")


# -- validation ---------------------------------------------------------------------------------


def _unsupported(param: str, what: str) -> UnsupportedParameter:
    return UnsupportedParameter(
        f"{what} is not supported by this gateway (see docs/apis.md).", param=param
    )


def _invalid(exc: msgspec.ValidationError) -> InvalidRequest:
    text = str(exc)
    param = param_from_message(text)
    if param in _UNSUPPORTED:
        return _unsupported(param, _UNSUPPORTED[param])
    if param is not None and _SERVER_TOOL.fullmatch(param):
        return _unsupported(param, "A server tool (a tool 'type' other than custom)")
    if param is not None and _BLOCK_TYPE.fullmatch(param):
        text += (
            " (user turns take text, image, document and tool_result blocks; assistant turns "
            "text and tool_use blocks)"
        )
    return InvalidRequest(f"Invalid request: {text}", param=param, code="invalid_value")


def messages_request_from(body: Any) -> MessagesRequest:
    """Validate a decoded Messages body, or raise ``InvalidRequest`` naming the field."""
    values = request_object(body, _WHOLE_NUMBER_FIELDS)
    try:
        return msgspec.convert(values, MessagesRequest)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None


# -- translation ------------------------------------------------------------------------------


def _image(block: ImageBlock) -> schema.ImageUrlPart:
    source = block.source
    if isinstance(source, Base64ImageSource):
        url = f"data:{source.media_type};base64,{source.data}"
    else:
        url = source.url
    return schema.ImageUrlPart(image_url=schema.ImageUrl(url=url))


def _document(block: DocumentBlock) -> schema.FilePart:
    file_data = f"data:application/pdf;base64,{block.source.data}"
    return schema.FilePart(file=schema.FileRef(file_data=file_data, filename=block.title))


def _tool_result(block: ToolResultBlock) -> schema.ToolMessage:
    content = block.content
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        text = "\n".join(part.text for part in content)
    if block.is_error:
        text = f"Error: {text}" if text else "Error"
    return schema.ToolMessage(content=text, tool_call_id=block.tool_use_id)


def _user_turn(turn: UserTurn) -> list[schema.Message]:
    if isinstance(turn.content, str):
        return [schema.UserMessage(content=turn.content)]
    results: list[schema.Message] = []
    parts: list[schema.UserPart] = []
    for block in turn.content:
        if isinstance(block, TextBlock):
            parts.append(schema.TextPart(text=block.text))
        elif isinstance(block, ImageBlock):
            parts.append(_image(block))
        elif isinstance(block, DocumentBlock):
            parts.append(_document(block))
        else:
            results.append(_tool_result(block))
    if parts or not results:
        results.append(schema.UserMessage(content=parts))
    return results


def _assistant_turn(turn: AssistantTurn) -> schema.AssistantMessage:
    if isinstance(turn.content, str):
        return schema.AssistantMessage(content=turn.content)
    texts: list[str] = []
    calls: list[schema.ToolCall] = []
    for block in turn.content:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        else:
            arguments = msgspec.json.encode(block.input).decode()
            calls.append(schema.ToolCall(block.id, schema.FunctionCall(block.name, arguments)))
    return schema.AssistantMessage(content="".join(texts), tool_calls=calls or None)


def _tools(tools: list[ToolParam]) -> list[schema.Tool]:
    return [
        schema.FunctionTool(
            function=schema.FunctionDefinition(
                name=tool.name, description=tool.description, parameters=tool.input_schema
            )
        )
        for tool in tools
    ]


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
        raise InvalidRequest(
            f"A tool_choice of type {block_type(choice)!r} needs 'tools'.",
            param="tool_choice",
            code=TOOL_CHOICE_NOT_IN_TOOLS,
        )
    if isinstance(choice, ToolChoiceAny):
        return "required", parallel
    if choice.name not in {tool.name for tool in request.tools}:
        raise InvalidRequest(
            f"'tool_choice' names {choice.name!r}, which is not in 'tools'.",
            param="tool_choice.name",
            code=TOOL_CHOICE_NOT_IN_TOOLS,
        )
    return schema.FunctionChoice(function=schema.NamedFunction(name=choice.name)), parallel


def block_type(block: msgspec.Struct) -> str:
    """The ``type`` tag of a tagged struct (a content block, a tool choice)."""
    return str(block.__struct_config__.tag)


def to_chat_request(request: MessagesRequest) -> ChatRequest:
    """The chat request that means what ``request`` means (see the module docstring)."""
    messages: list[schema.Message] = []
    if isinstance(request.system, str):
        if request.system:
            messages.append(schema.SystemMessage(content=request.system))
    elif request.system:
        parts = [schema.TextOnlyPart(type="text", text=block.text) for block in request.system]
        messages.append(schema.SystemMessage(content=parts))
    for turn in request.messages:
        if isinstance(turn, UserTurn):
            messages.extend(_user_turn(turn))
        else:
            messages.append(_assistant_turn(turn))
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
