"""The admin API: keys, their limits and credits, and usage across keys. Admin keys only.

::

    POST  /v1/admin/keys                 create a key (201; the plaintext ``key`` is shown once)
    GET   /v1/admin/keys                 list keys
    GET   /v1/admin/keys/{id}            one key
    PATCH /v1/admin/keys/{id}            change name, limits, models, expiry or plan (null clears)
    POST  /v1/admin/keys/{id}/revoke     revoke (requests with it get 401 at once; not the
                                         caller's own key: 409)
    POST  /v1/admin/keys/{id}/rotate     a new secret for the same key (the old one stops)
    POST  /v1/admin/keys/{id}/topup      add credit
    GET   /v1/admin/usage                cost, charge and margin by key, model, provider,
                                         plan and day
    GET   /v1/admin/runtime              what this process holds now (tasks, files, database
                                         connections, stream slots, unwritten ledger rows)

A key without admin rights gets 403 ``permission_error``; no key or a bad one, 401. Bodies are
validated in full (types, ranges, unknown fields) before anything is written, so a request
answered with 400 changed nothing; ``param`` names the offending field. Money is integer
micro-dollars inside and in ``*_micro`` fields, and USD strings (``"12.500000"``) beside them;
amounts sent in are USD strings such as ``"12.50"``, parsed exactly. Secret digests are never
returned.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from tokenwire.accounting.costcalc import MAX_USD
from tokenwire.accounting.keys import KeyLimits, KeyRecord
from tokenwire.accounting.ledger import Ledger
from tokenwire.accounting.pricing import usd
from tokenwire.api.auth import authenticate
from tokenwire.api.chat import read_body
from tokenwire.api.errors import json_response
from tokenwire.api.formats import (
    INSTANT_PATTERN,
    MAX_UNIX_S,
    POSITIVE_USD_PATTERN,
    USD_PATTERN,
    read_usd,
)
from tokenwire.api.usage import (
    group_objects,
    parse_group_by,
    parse_instant_ms,
    query_params,
    report_object,
    time_range,
)
from tokenwire.config import usd_to_micro
from tokenwire.errors import InvalidRequest, NotFound, PermissionDenied
from tokenwire.runtime import snapshot
from tokenwire.state import AppState, get_state
from tokenwire.wire.untrusted import decode_json

S = TypeVar("S")

MAX_LIMIT_VALUE = 2_147_483_647  # the columns are 32-bit integers
Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT_VALUE)]
# The constraints below are the whole syntax of each field: /openapi.json is generated from
# them, so a body the document calls valid is refused only for the reasons it states
# (an unknown model id, an expiry in the past).
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"\S")]  # not blank
ModelId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Models = Annotated[list[ModelId], msgspec.Meta(min_length=1)]  # null, not [], allows every model
Note = Annotated[str, msgspec.Meta(max_length=500)]
PlanName = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=64,
        description="A configured plan (price list); null: the gateway's default plan.",
    ),
]
# USD, read exactly by parse_usd; a JSON number with a fraction is read through its shortest
# decimal form and must have at most 6 decimals too.
Amount = Annotated[
    Annotated[str, msgspec.Meta(pattern=USD_PATTERN)]
    | Annotated[int, msgspec.Meta(ge=0, le=MAX_USD)]
    | Annotated[float, msgspec.Meta(ge=0, le=MAX_USD)],
    msgspec.Meta(description='USD: a string such as "12.50" (at most 6 decimals) or a number.'),
]
PositiveAmount = Annotated[
    Annotated[str, msgspec.Meta(pattern=POSITIVE_USD_PATTERN)]
    | Annotated[int, msgspec.Meta(ge=1, le=MAX_USD)]
    | Annotated[float, msgspec.Meta(gt=0, le=MAX_USD)],
    msgspec.Meta(description='USD above 0: a string such as "10.00" or a number.'),
]
Instant = Annotated[
    Annotated[int, msgspec.Meta(ge=0, le=MAX_UNIX_S)]
    | Annotated[str, msgspec.Meta(pattern=INSTANT_PATTERN)],
    msgspec.Meta(
        description="Unix seconds or ISO 8601 (UTC unless a zone is given); it must be in "
        "the future (400 expiry_not_in_future otherwise): revoke a key to stop it now."
    ),
]
UNSET = msgspec.UNSET
UnsetType = msgspec.UnsetType


class CreateKeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/admin/keys``. Limits left out or null are unlimited; ``models`` null: all."""

    name: Name
    rpm: Limit | None = None
    tpm: Limit | None = None
    max_concurrent_streams: Limit | None = None
    credits_usd: Amount | None = None
    models: Models | None = None
    expires_at: Instant | None = None
    admin: bool = False
    plan: PlanName | None = None


class UpdateKeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``PATCH /v1/admin/keys/{id}``: only the fields present change; null clears a limit."""

    name: Name | UnsetType = UNSET
    rpm: Limit | UnsetType | None = UNSET
    tpm: Limit | UnsetType | None = UNSET
    max_concurrent_streams: Limit | UnsetType | None = UNSET
    models: Models | UnsetType | None = UNSET
    expires_at: Instant | UnsetType | None = UNSET
    plan: PlanName | UnsetType | None = UNSET


class TopupRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/admin/keys/{id}/topup``: a positive USD amount, such as ``"10.00"``."""

    amount_usd: PositiveAmount
    note: Note | None = None


def key_status(record: KeyRecord, now: float | None = None) -> str:
    """``active``, ``revoked`` or ``expired``."""
    if record.revoked_at is not None:
        return "revoked"
    if not record.is_active(time.time() if now is None else now):
        return "expired"
    return "active"


def key_object(record: KeyRecord) -> dict[str, Any]:
    """A key as JSON: everything but its secret (which is not stored) and its digest."""
    return {
        "object": "api_key",
        "id": record.id,
        "name": record.name,
        "prefix": record.prefix,
        "admin": record.is_admin,
        "status": key_status(record),
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "revoked_at": record.revoked_at,
        "models": None if record.allowed_models is None else list(record.allowed_models),
        "rpm": record.rpm,
        "tpm": record.tpm,
        "max_concurrent_streams": record.max_concurrent_streams,
        "balance_micro": record.balance_micro,
        "balance_usd": usd(record.balance_micro),
        "plan": record.plan,
    }


async def admin_caller(request: Request) -> KeyRecord:
    """The caller's key, if it is an active admin key (else 401 / 403)."""
    key = await authenticate(request)
    if not key.is_admin:
        raise PermissionDenied("This endpoint needs an admin key.", code="admin_key_required")
    return key


async def require_admin(request: Request) -> AppState:
    """The app state, if the caller holds an active admin key (else 401 / 403)."""
    await admin_caller(request)
    return get_state(request)


async def _body(request: Request, state: AppState, kind: type[S]) -> S:
    return decode_json(await read_body(request, state.settings.server.max_body_bytes), kind)


def _amount(value: object, param: str, *, positive: bool) -> int:
    return read_usd(value, param, positive=positive)


def _expiry(value: int | str, param: str = "expires_at") -> int:
    """An expiry (Unix seconds or ISO 8601) as Unix seconds; it must be in the future."""
    if isinstance(value, int):
        if value < 0:
            raise InvalidRequest(f"Invalid {param!r}: must not be negative.", param=param)
        value = str(value)
    try:
        seconds = parse_instant_ms(value) // 1000
    except ValueError as exc:
        raise InvalidRequest(f"Invalid {param!r}: {exc}.", param=param) from None
    if seconds <= time.time():
        raise InvalidRequest(
            f"Invalid {param!r}: {value!r} is not in the future; revoke a key to stop it now.",
            param=param,
            code="expiry_not_in_future",
        )
    return seconds


def _models(state: AppState, models: list[str]) -> tuple[str, ...]:
    """A key's model allow-list: catalog ids only, at least one, duplicates dropped."""
    if not models:
        raise InvalidRequest(
            "'models' must name at least one model; null allows every model.", param="models"
        )
    unknown = [m for m in models if m not in state.registry.models]
    if unknown:
        raise InvalidRequest(
            f"Unknown model(s) in 'models': {', '.join(map(repr, unknown))}; "
            "see GET /v1/models for the catalog.",
            param="models",
        )
    return tuple(dict.fromkeys(models))


def _plan(state: AppState, name: str | None) -> str | None:
    """A key's plan: a configured one, or None for the default plan."""
    if name is not None and name not in state.completions.plans:
        raise InvalidRequest(
            f"Unknown plan {name!r}; the plans are: {', '.join(state.completions.plans.names)}.",
            param="plan",
        )
    return name


async def _record(state: AppState, key_id: str) -> KeyRecord:
    record = await state.keys.get(key_id)
    if record is None:
        raise NotFound(f"No API key with id {key_id!r}.", param="id")
    return record


async def create_key(request: Request) -> Response:
    """Create a key with the free grant plus ``credits_usd``; 201 with the plaintext once."""
    state = await require_admin(request)
    body = await _body(request, state, CreateKeyRequest)
    name = body.name.strip()
    if not name:
        raise InvalidRequest("'name' must not be blank.", param="name")
    credits = (
        0 if body.credits_usd is None else _amount(body.credits_usd, "credits_usd", positive=False)
    )
    models = None if body.models is None else _models(state, body.models)
    expires_at = None if body.expires_at is None else _expiry(body.expires_at)
    plan = _plan(state, body.plan)
    grant = usd_to_micro(state.settings.accounting.free_grant_usd, what="free_grant_usd")
    record, plaintext = await state.keys.create(
        name,
        is_admin=body.admin,
        expires_at=expires_at,
        limits=KeyLimits(
            allowed_models=models,
            rpm=body.rpm,
            tpm=body.tpm,
            max_concurrent_streams=body.max_concurrent_streams,
        ),
        grant_micro=grant,
        plan=plan,
    )
    if credits:
        await state.ledger.credit(record.id, credits, kind="topup", note="credits at creation")
        record = await _record(state, record.id)
    return json_response({**key_object(record), "key": plaintext}, 201)


async def list_keys(request: Request) -> Response:
    """Every key, oldest first."""
    state = await require_admin(request)
    records = await state.keys.list()
    return json_response({"object": "list", "data": [key_object(r) for r in records]})


async def get_key(request: Request) -> Response:
    """One key by id (404 if unknown)."""
    state = await require_admin(request)
    return json_response(key_object(await _record(state, request.path_params["key_id"])))


async def update_key(request: Request) -> Response:
    """Change the fields present in the body; ``null`` clears a limit, models or expiry."""
    state = await require_admin(request)
    key_id = request.path_params["key_id"]
    body = await _body(request, state, UpdateKeyRequest)
    changes: dict[str, object] = {}
    if body.name is not UNSET:
        if not body.name.strip():
            raise InvalidRequest("'name' must not be blank.", param="name")
        changes["name"] = body.name.strip()
    for field in ("rpm", "tpm", "max_concurrent_streams"):
        value = getattr(body, field)
        if value is not UNSET:
            changes[field] = value
    if body.models is not UNSET:
        changes["allowed_models"] = None if body.models is None else _models(state, body.models)
    if body.expires_at is not UNSET:
        changes["expires_at"] = None if body.expires_at is None else _expiry(body.expires_at)
    if body.plan is not UNSET:
        changes["plan"] = _plan(state, body.plan)
    if not changes:
        return json_response(key_object(await _record(state, key_id)))
    return json_response(key_object(await state.keys.update(key_id, **changes)))


async def revoke_key(request: Request) -> Response:
    """Revoke a key (idempotent: revoking a revoked key keeps its first revocation time).

    An admin key may not revoke itself (409 ``cannot_revoke_own_key``): that would lock the
    operator out of the admin API. Another admin key, or ``tokenwire keys revoke``, can.
    """
    caller = await admin_caller(request)
    key_id = request.path_params["key_id"]
    if key_id == caller.id:
        raise InvalidRequest(
            "An admin key cannot revoke itself; use another admin key or 'tokenwire keys revoke'.",
            param="id",
            code="cannot_revoke_own_key",
            status=409,
        )
    state = get_state(request)
    return json_response(key_object(await state.keys.revoke(key_id)))


async def rotate_key(request: Request) -> Response:
    """A new secret for the key; the old one gets 401 from now on. Same id, limits, balance."""
    state = await require_admin(request)
    record = await _record(state, request.path_params["key_id"])
    if record.revoked_at is not None:
        raise InvalidRequest(
            f"The API key {record.id!r} is revoked; create a new key instead.",
            param="id",
            code="key_revoked",
            status=409,
        )
    record, plaintext = await state.keys.rotate(record.id)
    return json_response({**key_object(record), "key": plaintext})


async def topup_key(request: Request) -> Response:
    """Add ``amount_usd`` of credit to a key; answers the new balance."""
    state = await require_admin(request)
    key_id = request.path_params["key_id"]
    body = await _body(request, state, TopupRequest)
    amount = _amount(body.amount_usd, "amount_usd", positive=True)
    await _record(state, key_id)  # 404 before anything is written
    balance, _ = await state.ledger.credit(key_id, amount, kind="topup", note=body.note)
    return json_response(
        {
            "object": "credit",
            "key_id": key_id,
            "amount_micro": amount,
            "amount_usd": usd(amount),
            "balance_micro": balance,
            "balance_usd": usd(balance),
        }
    )


async def usage_report_data(
    ledger: Ledger, group_by: tuple[str, ...], **filters: Any
) -> dict[str, Any]:
    """Cost, charge and margin per group and in total (``filters``: ``Ledger.totals``'s)."""
    groups = await ledger.totals(**filters, group_by=group_by)
    (overall,) = await ledger.totals(**filters, group_by=())
    return {
        "group_by": list(group_by),
        "data": group_objects(groups, group_by, report_object),
        "total": report_object(overall),
    }


async def runtime(request: Request) -> Response:
    """This process's counts of what it holds (``tokenwire.runtime``): leaks show here."""
    state = await require_admin(request)
    return json_response(snapshot(state))


async def usage_report(request: Request) -> Response:
    """Requests, tokens, cost, charge and margin grouped by key, model, provider, plan and/or
    day, plus the overall total."""
    state = await require_admin(request)
    params = query_params(request, ("start", "end", "group_by", "key_id", "model"))
    start, end = time_range(params)
    report = await usage_report_data(
        state.ledger,
        parse_group_by(params.get("group_by")),
        key_id=params.get("key_id") or None,
        since_ms=start,
        until_ms=end,
        model=params.get("model") or None,
    )
    return json_response({"object": "list", "start_ms": start, "end_ms": end, **report})
