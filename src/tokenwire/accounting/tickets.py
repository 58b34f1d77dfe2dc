"""Single-use WebSocket tickets for browsers, which cannot set ``Authorization`` on a socket.

``POST /v1/ws/tickets`` (with a Bearer key) issues a random ticket valid for a short time; the
page offers it as the subprotocol ``tokenwire.ticket.<ticket>`` next to ``tokenwire.v1``, and
the server echoes ``tokenwire.v1`` only. A ticket works once. Only its SHA-256 is kept:

* :class:`MemoryTicketStore` in process memory (one gateway process);
* :class:`RedisTicketStore` in Redis whenever Redis is configured (``TOKENWIRE_REDIS_URL``, or
  ``limits.backend`` / ``server.stream_backend`` = ``"redis"``), so a ticket issued by one
  gateway instance works on any other behind the same load balancer. ``SET … PX`` makes it
  expire, ``GETDEL`` redeems it atomically: two instances racing to redeem one ticket cannot
  both succeed.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenwire.errors import TicketStoreUnavailable

REDIS_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Ticket:
    """An issued ticket: the plaintext (returned once), its key id and expiry (Unix seconds)."""

    value: str
    key_id: str
    expires_at: float


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _new_ticket(key_id: str, ttl_s: float) -> Ticket:
    return Ticket(value=secrets.token_urlsafe(24), key_id=key_id, expires_at=time.time() + ttl_s)


class TicketStore(Protocol):
    """Issues and redeems single-use tickets."""

    async def issue(self, key_id: str) -> Ticket:
        """A new ticket for ``key_id``."""
        ...

    async def redeem(self, value: str) -> str | None:
        """The key id of a valid, unused ticket (which is used up now), or None."""
        ...

    async def aclose(self) -> None: ...


class MemoryTicketStore:
    """Tickets in this process's memory (at most ``max_outstanding`` unexpired)."""

    def __init__(self, ttl_s: float, *, max_outstanding: int = 100_000) -> None:
        self._ttl_s = ttl_s
        self._max = max_outstanding
        self._tickets: dict[str, tuple[str, float]] = {}

    async def issue(self, key_id: str) -> Ticket:
        if len(self._tickets) >= self._max:
            now = time.time()
            self._tickets = {d: v for d, v in self._tickets.items() if v[1] > now}
        ticket = _new_ticket(key_id, self._ttl_s)
        self._tickets[_digest(ticket.value)] = (key_id, ticket.expires_at)
        return ticket

    async def redeem(self, value: str) -> str | None:
        entry = self._tickets.pop(_digest(value), None)
        if entry is None or entry[1] <= time.time():
            return None
        return entry[0]

    async def aclose(self) -> None:
        """Nothing to close."""


class RedisTicketStore:
    """Tickets in Redis, shared by every gateway process on it: ``{prefix}tk:<sha256>``."""

    def __init__(self, url: str, *, prefix: str, ttl_s: float) -> None:
        self._redis: Redis = Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._prefix = f"{prefix}tk:"
        self._ttl_ms = max(1, round(ttl_s * 1000))

    async def issue(self, key_id: str) -> Ticket:
        ticket = _new_ticket(key_id, self._ttl_ms / 1000)
        try:
            await self._redis.set(self._prefix + _digest(ticket.value), key_id, px=self._ttl_ms)
        except RedisError as exc:
            raise _unavailable(exc) from None
        return ticket

    async def redeem(self, value: str) -> str | None:
        try:
            key_id = await self._redis.getdel(self._prefix + _digest(value))
        except RedisError as exc:
            raise _unavailable(exc) from None
        if key_id is None:
            return None
        return key_id.decode() if isinstance(key_id, bytes) else str(key_id)

    async def aclose(self) -> None:
        await self._redis.aclose()


def _unavailable(exc: RedisError) -> TicketStoreUnavailable:
    return TicketStoreUnavailable(
        f"The WebSocket ticket store (Redis) is unavailable ({type(exc).__name__}); retry shortly."
    )
