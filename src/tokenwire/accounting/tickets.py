"""Single-use WebSocket tickets for browsers, which cannot set ``Authorization`` on a socket.

``POST /v1/ws/tickets`` (with a Bearer key) issues a random ticket valid for a short time; the
page offers it as the subprotocol ``tokenwire.ticket.<ticket>`` next to ``tokenwire.v1``, and
the server echoes ``tokenwire.v1`` only. A ticket works once. Only its SHA-256 is kept, in
process memory (a multi-process deployment pins the ticket to the process that issued it, or
moves this store to Redis).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ticket:
    """An issued ticket: the plaintext (returned once), its key id and expiry (Unix seconds)."""

    value: str
    key_id: str
    expires_at: float


class TicketStore:
    """Issues and redeems single-use tickets."""

    def __init__(self, ttl_s: float, *, max_outstanding: int = 100_000) -> None:
        self._ttl_s = ttl_s
        self._max = max_outstanding
        self._tickets: dict[str, tuple[str, float]] = {}

    @staticmethod
    def _digest(value: str) -> str:
        return hashlib.sha256(value.encode()).hexdigest()

    def issue(self, key_id: str) -> Ticket:
        """A new ticket for ``key_id``."""
        now = time.time()
        if len(self._tickets) >= self._max:
            self._tickets = {d: v for d, v in self._tickets.items() if v[1] > now}
        value = secrets.token_urlsafe(24)
        expires_at = now + self._ttl_s
        self._tickets[self._digest(value)] = (key_id, expires_at)
        return Ticket(value=value, key_id=key_id, expires_at=expires_at)

    def redeem(self, value: str) -> str | None:
        """The key id of a valid, unused ticket (which is used up now), or None."""
        entry = self._tickets.pop(self._digest(value), None)
        if entry is None or entry[1] <= time.time():
            return None
        return entry[0]
