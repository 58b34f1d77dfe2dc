"""Money arithmetic for operators: exact USD amounts and projected spend, in micro-dollars.

``parse_usd`` turns a USD amount from a request, a webhook or the command line (``"12.50"``,
``12.5``) into integer micro-dollars, exactly, or says why it cannot. ``project`` answers "what
would this workload cost on each model of the catalog?" (``tokenwire cost``): it is a pure
function of the catalog prices and the workload, computed with exact rationals and rounded
half up to a whole micro-dollar once per figure, never per request or per day.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from tokenwire.config import ModelEntry

MICRO_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000
# The largest amount accepted anywhere (a top-up, a grant, a payment): far below the 2**63
# micro-dollars a balance column holds, so no sum of a few of them can overflow it.
MAX_USD = 1_000_000_000
_USD = re.compile(r"(\d+)(?:\.\d{1,6})?")


def parse_usd(value: object, *, positive: bool = False) -> int:
    """A USD amount as integer micro-dollars; ``ValueError`` with a reason if it is not one.

    Accepts a string (``"12.50"``, at most 6 decimals, no sign or exponent) or a JSON number
    (``12.5``, read through its shortest decimal form, so ``0.1`` is exactly 100000).
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError('must be a USD amount as a string, like "12.50"')
    text = value.strip() if isinstance(value, str) else repr(value)
    if isinstance(value, float) and "e" in text.lower():
        try:
            text = format(Decimal(text), "f")
        except InvalidOperation:  # pragma: no cover - repr of a float is always decimal
            raise ValueError('must be a USD amount, like "12.50"') from None
    match = _USD.fullmatch(text)
    if match is None:
        if text.startswith("-"):
            raise ValueError("must not be negative")
        raise ValueError('must be a USD amount with at most 6 decimals, like "12.50"')
    if len(match.group(1).lstrip("0")) > len(str(MAX_USD)):
        raise ValueError(f"must be at most {MAX_USD} USD")
    micro = int(Decimal(text) * MICRO_PER_USD)
    if micro > MAX_USD * MICRO_PER_USD:
        raise ValueError(f"must be at most {MAX_USD} USD")
    if positive and micro == 0:
        raise ValueError("must be greater than 0")
    return micro


def parse_share(value: str | float) -> Fraction:
    """A share between 0 and 1 (``"0.5"``, ``"1/3"``) as an exact fraction, or ``ValueError``."""
    try:
        share = Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{value!r} is not a number between 0 and 1") from None
    if not 0 <= share <= 1:
        raise ValueError(f"{value!r} is not between 0 and 1")
    return share


def round_half_up(value: Fraction) -> int:
    """The nearest integer to a non-negative rational, halves rounded up."""
    return (2 * value.numerator + value.denominator) // (2 * value.denominator)


@dataclass(frozen=True, slots=True)
class Workload:
    """A steady daily load: every user sends the same requests every day."""

    users: int
    requests_per_user: int  # per day
    tokens_per_request: int  # prompt + completion
    output_share: Fraction = Fraction(1, 2)  # completion tokens / tokens_per_request
    days: int = 30

    def __post_init__(self) -> None:
        for name in ("users", "requests_per_user", "tokens_per_request", "days"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0 <= self.output_share <= 1:
            raise ValueError("output_share must be between 0 and 1")

    @property
    def requests_per_day(self) -> int:
        return self.users * self.requests_per_user

    @property
    def input_tokens_per_day(self) -> Fraction:
        return self.requests_per_day * self.tokens_per_request * (1 - self.output_share)

    @property
    def output_tokens_per_day(self) -> Fraction:
        return self.requests_per_day * self.tokens_per_request * self.output_share


@dataclass(frozen=True, slots=True)
class ModelCost:
    """What a workload costs on one model, in micro-dollars."""

    model: str
    input_micro_per_mtok: int
    output_micro_per_mtok: int
    daily_micro: int
    period_micro: int  # over ``Workload.days`` days


def daily_cost(entry: ModelEntry, workload: Workload) -> Fraction:
    """The exact (unrounded) cost of one day of ``workload`` on ``entry``, in micro-dollars."""
    scaled = (
        workload.input_tokens_per_day * entry.input_micro_per_mtok
        + workload.output_tokens_per_day * entry.output_micro_per_mtok
    )
    return scaled / TOKENS_PER_PRICE_UNIT


def project(models: Iterable[ModelEntry], workload: Workload) -> list[ModelCost]:
    """The daily and per-period cost of ``workload`` on each model, in catalog order."""
    out = []
    for entry in models:
        exact = daily_cost(entry, workload)
        out.append(
            ModelCost(
                model=entry.id,
                input_micro_per_mtok=entry.input_micro_per_mtok,
                output_micro_per_mtok=entry.output_micro_per_mtok,
                daily_micro=round_half_up(exact),
                period_micro=round_half_up(exact * workload.days),
            )
        )
    return out
