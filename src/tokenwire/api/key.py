"""``GET /v1/key``: the calling key itself: its name, limits, allowed models, expiry, balance.

What a key's holder may know about it (the usage page shows it); the same object the admin
API answers for a key, with the balance read from the database now. No secret is returned.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tokenwire.accounting.pricing import usd
from tokenwire.api.admin import key_object
from tokenwire.api.auth import authenticate
from tokenwire.api.errors import json_response
from tokenwire.state import get_state


async def get_own_key(request: Request) -> Response:
    """The caller's key as an ``api_key`` object (its balance as of now)."""
    key = await authenticate(request)
    balance = await get_state(request).ledger.balance(key.id)
    return json_response({**key_object(key), "balance_micro": balance, "balance_usd": usd(balance)})
