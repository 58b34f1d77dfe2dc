"""The chat-completions request schema, decoded and validated with msgspec (sans-I/O).

``decode_chat_request`` turns raw body bytes into a :class:`ChatRequest` or raises
:class:`~tokenwire.errors.InvalidRequest` naming the offending field in ``param``, the way
OpenAI does. Unknown top-level fields are ignored here; the OpenAI-compatible provider passes
the original body through, so vendor extensions still reach upstreams that understand them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from tokenwire.errors import InvalidRequest
from tokenwire.wire.untrusted import param_from_message, request_object

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]

MAX_OUTPUT_TOKENS = 2**31 - 1
"""No model's output limit is above this; each model has its own, lower one (``config.py``)."""
TokenLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_OUTPUT_TOKENS)]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
ShortText = Annotated[str, msgspec.Meta(max_length=512)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
StopSequence = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    """A text part among parts of several kinds (a user's, an assistant's)."""

    text: str


class TextOnlyPart(msgspec.Struct):
    """A text part where only text parts are allowed (system, developer and tool messages):
    its ``type`` is required as it is in a union, which a lone tagged struct would not do."""

    type: Literal["text"]
    text: str


class ImageUrl(msgspec.Struct, omit_defaults=True):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageUrlPart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: ImageUrl


class InputAudio(msgspec.Struct):
    data: str
    format: Annotated[str, msgspec.Meta(pattern="^[a-z0-9]{1,16}$")]


class InputAudioPart(msgspec.Struct, tag_field="type", tag="input_audio"):
    input_audio: InputAudio


class FileRef(msgspec.Struct, omit_defaults=True):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(msgspec.Struct, tag_field="type", tag="file"):
    file: FileRef


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
    content: str | list[TextOnlyPart]
    name: str | None = None


class DeveloperMessage(msgspec.Struct, tag_field="role", tag="developer", omit_defaults=True):
    content: str | list[TextOnlyPart]
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
    content: str | list[TextOnlyPart]
    tool_call_id: str


Message = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage


class StreamOptions(msgspec.Struct, omit_defaults=True):
    include_usage: bool = False


class FunctionDefinition(msgspec.Struct, omit_defaults=True):
    """A function the model may call; ``parameters`` is a JSON Schema object."""

    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(msgspec.Struct, tag_field="type", tag="function"):
    function: FunctionDefinition


class CustomTool(msgspec.Struct, tag_field="type", tag="custom"):
    """OpenAI's free-form tool (passed through to OpenAI-compatible upstreams only)."""

    custom: dict[str, Any]


Tool = FunctionTool | CustomTool


class NamedFunction(msgspec.Struct):
    name: Name


class FunctionChoice(msgspec.Struct, tag_field="type", tag="function"):
    """``{"type": "function", "function": {"name": …}}``: call this function."""

    function: NamedFunction


class CustomChoice(msgspec.Struct, tag_field="type", tag="custom"):
    custom: NamedFunction


class AllowedToolsChoice(msgspec.Struct, tag_field="type", tag="allowed_tools"):
    allowed_tools: dict[str, Any]


ToolChoice = (
    Literal["none", "auto", "required"] | FunctionChoice | CustomChoice | AllowedToolsChoice
)


class TextFormat(msgspec.Struct, tag_field="type", tag="text"):
    pass


class JSONObjectFormat(msgspec.Struct, tag_field="type", tag="json_object"):
    pass


class JSONSchemaSpec(msgspec.Struct, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class JSONSchemaFormat(msgspec.Struct, tag_field="type", tag="json_schema"):
    json_schema: JSONSchemaSpec


ResponseFormat = TextFormat | JSONObjectFormat | JSONSchemaFormat


class AudioOutput(msgspec.Struct):
    voice: str | dict[str, Any]
    format: str


class Prediction(msgspec.Struct):
    type: Literal["content"]
    content: str | list[TextOnlyPart]


class ChatRequest(msgspec.Struct, omit_defaults=True):
    """A validated ``POST /v1/chat/completions`` body: every field a provider reads is typed.

    Providers read only these typed values (never the raw body); the OpenAI-compatible
    provider additionally passes the original body through, so vendor extensions still reach
    upstreams that understand them.
    """

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenLimit | None = None
    max_completion_tokens: TokenLimit | None = None
    stop: StopSequence | Annotated[list[StopSequence], msgspec.Meta(max_length=4)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=1, le=MAX_OUTPUT_TOKENS)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] | None = None
    user: ShortText | None = None
    seed: Int64 | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    tools: Annotated[list[Tool], msgspec.Meta(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None = None
    audio: AudioOutput | None = None
    prediction: Prediction | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    metadata: dict[str, ShortText] | None = None
    store: bool | None = None
    service_tier: ShortText | None = None
    reasoning_effort: ShortText | None = None

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
    def output_limit_param(self) -> str:
        """The field that carries :attr:`output_limit` (for error messages)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def stop_sequences(self) -> list[str]:
        """``stop`` as a list (OpenAI accepts a string or up to four strings)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def function_tools(self) -> list[FunctionDefinition]:
        """The function tools' definitions, in order."""
        return [tool.function for tool in self.tools or () if isinstance(tool, FunctionTool)]

    @property
    def forced_function(self) -> str | None:
        """The function ``tool_choice`` forces: a named one, or the first for ``required``."""
        choice = self.tool_choice
        if isinstance(choice, FunctionChoice):
            return choice.function.name
        functions = self.function_tools
        if choice == "required" and functions:
            return functions[0].name
        return None


_decoder = msgspec.json.Decoder(ChatRequest)
_WHOLE_NUMBER_FIELDS = (
    "max_tokens",
    "max_completion_tokens",
    "n",
    "seed",
    "top_logprobs",
    "top_k",
)


def decode_chat_request(body: bytes) -> ChatRequest:
    """Decode and validate a chat-completions body, or raise ``InvalidRequest``.

    For clients of the simulator and tests; the gateway's routes decode the JSON once with
    :func:`~tokenwire.wire.untrusted.decode_json_value` and validate it with
    :func:`chat_request_from`.
    """
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
    except RecursionError:
        raise InvalidRequest(
            "The JSON body of your request is nested too deeply.", code="json_too_deep"
        ) from None
    _check_semantics(request)
    return request


def chat_request_from(body: Any, *, stream: bool | None = None) -> ChatRequest:
    """Validate a decoded chat-completions body (HTTP, or a WebSocket message with
    ``stream=True``, which always streams), or raise ``InvalidRequest`` naming the field.

    JSON has one number type: ``5.0`` is the integer five (as JSON Schema says), so the
    whole-number fields take it.
    """
    values = request_object(body, _WHOLE_NUMBER_FIELDS)
    if stream is not None:
        values["stream"] = stream
    try:
        request = msgspec.convert(values, ChatRequest)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    _check_semantics(request)
    return request


def convert_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Validate a WebSocket message's chat body, which always streams."""
    return chat_request_from(body, stream=True)


def _invalid(exc: msgspec.ValidationError) -> InvalidRequest:
    text = str(exc)
    param = param_from_message(text)
    if param == "n":
        return InvalidRequest(
            "n > 1 is not supported by this gateway; request one choice (n=1) per call.",
            param="n",
            code="unsupported_value",
        )
    return InvalidRequest(f"Invalid request: {text}", param=param, code="invalid_value")


def _check_semantics(request: ChatRequest) -> None:
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
    return "".join(part.text for part in content if isinstance(part, TextPart | TextOnlyPart))
