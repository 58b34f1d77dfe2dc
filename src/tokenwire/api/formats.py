"""Text formats of the HTTP API as regexes: the validators and ``/openapi.json`` share them.

A pattern here is put on a msgspec type (``Meta(pattern=...)``), so the same regex both refuses
a request and appears in the OpenAPI document: a value the document calls valid is never
refused for its spelling. The patterns use only what Python, ECMA-262 and Hypothesis agree on
(anchors, classes, counted repeats, alternation).
"""

from __future__ import annotations

import re

from tokenwire.accounting.costcalc import parse_usd
from tokenwire.errors import InvalidRequest

# -- USD amounts ("12.50"): at most 6 decimals, at most 1e9 USD (costcalc.MAX_USD) -------

_FRACTION = r"(?:\.[0-9]{1,6})?"
_NONZERO_FRACTION = (
    r"\.(?:[1-9][0-9]{0,5}|0[1-9][0-9]{0,4}|00[1-9][0-9]{0,3}|000[1-9][0-9]{0,2}"
    r"|0000[1-9][0-9]?|00000[1-9])"
)
_MAX = r"0*1000000000(?:\.0{1,6})?"
USD_PATTERN = rf"^(?:0*[0-9]{{1,9}}{_FRACTION}|{_MAX})$"
"""A USD amount from 0 to 1,000,000,000 with at most 6 decimals, like ``"12.50"``."""
POSITIVE_USD_PATTERN = rf"^(?:0*[1-9][0-9]{{0,8}}{_FRACTION}|0+{_NONZERO_FRACTION}|{_MAX})$"
"""As :data:`USD_PATTERN`, but greater than zero."""

# -- instants: Unix seconds or an ISO 8601 date / date-time, years 1970-9999 ---------------

MAX_UNIX_S = 253_402_300_799  # 9999-12-31T23:59:59Z
_UNIX = r"[0-9]{1,11}(?:\.[0-9]{1,6})?"
_YEAR = r"(?:19[7-9][0-9]|[2-9][0-9]{3})"
_LEAP_YEAR = (
    r"(?:19(?:7[26]|8[048]|9[26])|[2-9][0-9](?:0[48]|[2468][048]|[13579][26])"
    r"|(?:[2468][048]|[3579][26])00)"
)
_DATE = (
    rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    r"|02-(?:0[1-9]|1[0-9]|2[0-8]))"
    rf"|{_LEAP_YEAR}-02-29)"
)
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\.[0-9]{1,6})?)?"
_OFFSET = r"(?:Z|[+-](?:[01][0-9]|2[0-3]):?[0-5][0-9])"
INSTANT_PATTERN = rf"^(?:{_UNIX}|{_DATE}(?:T{_TIME}{_OFFSET}?)?)$"
"""Unix seconds (``1735689600``, up to 11 digits and 6 decimals) or an ISO 8601 date or
date-time (``2025-01-01``, ``2025-01-01T12:00:00Z``, ``2025-01-01T12:00+02:00``; no zone: UTC),
with a real calendar date in the years 1970-9999."""

INSTANT = re.compile(INSTANT_PATTERN)


def read_usd(value: object, param: str, *, positive: bool, unit: str = "USD") -> int:
    """A USD amount as micro-dollars (``parse_usd``), or a 400 naming ``param``; with
    ``unit``, an amount of that currency in millionths of its unit.

    A JSON number with more than 6 decimals (``0.1234567``, ``5e-324``) gets the code
    ``amount_too_precise``: the one refusal of a number the schema's range allows, since
    JSON Schema cannot say "at most 6 decimals" of a binary float (``multipleOf`` is inexact).
    """
    try:
        return parse_usd(value, positive=positive, unit=unit)
    except ValueError as exc:
        too_precise = isinstance(value, float) and "decimals" in str(exc)
        raise InvalidRequest(
            f"Invalid {param!r}: {exc}.",
            param=param,
            code="amount_too_precise" if too_precise else None,
        ) from None
