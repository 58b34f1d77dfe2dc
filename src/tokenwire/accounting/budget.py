"""How many tokens a request may use, and how much of a key's credit that can cost.

Admission needs two prompt sizes:

* an **estimate** (about four characters a token), which the token rate limit uses and which
  bills a completion whose upstream reported no usage;
* a **bound** that the real count cannot exceed, which the credit reservation uses, so that a
  prompt the estimate undercounts cannot take a balance below zero. Every tokenizer in use
  (byte-level BPE, SentencePiece with byte fallback) spends at least one UTF-8 byte per token,
  so the bytes of the text, plus a generous allowance per message, per media part and for
  tools, bound the prompt; and no prompt is larger than the model's context.

The answer is bounded by the admitted output limit, which providers send upstream and the
Generation enforces. What is charged never exceeds what was reserved (``CompletionService``):
the bound makes that cap a formality, and a stream whose early prompt count shows the
reservation would not cover its full answer stops at the budget (``completion_budget``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from tokenwire.accounting.pricing import TOKENS_PER_PRICE_UNIT, PromptCounts, prompt_scaled
from tokenwire.config import ModelEntry, Price
from tokenwire.errors import InvalidRequest
from tokenwire.wire import schema
from tokenwire.wire.schema import ChatRequest, content_text

REQUEST_OVERHEAD_TOKENS = 16  # reply priming, BOS and the like
MESSAGE_OVERHEAD_TOKENS = 16  # role markers and separators of one message
TOOLS_OVERHEAD_TOKENS = 1024  # the instructions providers add when tools are offered
MEDIA_TOKENS = 8192  # an image, audio clip or file without a larger byte count


def estimate_prompt_tokens(request: ChatRequest) -> int:
    """A rough prompt size (4 characters a token) for rate limits and unreported usage."""
    return sum(4 + len(content_text(m.content)) // 4 for m in request.messages)


def _utf8(text: str | None) -> int:
    return 0 if not text else len(text.encode("utf-8", "surrogatepass"))


def _content_bound(content: str | list[Any] | None) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return _utf8(content)
    total = 0
    for part in content:
        if isinstance(part, schema.TextPart | schema.TextOnlyPart):
            total += _utf8(part.text)
        elif isinstance(part, schema.RefusalPart):
            total += _utf8(part.refusal)
        elif isinstance(part, schema.ImageUrlPart):
            total += max(MEDIA_TOKENS, _utf8(part.image_url.url))
        elif isinstance(part, schema.InputAudioPart):
            total += max(MEDIA_TOKENS, _utf8(part.input_audio.data))
        elif isinstance(part, schema.FilePart):
            file = part.file
            total += max(MEDIA_TOKENS, _utf8(file.file_data) + _utf8(file.filename))
    return total


def _message_bound(message: schema.Message) -> int:
    total = MESSAGE_OVERHEAD_TOKENS + _content_bound(message.content)
    if isinstance(message, schema.ToolMessage):
        return total + _utf8(message.tool_call_id)
    total += _utf8(message.name)
    if isinstance(message, schema.AssistantMessage):
        total += _utf8(message.refusal)
        for call in message.tool_calls or ():
            total += MESSAGE_OVERHEAD_TOKENS + _utf8(call.id)
            total += _utf8(call.function.name) + _utf8(call.function.arguments)
    return total


def prompt_token_bound(request: ChatRequest, context_tokens: int) -> int:
    """At least as many tokens as any upstream can count for the prompt (see the module)."""
    total = REQUEST_OVERHEAD_TOKENS + sum(_message_bound(m) for m in request.messages)
    if request.tools:
        total += TOOLS_OVERHEAD_TOKENS
        for tool in request.tools:
            total += len(msgspec.json.encode(tool))
    if isinstance(request.response_format, schema.JSONSchemaFormat):
        total += len(msgspec.json.encode(request.response_format))
    return min(total, context_tokens)


def output_limit(request: ChatRequest, entry: ModelEntry, default_max_tokens: int) -> int:
    """The answer's token limit: the request's own (a 400 above the model's), or the default."""
    asked = request.output_limit
    if asked is None:
        return min(default_max_tokens, entry.max_output_tokens)
    if asked > entry.max_output_tokens:
        param = request.output_limit_param
        raise InvalidRequest(
            f"{param} is too large: {asked}. The model {entry.id!r} supports at most "
            f"{entry.max_output_tokens} completion tokens.",
            param=param,
            code="invalid_value",
        )
    return asked


def completion_budget(price: Price, reserved_micro: int, prompt: PromptCounts) -> int:
    """The most completion tokens whose charge at ``price``, with this prompt's (cached parts
    at their own prices), stays within the reservation."""
    if price.output == 0:
        return 1 << 62
    left = reserved_micro * TOKENS_PER_PRICE_UNIT - prompt_scaled(price, prompt)
    return max(0, left // price.output)
