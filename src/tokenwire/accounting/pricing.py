"""Prices and costs, in integer micro-dollars.

Catalog prices are micro-dollars per 1M tokens (``$2.50`` per 1M is ``2_500_000``), so the cost
of a completion is ``(prompt * input + completion * output) / 1_000_000`` micro-dollars, rounded
half up to a whole micro-dollar: one rounding per completion, never per token.
"""

from __future__ import annotations

from tokenwire.config import ModelEntry

MICRO_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


def cost_micro(entry: ModelEntry, prompt_tokens: int, completion_tokens: int) -> int:
    """What a completion costs, in micro-dollars."""
    scaled = (
        prompt_tokens * entry.input_micro_per_mtok + completion_tokens * entry.output_micro_per_mtok
    )
    return (scaled + TOKENS_PER_PRICE_UNIT // 2) // TOKENS_PER_PRICE_UNIT


def worst_case_micro(entry: ModelEntry, prompt_tokens: int, max_completion_tokens: int) -> int:
    """The most a completion can cost: the amount reserved at admission (rounded up)."""
    scaled = (
        prompt_tokens * entry.input_micro_per_mtok
        + max_completion_tokens * entry.output_micro_per_mtok
    )
    return -(-scaled // TOKENS_PER_PRICE_UNIT)


def is_free(entry: ModelEntry) -> bool:
    """A model that costs nothing needs no reservation."""
    return entry.input_micro_per_mtok == 0 and entry.output_micro_per_mtok == 0


def usd(micro: int) -> str:
    """Micro-dollars as a USD string with six decimals (``"0.000032"``), for humans and JSON."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO_PER_USD)
    return f"{sign}{whole}.{fraction:06d}"
