"""The objects the client returns, with the ``openai`` SDK's attribute paths.

``chunk.choices[0].delta.content``, ``chunk.choices[0].delta.tool_calls[0].function.arguments``,
``chunk.usage.completion_tokens``, ``completion.choices[0].message.content`` read as they do
with ``openai``. Each object is built from the gateway's JSON by ``from_dict`` (unknown fields
are ignored, missing optional ones are None); ``to_dict()`` gives back the JSON it came from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

MICRO = Decimal(1_000_000)


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _map(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


@dataclass(frozen=True, slots=True)
class CompletionUsage:
    """Tokens used, and (from a tokenwire gateway) what the completion was charged."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micro: int | None = None  # integer micro-dollars: the ledger row's charge

    @property
    def cost_usd(self) -> Decimal | None:
        """``cost_micro`` in US dollars (exact)."""
        return None if self.cost_micro is None else Decimal(self.cost_micro) / MICRO

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompletionUsage:
        prompt = _int(data.get("prompt_tokens")) or 0
        completion = _int(data.get("completion_tokens")) or 0
        total = _int(data.get("total_tokens"))
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion if total is None else total,
            cost_micro=_int(data.get("cost_micro")),
        )


@dataclass(frozen=True, slots=True)
class FunctionCallDelta:
    """A fragment of a streamed tool call's function: its name (first) and arguments text."""

    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True, slots=True)
class ChoiceDeltaToolCall:
    """A fragment of a streamed tool call; fragments with the same ``index`` join up."""

    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionCallDelta | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChoiceDeltaToolCall:
        function = data.get("function")
        return cls(
            index=_int(data.get("index")) or 0,
            id=_str(data.get("id")),
            type=_str(data.get("type")),
            function=None
            if not isinstance(function, Mapping)
            else FunctionCallDelta(_str(function.get("name")), _str(function.get("arguments"))),
        )


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """What one chunk adds to the answer."""

    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChoiceDelta:
        calls = data.get("tool_calls")
        return cls(
            role=_str(data.get("role")),
            content=_str(data.get("content")),
            refusal=_str(data.get("refusal")),
            tool_calls=None
            if not isinstance(calls, list)
            else [ChoiceDeltaToolCall.from_dict(_map(c)) for c in calls],
        )


@dataclass(frozen=True, slots=True)
class ChunkChoice:
    """One choice of a chunk (the gateway serves one: ``index`` 0)."""

    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChunkChoice:
        return cls(
            index=_int(data.get("index")) or 0,
            delta=ChoiceDelta.from_dict(_map(data.get("delta"))),
            finish_reason=_str(data.get("finish_reason")),
        )


@dataclass(frozen=True, slots=True)
class ChatCompletionChunk:
    """One ``chat.completion.chunk``; ``sequence_number`` is its event number in the stream."""

    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    object: str = "chat.completion.chunk"
    sequence_number: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], sequence_number: int | None = None
    ) -> ChatCompletionChunk:
        usage = data.get("usage")
        return cls(
            id=_str(data.get("id")) or "",
            created=_int(data.get("created")) or 0,
            model=_str(data.get("model")) or "",
            choices=[ChunkChoice.from_dict(_map(c)) for c in _list(data.get("choices"))],
            usage=CompletionUsage.from_dict(usage) if isinstance(usage, Mapping) else None,
            object=_str(data.get("object")) or "chat.completion.chunk",
            sequence_number=sequence_number,
            raw=data,
        )

    @property
    def text(self) -> str:
        """The content this chunk adds ("" when none)."""
        if not self.choices:
            return ""
        return self.choices[0].delta.content or ""

    def to_dict(self) -> dict[str, Any]:
        """The chunk's JSON as the gateway sent it (without envelope fields)."""
        return dict(self.raw)


@dataclass(frozen=True, slots=True)
class Function:
    """A whole tool call's function: name and JSON arguments text."""

    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatCompletionMessageToolCall:
    """A whole tool call of the answer."""

    id: str
    function: Function
    type: str = "function"


@dataclass(frozen=True, slots=True)
class ChatCompletionMessage:
    """The answer's message."""

    role: str
    content: str | None
    tool_calls: list[ChatCompletionMessageToolCall] | None = None
    refusal: str | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    """One choice of a completion."""

    index: int
    message: ChatCompletionMessage
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class ChatCompletion:
    """A whole ``chat.completion`` (``stream=False``, or a stream's chunks put together)."""

    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage | None = None
    object: str = "chat.completion"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatCompletion:
        choices = []
        for item in _list(data.get("choices")):
            choice = _map(item)
            message = _map(choice.get("message"))
            calls = [
                ChatCompletionMessageToolCall(
                    id=_str(_map(c).get("id")) or "",
                    type=_str(_map(c).get("type")) or "function",
                    function=Function(
                        name=_str(_map(_map(c).get("function")).get("name")) or "",
                        arguments=_str(_map(_map(c).get("function")).get("arguments")) or "",
                    ),
                )
                for c in _list(message.get("tool_calls"))
            ]
            choices.append(
                Choice(
                    index=_int(choice.get("index")) or 0,
                    message=ChatCompletionMessage(
                        role=_str(message.get("role")) or "assistant",
                        content=_str(message.get("content")),
                        tool_calls=calls or None,
                        refusal=_str(message.get("refusal")),
                    ),
                    finish_reason=_str(choice.get("finish_reason")),
                )
            )
        usage = data.get("usage")
        return cls(
            id=_str(data.get("id")) or "",
            created=_int(data.get("created")) or 0,
            model=_str(data.get("model")) or "",
            choices=choices,
            usage=CompletionUsage.from_dict(usage) if isinstance(usage, Mapping) else None,
        )


class CompletionAccumulator:
    """Puts a stream's chunks together into the :class:`ChatCompletion` they add up to."""

    def __init__(self) -> None:
        self.id = ""
        self.created = 0
        self.model = ""
        self.text: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, dict[str, str]] = {}
        self.finish_reason: str | None = None
        self.usage: CompletionUsage | None = None

    def add(self, chunk: ChatCompletionChunk) -> None:
        """Fold one chunk in."""
        self.id = self.id or chunk.id
        self.created = self.created or chunk.created
        self.model = self.model or chunk.model
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                self.text.append(delta.content)
            if delta.refusal:
                self.refusal.append(delta.refusal)
            for call in delta.tool_calls or ():
                whole = self.tool_calls.setdefault(call.index, {"id": "", "name": "", "args": ""})
                whole["id"] = call.id or whole["id"]
                if call.function is not None:
                    whole["name"] += call.function.name or ""
                    whole["args"] += call.function.arguments or ""
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason

    def completion(self) -> ChatCompletion:
        """The completion so far."""
        calls = [
            ChatCompletionMessageToolCall(
                id=c["id"], function=Function(name=c["name"], arguments=c["args"])
            )
            for _, c in sorted(self.tool_calls.items())
        ]
        message = ChatCompletionMessage(
            role="assistant",
            content="".join(self.text) if self.text or not calls else None,
            tool_calls=calls or None,
            refusal="".join(self.refusal) or None,
        )
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[Choice(index=0, message=message, finish_reason=self.finish_reason)],
            usage=self.usage,
        )


@dataclass(frozen=True, slots=True)
class Model:
    """A model of the gateway's catalog."""

    id: str
    owned_by: str | None = None
    created: int | None = None
    available: bool | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    object: str = "model"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Model:
        available = data.get("available")
        return cls(
            id=_str(data.get("id")) or "",
            owned_by=_str(data.get("owned_by")),
            created=_int(data.get("created")),
            available=available if isinstance(available, bool) else None,
            raw=data,
        )

    @property
    def pricing(self) -> Mapping[str, Any]:
        """The catalog's ``pricing`` object (USD per 1M tokens), empty when not given."""
        return _map(self.raw.get("pricing"))


@dataclass(frozen=True, slots=True)
class ModelList:
    """``GET /v1/models``: iterate it, or read ``data``."""

    data: list[Model]
    object: str = "list"

    def __iter__(self) -> Iterator[Model]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class KeyValidation:
    """The answer of ``validate_key()``: true when the gateway accepts the key, and why not."""

    valid: bool
    reason: str

    def __bool__(self) -> bool:
        return self.valid
