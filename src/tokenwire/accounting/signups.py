"""Self-service sign-ups: a key for an email address, with a free grant once per mailbox.

One sign-up is one transaction, so it happens whole or not at all:

1. take a place under each daily cap (UTC days): per mailbox (``max_per_email_per_day``), per
   client IP address (``max_per_ip_per_day``) and overall (``max_per_day``). A place is one
   conditional ``UPDATE … SET count = count + 1 WHERE count < cap`` on a counter row, atomic
   on SQLite and PostgreSQL alike, so concurrent sign-ups never exceed a cap; a refusal rolls
   back the places already taken;
2. give the grant if this mailbox never received one (``signups.grant_email`` is unique, and
   the mailbox's counter row, locked by step 1, makes concurrent sign-ups of one mailbox wait
   for each other), else none;
3. create the key (and its ``grant`` credit event) and the sign-up row.

The **mailbox** of an address is what a grant is counted against: the address in lower case
with any ``+tag`` dropped from its local part (``Ann+2@Example.com`` → ``ann@example.com``), so
tags cannot collect one grant each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokenwire.accounting.keys import KeyLimits, KeyStore
from tokenwire.errors import RateLimited
from tokenwire.storage.engine import database_errors, insert_ignoring_duplicates
from tokenwire.storage.tables import signup_counters, signups

EMAIL_PATTERN = (
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
"""An email address as sign-up takes it: the HTML form's rule, with a dot in the domain.
(As everywhere in Python, ``$`` also matches before a final newline; the address is stripped.)"""
MAX_EMAIL_LENGTH = 254
DAY_S = 86_400
_ATTEMPTS = 2  # a sign-up that lost a race on the unique grant index is tried once more


def mailbox(email: str) -> str:
    """The identity a grant is counted against (see the module docstring)."""
    local, _, domain = email.strip().lower().rpartition("@")
    return f"{local.partition('+')[0] or local}@{domain}"


@dataclass(frozen=True, slots=True)
class SignupPolicy:
    """What a sign-up gives and how many there may be (from ``[signup]``)."""

    grant_micro: int
    max_per_day: int
    max_per_ip_per_day: int
    max_per_email_per_day: int
    plan: str | None = None
    limits: KeyLimits = field(default_factory=KeyLimits)


@dataclass(frozen=True, slots=True)
class Signup:
    """A key made by a sign-up; ``plaintext`` is shown once."""

    key_id: str
    plaintext: str
    email: str
    grant_micro: int  # 0 when the mailbox had its grant already


class SignupStore:
    """Sign-ups in the database (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, keys: KeyStore) -> None:
        self._engine = engine
        self._keys = keys

    async def sign_up(
        self,
        email: str,
        client_ip: str,
        policy: SignupPolicy,
        *,
        invite_code: str | None = None,
        now: float | None = None,
    ) -> Signup:
        """Make a key for ``email``; ``RateLimited`` (429) when a daily cap is reached."""
        moment = time.time() if now is None else now
        with database_errors("signing up"):
            for attempt in range(1, _ATTEMPTS + 1):
                try:
                    async with self._engine.begin() as conn:
                        return await self._sign_up(
                            conn, email.strip().lower(), client_ip, policy, invite_code, moment
                        )
                except sa.exc.IntegrityError:
                    if attempt == _ATTEMPTS:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _sign_up(
        self,
        conn: AsyncConnection,
        email: str,
        client_ip: str,
        policy: SignupPolicy,
        invite_code: str | None,
        now: float,
    ) -> Signup:
        day = int(now // DAY_S)
        retry_after_s = (day + 1) * DAY_S - now
        owner = mailbox(email)
        for scope, subject, cap, what in (
            ("email", owner, policy.max_per_email_per_day, "this email address"),
            ("ip", client_ip, policy.max_per_ip_per_day, "this client address"),
            ("day", "", policy.max_per_day, "this gateway"),
        ):
            if not await _take_place(conn, scope, subject, day, cap):
                raise RateLimited(
                    f"No more sign-ups today for {what} (at most {cap} a day, UTC); try again "
                    "tomorrow.",
                    retry_after_s=retry_after_s,
                    code=f"signup_{scope}_limit",
                )
        granted_before = await conn.scalar(
            sa.select(sa.func.count()).select_from(signups).where(signups.c.grant_email == owner)
        )
        grant = policy.grant_micro if not granted_before else 0
        key_id, plaintext = await self._keys.insert(
            conn,
            f"signup {email}"[:200],
            limits=policy.limits,
            grant_micro=grant,
            plan=policy.plan,
            grant_note="sign-up grant",
        )
        await conn.execute(
            signups.insert().values(
                email=email,
                grant_email=owner if grant else None,
                key_id=key_id,
                client_ip=client_ip[:64],
                invite_code=invite_code,
                grant_micro=grant,
                created_at=int(now),
            )
        )
        await conn.execute(signup_counters.delete().where(signup_counters.c.day < day - 1))
        return Signup(key_id, plaintext, email, grant)


async def _take_place(conn: AsyncConnection, scope: str, subject: str, day: int, cap: int) -> bool:
    """Count one more sign-up under ``cap`` for (scope, subject, day); False when full."""
    await conn.execute(
        insert_ignoring_duplicates(conn, signup_counters).values(
            scope=scope, subject=subject[:254], day=day, count=0
        )
    )
    taken = await conn.execute(
        signup_counters.update()
        .where(
            signup_counters.c.scope == scope,
            signup_counters.c.subject == subject[:254],
            signup_counters.c.day == day,
            signup_counters.c.count < cap,
        )
        .values(count=signup_counters.c.count + 1)
    )
    return bool(taken.rowcount == 1)
