"""The chat-completions request schema, decoded and validated with msgspec (sans-I/O).

``decode_chat_request`` turns raw body bytes into a :class:`ChatRequest` or raises
:class:`~tokenwire.errors.InvalidRequest` naming the offending field in ``param``, the way
OpenAI does. Unknown top-level fields are ignored here; the OpenAI-compatible provider passes
the original body through, so vendor extensions still reach upstreams that understand them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from tokenwire.errors import InvalidRequest

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ImageUrlPart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: dict[str, Any]


class InputAudioPart(msgspec.Struct, tag_field="type", tag="input_audio"):
    input_audio: dict[str, Any]


class FilePart(msgspec.Struct, tag_field="type", tag="file"):
    file: dict[str, Any]


class RefusalPart(msgspec.Struct, tag_field="type", tag="refusal"):
    refusal: str


UserPart = TextPart | ImageUrlPart | InputAudioPart | FilePart


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class SystemMessage(msgspec.Struct, tag_field="role", tag="system", omit_defaults=True):
    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(msgspec.Struct, tag_field="role", tag="developer", omit_defaults=True):
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(msgspec.Struct, tag_field="role", tag="user", omit_defaults=True):
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(msgspec.Struct, tag_field="role", tag="assistant", omit_defaults=True):
    content: str | list[TextPart | RefusalPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


class ToolMessage(msgspec.Struct, tag_field="role", tag="tool", omit_defaults=True):
    content: str | list[TextPart]
    tool_call_id: str


Message = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage


class StreamOptions(msgspec.Struct, omit_defaults=True):
    include_usage: bool = False


class ChatRequest(msgspec.Struct, omit_defaults=True):
    """A validated ``POST /v1/chat/completions`` body."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PosInt | None = None
    max_completion_tokens: PosInt | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=4)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    n: PosInt | None = None
    user: str | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        """Whether the client asked for the trailing usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def output_limit(self) -> int | None:
        """The token limit, from ``max_completion_tokens`` or the older ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def stop_sequences(self) -> list[str]:
        """``stop`` as a list (OpenAI accepts a string or up to four strings)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


_decoder = msgspec.json.Decoder(ChatRequest)
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def param_from_message(message: str) -> str | None:
    """OpenAI's ``param`` from a msgspec error: ``at `$.messages[0].role``` becomes
    ``messages[0].role``; a missing field is named too (``messages[0].tool_call_id``)."""
    match = _PATH.search(message)
    path = match.group(1) if match is not None else ""
    missing = _MISSING.search(message)
    if missing is not None:
        return f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None


def decode_chat_request(body: bytes) -> ChatRequest:
    """Decode and validate a chat-completions body, or raise ``InvalidRequest``."""
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON chat-completions object.")
    try:
        request = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc}).", code="invalid_json"
        ) from None
    except UnicodeDecodeError:
        raise InvalidRequest(
            "The request body is not valid UTF-8.", code="invalid_encoding"
        ) from None
    _check_semantics(request)
    return request


def convert_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Validate an already-parsed body (a WebSocket message), which always streams."""
    try:
        request = msgspec.convert({**body, "stream": True}, ChatRequest)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    _check_semantics(request)
    return request


def _invalid(exc: msgspec.ValidationError) -> InvalidRequest:
    text = str(exc)
    return InvalidRequest(
        f"Invalid request: {text}", param=param_from_message(text), code="invalid_value"
    )


def _check_semantics(request: ChatRequest) -> None:
    if not request.messages:
        raise InvalidRequest(
            "'messages' must contain at least one message.", param="messages", code="invalid_value"
        )
    if request.n is not None and request.n > 1:
        raise InvalidRequest(
            "n > 1 is not supported by this gateway; request one choice (n=1) per call.",
            param="n",
            code="unsupported_value",
        )
    if any(not s for s in request.stop_sequences):
        raise InvalidRequest("'stop' sequences must not be empty strings.", param="stop")
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )


def content_text(content: str | list[Any] | None) -> str:
    """The plain text of a message's content (text parts joined; other parts skipped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if isinstance(part, TextPart))
