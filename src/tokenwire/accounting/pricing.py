"""Prices and amounts, in integer micro-dollars.

A :class:`~tokenwire.config.Price` is micro-dollars per 1M tokens of each kind (``$2.50`` per
1M is ``2_500_000``): prompt tokens (``input``), the prompt's tokens written to and read from
the provider's prompt cache (``cache_write``, ``cache_read``: parts of the prompt count, as
OpenAI counts it) and completion tokens (``output``). The same function prices a completion
twice: at the model's cost (what the operator pays the upstream) and at the key's plan (what
the key is charged). Each amount is::

    (uncached x input + cache_write x cache_write + cache_read x cache_read
     + completion x output) / 1_000_000

rounded half up to a whole micro-dollar: one rounding per amount and completion, never per
token, so the margin (charge - cost) is an exact integer too.
"""

from __future__ import annotations

from typing import Protocol

from tokenwire.config import Price

MICRO_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


class PromptCounts(Protocol):
    """A prompt's size and its cached parts (``Usage`` and ``PromptUsage`` are both)."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def cache_write_tokens(self) -> int: ...
    @property
    def cache_read_tokens(self) -> int: ...


def prompt_scaled(price: Price, prompt: PromptCounts) -> int:
    """The prompt's price in micro-dollars x 1M tokens (exact, before any rounding).

    The cache counts are parts of the prompt; counts that add up to more than the prompt
    (an upstream's mistake) are cut to it, writes first, so no token is priced twice.
    """
    total = max(0, prompt.prompt_tokens)
    written = min(max(0, prompt.cache_write_tokens), total)
    read = min(max(0, prompt.cache_read_tokens), total - written)
    return (
        (total - written - read) * price.input
        + written * price.cache_write
        + read * price.cache_read
    )


class Counts(PromptCounts, Protocol):
    """A completion's usage (``Usage``)."""

    @property
    def completion_tokens(self) -> int: ...


def amount_micro(price: Price, usage: Counts) -> int:
    """What ``usage`` comes to at ``price``, in micro-dollars, rounded half up once."""
    scaled = prompt_scaled(price, usage) + max(0, usage.completion_tokens) * price.output
    return (scaled + TOKENS_PER_PRICE_UNIT // 2) // TOKENS_PER_PRICE_UNIT


def worst_case_micro(price: Price, prompt_tokens: int, max_completion_tokens: int) -> int:
    """The most a completion can come to: what is reserved at admission (rounded up).

    Every prompt token is priced at the dearest prompt price (a cache write can cost more
    than an uncached token), so no split of the prompt the upstream reports can exceed it.
    """
    dearest = max(price.input, price.cache_write, price.cache_read)
    scaled = prompt_tokens * dearest + max_completion_tokens * price.output
    return -(-scaled // TOKENS_PER_PRICE_UNIT)


def usd(micro: int) -> str:
    """Micro-dollars as a USD string with six decimals (``"0.000032"``), for humans and JSON."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO_PER_USD)
    return f"{sign}{whole}.{fraction:06d}"


def per_mtok_usd(micro_per_mtok: int) -> float:
    """A price per 1M tokens as a JSON number of USD (``2.5``), for ``/v1/models``."""
    return micro_per_mtok / MICRO_PER_USD
