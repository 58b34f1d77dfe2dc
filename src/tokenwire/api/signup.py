"""``POST /v1/signup``: self-service keys, off unless ``[signup] enabled = true``.

No key is needed. The body is ``{"email": "…", "invite_code": "…"}`` (the code only when
``signup.invite_codes`` lists some; it must be one of them). The answer, 201, is the new key
as the admin API shows it, with its plaintext ``key`` (shown this once) and the grant it
received: ``signup.grant_usd`` for an address whose mailbox never had one, else 0.

Refusals: 400 for a body that is not a valid sign-up (``param`` names the field); 403
``signup_disabled`` while sign-up is off; 403 ``invalid_invite_code`` for a missing or wrong
code (counted like a failed authentication: an address with too many gets 429
``too_many_failed_authentications``); 429 ``signup_email_limit``, ``signup_ip_limit`` or
``signup_day_limit`` when a daily cap is reached (``Retry-After``: the next UTC midnight).
The caps and the grant's once-per-mailbox rule are in :mod:`tokenwire.accounting.signups`.
"""

from __future__ import annotations

import hmac
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from tokenwire.accounting.keys import KeyLimits
from tokenwire.accounting.pricing import usd
from tokenwire.accounting.signups import EMAIL_PATTERN, MAX_EMAIL_LENGTH, SignupPolicy, SignupStore
from tokenwire.api.admin import key_object
from tokenwire.api.auth import client_address, refuse_failed_attempt
from tokenwire.api.chat import read_body
from tokenwire.api.errors import json_response
from tokenwire.config import Settings, usd_to_micro
from tokenwire.errors import NotFound, PermissionDenied
from tokenwire.state import get_state
from tokenwire.wire.untrusted import decode_json


class SignupRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/signup``."""

    email: Annotated[
        str,
        msgspec.Meta(
            max_length=MAX_EMAIL_LENGTH,
            pattern=EMAIL_PATTERN,
            description="The address the key is for; one free grant per mailbox.",
        ),
    ]
    invite_code: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=200,
                description="One of the gateway's invite codes, when it asks for one.",
            ),
        ]
        | None
    ) = None


def signup_policy(settings: Settings) -> SignupPolicy:
    """What a sign-up gives and how many there may be, from ``[signup]``."""
    config = settings.signup
    return SignupPolicy(
        grant_micro=usd_to_micro(config.grant_usd, what="signup.grant_usd"),
        max_per_day=config.max_per_day,
        max_per_ip_per_day=config.max_per_ip_per_day,
        max_per_email_per_day=config.max_per_email_per_day,
        plan=config.plan or None,
        limits=KeyLimits(
            allowed_models=None if config.models is None else tuple(config.models),
            rpm=config.rpm,
            tpm=config.tpm,
            max_concurrent_streams=config.max_concurrent_streams,
        ),
    )


def _invited(code: str | None, codes: list[str]) -> bool:
    """Whether ``code`` is one of ``codes``, compared in constant time (every one is tried)."""
    given = (code or "").encode()
    matched = False
    for candidate in codes:
        matched |= hmac.compare_digest(given, candidate.encode())
    return matched and code is not None


async def signup(request: Request) -> Response:
    """Create a key for an email address (see the module docstring)."""
    state = get_state(request)
    body = decode_json(
        await read_body(request, state.settings.server.max_body_bytes), SignupRequest
    )
    config = state.settings.signup
    if not config.enabled:
        raise PermissionDenied(
            "Self-service sign-up is turned off on this gateway; ask its operator for a key.",
            code="signup_disabled",
        )
    client = client_address(request)
    if config.invite_codes and not _invited(body.invite_code, config.invite_codes):
        await refuse_failed_attempt(
            state,
            client,
            PermissionDenied(
                "Sign-up on this gateway needs a valid invite code.",
                param="invite_code",
                code="invalid_invite_code",
            ),
        )
    made = await SignupStore(state.engine, state.keys).sign_up(
        body.email,
        client,
        signup_policy(state.settings),
        invite_code=body.invite_code if config.invite_codes else None,
    )
    record = await state.keys.get(made.key_id)
    if record is None:  # pragma: no cover - committed just now
        raise NotFound(f"No API key with id {made.key_id!r}.", param="id")
    return json_response(
        {
            **key_object(record),
            "key": made.plaintext,
            "email": made.email,
            "grant_micro": made.grant_micro,
            "grant_usd": usd(made.grant_micro),
        },
        201,
    )
