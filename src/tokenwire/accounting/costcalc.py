"""Money arithmetic for operators: exact USD amounts and projected spend, in micro-dollars.

``parse_usd`` turns a USD amount from a request, a webhook or the command line (``"12.50"``,
``12.5``) into integer micro-dollars, exactly, or says why it cannot. ``project`` answers "what
would this workload cost the operator on each model of the catalog, what would a buyer on a
plan pay for it, and what is left?" (``tokenwire cost``): a pure function of the prices and
the workload, computed with exact rationals and rounded half up to a whole micro-dollar once
per figure, never per request or per day.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from tokenwire.config import ModelEntry, Plan, Price

MICRO_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000
# The largest amount accepted anywhere (a top-up, a grant, a payment): far below the 2**63
# micro-dollars a balance column holds, so no sum of a few of them can overflow it.
MAX_USD = 1_000_000_000
_USD = re.compile(r"(\d+)(?:\.\d{1,6})?")


def parse_usd(value: object, *, positive: bool = False, unit: str = "USD") -> int:
    """A USD amount as integer micro-dollars; ``ValueError`` with a reason if it is not one.

    Accepts a string (``"12.50"``, at most 6 decimals, no sign or exponent) or a JSON number
    (``12.5``, read through its shortest decimal form, so ``0.1`` is exactly 100000).
    ``unit`` names another currency in the messages: the amount is then in millionths of it.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f'must be a {unit} amount as a string, like "12.50"')
    text = value.strip() if isinstance(value, str) else repr(value)
    if isinstance(value, float) and "e" in text.lower():
        try:
            text = format(Decimal(text), "f")
        except InvalidOperation:  # pragma: no cover - repr of a float is always decimal
            raise ValueError(f'must be a {unit} amount, like "12.50"') from None
    match = _USD.fullmatch(text)
    if match is None:
        if text.startswith("-"):
            raise ValueError("must not be negative")
        raise ValueError(f'must be a {unit} amount with at most 6 decimals, like "12.50"')
    if len(match.group(1).lstrip("0")) > len(str(MAX_USD)):
        raise ValueError(f"must be at most {MAX_USD} {unit}")
    micro = int(Decimal(text) * MICRO_PER_USD)
    if micro > MAX_USD * MICRO_PER_USD:
        raise ValueError(f"must be at most {MAX_USD} {unit}")
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
    """What a workload costs the operator on one model, what the buyer pays for it on a plan,
    and the difference, in micro-dollars: per day and over ``Workload.days`` days."""

    model: str
    cost: Price  # the model's upstream prices
    price: Price  # the plan's prices for it
    daily_cost_micro: int
    period_cost_micro: int
    daily_price_micro: int
    period_price_micro: int

    @property
    def daily_margin_micro(self) -> int:
        return self.daily_price_micro - self.daily_cost_micro

    @property
    def period_margin_micro(self) -> int:
        return self.period_price_micro - self.period_cost_micro


def daily_amount(price: Price, workload: Workload) -> Fraction:
    """The exact (unrounded) amount of one day of ``workload`` at ``price``, in micro-dollars
    (prompt tokens uncached, at the input price)."""
    scaled = (
        workload.input_tokens_per_day * price.input + workload.output_tokens_per_day * price.output
    )
    return scaled / TOKENS_PER_PRICE_UNIT


def project(models: Iterable[ModelEntry], plan: Plan, workload: Workload) -> list[ModelCost]:
    """The daily and per-period cost and price of ``workload`` on each model, in catalog order.

    Each figure is rounded half up once; a margin is the difference of two rounded figures,
    as the ledger's margin is.
    """
    out = []
    for entry in models:
        cost = daily_amount(entry.cost, workload)
        price = daily_amount(plan.price(entry), workload)
        out.append(
            ModelCost(
                model=entry.id,
                cost=entry.cost,
                price=plan.price(entry),
                daily_cost_micro=round_half_up(cost),
                period_cost_micro=round_half_up(cost * workload.days),
                daily_price_micro=round_half_up(price),
                period_price_micro=round_half_up(price * workload.days),
            )
        )
    return out
