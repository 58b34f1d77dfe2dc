"""Fault injection for ``sim-upstream``: the failures real upstreams produce, on demand.

A request asks for a fault with ``sim-fault:<kind>`` in its last user message (so a request
sent through the gateway can ask too), optionally ``-after`` to fail after the first token:

==============  ============================================================================
kind            what the upstream does
==============  ============================================================================
``500``         HTTP 500 with an OpenAI error body (after: an in-band ``{"error"}`` chunk)
``503``         HTTP 503 (after: in-band error)
``529``         HTTP 529 ``overloaded_error`` (after: in-band error)
``429``         HTTP 429 with ``Retry-After: 1`` (after: in-band error)
``reset``       the connection is dropped (before any byte, or after the first chunk)
``stall``       nothing more is sent until the client gives up
``malformed``   a ``data:`` line that is not JSON
``truncated``   the body ends without a finish chunk and without ``[DONE]``
``error``       an in-band ``data: {"error": ...}`` chunk, then the body ends
==============  ============================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenwire.wire.schema import ChatRequest, UserMessage, content_text

KINDS = ("500", "503", "529", "429", "reset", "stall", "malformed", "truncated", "error")
_PATTERN = re.compile(r"sim-fault:(" + "|".join(KINDS) + r")(-after)?")


@dataclass(frozen=True, slots=True)
class Fault:
    """A requested fault and whether it strikes after the first token."""

    kind: str
    after_first_token: bool

    @property
    def status(self) -> int | None:
        """The HTTP status for a status-code fault."""
        return int(self.kind) if self.kind.isdigit() else None


def requested_fault(request: ChatRequest) -> Fault | None:
    """The fault the request's last user message asks for, if any."""
    for message in reversed(request.messages):
        if isinstance(message, UserMessage):
            match = _PATTERN.search(content_text(message.content))
            return None if match is None else Fault(match.group(1), match.group(2) is not None)
    return None


class ConnectionDropped(Exception):
    """Raised inside the ASGI app so the server drops the connection (a "reset")."""
