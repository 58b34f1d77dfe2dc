"""Stored responses (the Responses API): kept per key, read back, chained, deleted.

A response is stored once, when its generation has settled (``store`` not false): the
``response`` object as ``GET /v1/responses/{id}`` returns it, and the conversation through its
output as Chat Completions messages, which a later request naming it as
``previous_response_id`` continues. Only the key that created a response sees it; any other
key gets the same 404 as for an id that never existed.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenwire.errors import NotFound
from tokenwire.storage.engine import database_errors
from tokenwire.storage.tables import responses

_encode = msgspec.json.encode


def not_found(response_id: str, param: str | None = None) -> NotFound:
    """The 404 for a response this key cannot see."""
    return NotFound(
        f"No response found with id {response_id!r}.",
        param=param,
        code="previous_response_not_found" if param == "previous_response_id" else "not_found",
    )


class ResponseStore:
    """The ``responses`` table."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def save(
        self, key_id: str, response: dict[str, Any], conversation: list[dict[str, Any]]
    ) -> None:
        """Store a finished response and its conversation (once per response id)."""
        with database_errors("storing the response"):
            async with self._engine.begin() as conn:
                await conn.execute(
                    responses.insert().values(
                        id=response["id"],
                        key_id=key_id,
                        created_at=int(response.get("created_at") or time.time()),
                        model=response["model"],
                        status=response["status"],
                        previous_response_id=response.get("previous_response_id"),
                        response=_encode(response).decode(),
                        conversation=_encode(conversation).decode(),
                    )
                )

    async def get(self, response_id: str, key_id: str) -> dict[str, Any]:
        """The response object, or a 404."""
        row = await self._row(responses.c.response, response_id, key_id)
        if row is None:
            raise not_found(response_id)
        result: dict[str, Any] = msgspec.json.decode(row)
        return result

    async def conversation(self, response_id: str, key_id: str) -> list[dict[str, Any]] | None:
        """The chat messages through the response's output, or None if it is not stored."""
        row = await self._row(responses.c.conversation, response_id, key_id)
        if row is None:
            return None
        messages: list[dict[str, Any]] = msgspec.json.decode(row)
        return messages

    async def delete(self, response_id: str, key_id: str) -> bool:
        """Forget a response; False if this key has none with that id."""
        with database_errors("deleting the response"):
            async with self._engine.begin() as conn:
                result = await conn.execute(
                    responses.delete().where(
                        responses.c.id == response_id, responses.c.key_id == key_id
                    )
                )
        return bool(result.rowcount)

    async def _row(self, column: Any, response_id: str, key_id: str) -> str | None:
        with database_errors("reading the response"):
            async with self._engine.connect() as conn:
                value = await conn.scalar(
                    sa.select(column).where(
                        responses.c.id == response_id, responses.c.key_id == key_id
                    )
                )
        return None if value is None else str(value)
