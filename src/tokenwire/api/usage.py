"""``GET /v1/usage``: the calling key's own ledger rows, their totals and its balance.

Any active key may read its own usage (and only its own). Query parameters:

``start``, ``end``  a time range (``start`` inclusive, ``end`` exclusive), each as Unix seconds
                    (``1735689600``) or ISO 8601 (``2025-01-01``, ``2025-01-01T12:00:00Z``;
                    without a zone, UTC)
``model``           only this model
``limit``           at most this many rows, newest first (1-1000, default 100); the totals
                    cover the whole range whatever the limit
``group_by``        ``model``, ``day`` or ``model,day``: the answer also holds ``groups``, the
                    totals per model and/or UTC day over the range (what the usage page charts)

Unknown parameters are refused (400), so a misspelt filter never silently reads everything.
A key sees what it was charged (``charge_*``, repeated as ``cost_*``: to the key, what its
usage cost is what it paid), never what its usage cost the operator; the operator's figures
(:func:`report_object`) are the admin report's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import asdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tokenwire.accounting.ledger import GROUPS as LEDGER_GROUPS
from tokenwire.accounting.ledger import LedgerRow
from tokenwire.accounting.pricing import usd
from tokenwire.api.auth import authenticate
from tokenwire.api.errors import json_response
from tokenwire.errors import InvalidRequest
from tokenwire.state import get_state
from tokenwire.wire.untrusted import parse_count

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_UNIX = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,6})?")
_LATEST_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z
# "…T12:00:00 02:00": a "+02:00" offset whose "+" an unencoded query string turned into a space
_LOST_PLUS = re.compile(r"(.+[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}:?\d{2})")


def parse_instant_ms(value: str) -> int:
    """Unix seconds or an ISO 8601 date/time (UTC unless it says otherwise) → Unix ms.

    Raises ``ValueError`` saying what was expected.
    """
    text = value.strip()
    if _UNIX.fullmatch(text):
        ms = int(Decimal(text) * 1000)
    else:
        lost_plus = _LOST_PLUS.fullmatch(text)
        if lost_plus is not None:
            text = f"{lost_plus.group(1)}+{lost_plus.group(2)}"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"{value!r} is neither Unix seconds nor an ISO 8601 time "
                "(e.g. 1735689600 or 2025-01-01T00:00:00Z)"
            ) from None
        if moment.year < 1970:
            raise ValueError(f"{value!r} is outside the years 1970-9999")
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        # The written date is in 1970-9999; its zone may move the instant a few hours past
        # either end (1970-01-01T00:00+01:00), which is still a fine bound for a query.
        return int(moment.timestamp() * 1000)
    if not 0 <= ms < _LATEST_MS:
        raise ValueError(f"{value!r} is outside the years 1970-9999")
    return ms


def query_params(request: Request, allowed: Collection[str]) -> dict[str, str]:
    """The query parameters (last value of each), or 400 naming the first unknown one."""
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise InvalidRequest(
                f"Unknown query parameter {name!r}; expected one of {', '.join(allowed)}.",
                param=name,
                code="unknown_parameter",
            )
        params[name] = value
    return params


def time_range(params: dict[str, str]) -> tuple[int | None, int | None]:
    """``start`` and ``end`` from the query as Unix ms, or 400 naming the bad one."""
    bounds: list[int | None] = []
    for name in ("start", "end"):
        raw = params.get(name)
        if raw is None or raw == "":
            bounds.append(None)
            continue
        try:
            bounds.append(parse_instant_ms(raw))
        except ValueError as exc:
            raise InvalidRequest(f"Invalid {name!r}: {exc}.", param=name) from None
    start, end = bounds
    if start is not None and end is not None and end <= start:
        raise InvalidRequest(
            "'end' must be later than 'start'.", param="end", code="empty_time_range"
        )
    return start, end


GROUPS = {"key": "key_id", **{name: name for name in LEDGER_GROUPS}}
"""What the admin report may group by (``key`` is ``key_id``)."""
DEFAULT_GROUPS = ("key_id", "model", "day")
OWN_GROUPS = ("model", "day")
"""What ``GET /v1/usage`` may group by: one key's own rows have no key to group by."""


def parse_group_by(value: str | None, allowed: Collection[str] = tuple(GROUPS)) -> tuple[str, ...]:
    """``key,model,day`` (any subset of ``allowed``, any order) → the ledger's column names;
    None → those of key, model and day that are allowed; 400 naming ``group_by`` for
    anything else."""
    if value is None:
        allowed_columns = {GROUPS[n] for n in allowed}
        return tuple(g for g in DEFAULT_GROUPS if g in allowed_columns)
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        choices = ", ".join(dict.fromkeys(n.removesuffix("_id") for n in allowed))
        raise InvalidRequest(
            f"Invalid 'group_by': {', '.join(map(repr, unknown))}; use any of {choices}.",
            param="group_by",
        )
    return tuple(dict.fromkeys(GROUPS[n] for n in names))


def _money(name: str, micro: int) -> dict[str, Any]:
    return {f"{name}_micro": micro, f"{name}_usd": usd(micro)}


TOKEN_SUMS = ("prompt_tokens", "completion_tokens", "cache_write_tokens", "cache_read_tokens")


def _tokens(totals: dict[str, Any]) -> dict[str, int]:
    return {
        "requests": int(totals.get("requests") or 0),
        **{name: int(totals.get(name) or 0) for name in TOKEN_SUMS},
    }


def total_object(totals: dict[str, Any]) -> dict[str, Any]:
    """A key's own totals (``/v1/usage``): requests, tokens and what it was charged.

    ``cost_*`` repeats ``charge_*``: to the key, what its usage cost is what it paid (the
    field of clients written before plans). The operator's cost is never shown here.
    """
    charge = int(totals.get("charge_micro") or 0)
    return {**_tokens(totals), **_money("charge", charge), **_money("cost", charge)}


def report_object(totals: dict[str, Any]) -> dict[str, Any]:
    """An operator's totals (the admin report, ``tokenwire usage``): requests, tokens, what
    they cost upstream, what keys were charged, and the margin (charge - cost)."""
    cost = int(totals.get("cost_micro") or 0)
    charge = int(totals.get("charge_micro") or 0)
    return {
        **_tokens(totals),
        **_money("cost", cost),
        **_money("charge", charge),
        **_money("margin", charge - cost),
    }


def group_objects(
    rows: list[dict[str, Any]],
    group_by: tuple[str, ...],
    figures: Callable[[dict[str, Any]], dict[str, Any]] = total_object,
) -> list[dict[str, Any]]:
    """``Ledger.totals`` rows as JSON: their group columns, then their ``figures``
    (:func:`total_object` for a key, :func:`report_object` for the operator)."""
    return [{**{g: row[g] for g in group_by}, **figures(row)} for row in rows]


def row_object(row: LedgerRow) -> dict[str, Any]:
    """One ledger row as a key sees it (``created_at`` in Unix ms): its charge, not the
    operator's cost (``cost_*`` repeats the charge, as in :func:`total_object`)."""
    fields = asdict(row)
    del fields["cost_micro"]
    return {
        "object": "usage.record",
        **fields,
        **_money("charge", row.charge_micro),
        **_money("cost", row.charge_micro),
    }


async def get_usage(request: Request) -> Response:
    """The caller's ledger rows (newest first), totals over the range, and balance; with
    ``group_by``, the totals per model and/or day too."""
    key = await authenticate(request)
    params = query_params(request, ("start", "end", "model", "limit", "group_by"))
    start, end = time_range(params)
    model = params.get("model") or None
    limit = DEFAULT_LIMIT
    if params.get("limit"):
        raw = params["limit"]
        parsed = parse_count(raw, max_digits=len(str(MAX_LIMIT)))
        if parsed is None or not 1 <= parsed <= MAX_LIMIT:
            raise InvalidRequest(
                f"'limit' must be an integer from 1 to {MAX_LIMIT}; got {raw!r}.", param="limit"
            )
        limit = parsed
    ledger = get_state(request).ledger
    rows = await ledger.rows(key_id=key.id, since_ms=start, until_ms=end, model=model, limit=limit)
    (totals,) = await ledger.totals(
        key_id=key.id, since_ms=start, until_ms=end, model=model, group_by=()
    )
    balance = await ledger.balance(key.id)
    answer: dict[str, Any] = {
        "object": "list",
        "data": [row_object(r) for r in rows],
        "total": total_object(totals),
        "balance_micro": balance,
        "balance_usd": usd(balance),
    }
    if params.get("group_by"):
        group_by = parse_group_by(params["group_by"], OWN_GROUPS)
        groups = await ledger.totals(
            key_id=key.id, since_ms=start, until_ms=end, model=model, group_by=group_by
        )
        answer["group_by"] = list(group_by)
        answer["groups"] = group_objects(groups, group_by)
    return json_response(answer)
