"""Payments in other currencies, credited in micro-dollars exactly.

``[currencies]`` in the configuration maps ISO 4217 codes to the US dollars one unit is
credited as (``CNY = "1.0"`` counts a yuan as a dollar; ``CNY = "0.1404"`` is a market rate),
read as exact decimals. A payment of ``amount`` units is credited::

    round_half_up(amount x rate x 1,000,000) micro-dollars

computed with exact decimals (no binary floats, and a precision wide enough that the product
is never rounded before that one step), so a payment of 70.00 CNY at 0.1404 is 9,828,000
micro-dollars exactly. The credit event keeps what was paid (the currency, the amount in
millionths of its unit) and the rate used, so every credit can be checked later.
"""

from __future__ import annotations

import decimal
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from tokenwire.accounting.costcalc import MAX_USD, MICRO_PER_USD

USD = "USD"
_WIDE = decimal.Context(prec=200, rounding=decimal.ROUND_HALF_UP)  # exact for any accepted pair


class UnknownCurrency(ValueError):
    """A currency that ``[currencies]`` does not configure."""


class AmountTooLarge(ValueError):
    """A payment worth more than the most one credit may be (``costcalc.MAX_USD``)."""


@dataclass(frozen=True, slots=True)
class Credit:
    """Money received: the micro-dollars credited and what was paid to get them."""

    amount_micro: int  # credited, in micro-dollars
    currency: str  # what was paid: an ISO 4217 code
    original_micro: int  # how much, in millionths of one unit of ``currency``
    rate: str  # USD per unit of ``currency``, as configured (an exact decimal)

    def columns(self) -> dict[str, object]:
        """The credit event's columns for where the money came from."""
        return {"currency": self.currency, "original_micro": self.original_micro, "rate": self.rate}


def usd_credit(amount_micro: int) -> dict[str, object]:
    """The columns of a credit made in US dollars (a grant, an admin top-up)."""
    return Credit(amount_micro, USD, amount_micro, "1").columns()


def rate_text(rate: Decimal) -> str:
    """A rate as the plain decimal it was configured as (``"0.1404"``, never ``"1.404E-1"``)."""
    return format(rate, "f")


def rate_for(currency: str, rates: Mapping[str, Decimal]) -> tuple[str, Decimal]:
    """The configured code and rate of ``currency``, written upper or lower case (``"CNY"``,
    ``"cny"``, as Stripe writes it); :class:`UnknownCurrency` for any other."""
    code = currency.upper()
    rate = rates.get(code)
    if rate is None or currency not in (code, code.lower()):
        known = ", ".join(sorted(rates))
        raise UnknownCurrency(f"{currency!r} is not a configured currency (configured: {known})")
    return code, rate


def convert(original_micro: int, code: str, rate: Decimal) -> Credit:
    """``original_micro`` millionths of a unit of ``code`` as a credit in micro-dollars at
    ``rate``, rounded half up once (a payment worth less than half a micro-dollar is credited
    as 0, and recorded all the same); :class:`AmountTooLarge` above the most one credit may be.
    """
    credited = int(_WIDE.multiply(Decimal(original_micro), rate).to_integral_value(_WIDE.rounding))
    if credited > MAX_USD * MICRO_PER_USD:
        raise AmountTooLarge(
            f"comes to more than {MAX_USD} USD at {rate_text(rate)} USD per {code}"
        )
    return Credit(credited, code, original_micro, rate_text(rate))
