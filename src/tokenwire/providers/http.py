"""The HTTP plumbing every upstream provider shares: one aiohttp pool and a safe POST.

Providers that speak HTTP (OpenAI-compatible, Anthropic, Gemini) own one :class:`UpstreamPool`
each and keep only their wire format: request translation and event parsing.
"""

from __future__ import annotations

import aiohttp


class UpstreamPool:
    """A lazily created aiohttp session with a large connection pool and the upstream timeouts.

    ``connect_timeout_s`` bounds the TCP connect, ``idle_timeout_s`` the silence between two
    reads of a response (the mid-stream stall guard). The first-token timeout belongs to the
    provider's read loop, which knows what a first token is.
    """

    def __init__(
        self, *, connect_timeout_s: float, idle_timeout_s: float, max_connections: int
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=idle_timeout_s
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The session (made in the running loop on first use)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def post(
        self, url: str, payload: bytes, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """POST, retrying once when a pooled keep-alive connection turns out to be closed.

        A server may close an idle keep-alive connection just as the pool hands it out
        (uvicorn's default idle timeout is 5 s); the request was then never processed, so one
        retry on a fresh connection is safe. A refused connection is not retried here (the
        router decides about retries).
        """
        session = self.session()
        try:
            return await session.post(url, data=payload, headers=headers)
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return await session.post(url, data=payload, headers=headers)

    async def aclose(self) -> None:
        """Close the pool's connections."""
        if self._session is not None:
            await self._session.close()
