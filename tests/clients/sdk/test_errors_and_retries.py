"""Acceptance: what the client retries, how long it waits, when it stops, and the typed errors.

429 storms on a low-rpm key are retried no sooner than the gateway says and a bounded number
of times; 401 and 402 are raised at once; a failing upstream (5xx) is retried a bounded
number of times, each time as a new generation (billed nothing); an error after the first
token is raised, never retried. Both transports run the same functions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from tokenwire.testing import GatewayServer
from tokenwire_client import (
    APIStatusError,
    AsyncClient,
    AuthenticationError,
    InsufficientQuotaError,
    InternalServerError,
    RateLimitError,
    RetryPolicy,
)

TRANSPORTS = pytest.mark.parametrize("transport", ["sse", "ws"])
HELLO = [{"role": "user", "content": "Hello"}]
FAST = RetryPolicy(max_retries=3, initial_backoff_s=0.01, max_backoff_s=0.1)


def retries_logged(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The client's retry decisions, as it logged them."""
    return [
        r.tokenwire_retry  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "tokenwire_client" and hasattr(r, "tokenwire_retry")
    ]


@TRANSPORTS
async def test_a_429_storm_is_retried_no_sooner_than_asked_and_a_bounded_number_of_times(
    sdk_gateway: GatewayServer, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    """12 requests at once on a 3-per-3-s key: 3 pass at once, the rest wait at least what each 429 asked (Retry-After / retry_after_ms) plus jitter, at most 3 times each; some pass after waiting, the others raise RateLimitError with retry_after."""
    caplog.set_level(logging.INFO, logger="tokenwire_client")
    _, key = sdk_gateway.create_key(f"storm-{transport}", rpm=3)
    started = time.monotonic()
    async with AsyncClient(
        sdk_gateway.base_url, key, transport=transport, retry_policy=FAST
    ) as client:
        outcomes = await asyncio.gather(
            *(
                client.chat.completions.create(model="sim", messages=HELLO, max_tokens=3)
                for _ in range(12)
            ),
            return_exceptions=True,
        )
    elapsed = time.monotonic() - started
    passed = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(e, RateLimitError) and (e.retry_after or 0) > 0 for e in refused)
    decisions = [d for d in retries_logged(caplog) if d["reason"] == "status"]
    assert decisions and all(d["status"] == 429 for d in decisions)
    assert all(d["retry_after_s"] is not None for d in decisions)
    assert all(d["wait_s"] >= d["retry_after_s"] for d in decisions)  # never sooner than asked
    per_request: dict[str, int] = {}
    for decision in decisions:
        per_request[decision["request_id"]] = per_request.get(decision["request_id"], 0) + 1
    assert max(per_request.values()) <= FAST.max_retries  # bounded attempts
    assert len(per_request) == 12 - 3  # everyone but the burst was refused at first
    assert 3 < len(passed) < 12  # some got in after waiting, the rate held the rest out
    assert elapsed < 3 * (3.0 + FAST.max_backoff_s) + 5  # bounded time: 3 waits of <= 3 s


@TRANSPORTS
async def test_401_is_raised_at_once_and_validate_key_says_why(
    sdk_gateway: GatewayServer, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    """An unknown key: AuthenticationError (401) on the first attempt, no retry; validate_key() is false with the gateway's reason, and true for a good key."""
    caplog.set_level(logging.INFO, logger="tokenwire_client")
    async with AsyncClient(sdk_gateway.base_url, "tw-not-a-key", transport=transport) as client:
        with pytest.raises(AuthenticationError) as info:
            await client.chat.completions.create(model="sim", messages=HELLO, stream=True)
        check = await client.validate_key()
    assert info.value.status == 401 and info.value.code == "invalid_api_key"
    assert not check and "revoked" in check.reason
    assert retries_logged(caplog) == []
    async with AsyncClient(sdk_gateway.base_url, sdk_gateway.api_key) as client:
        assert await client.validate_key()


@TRANSPORTS
async def test_402_is_raised_at_once(
    sdk_gateway: GatewayServer, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    """A key without credit on a priced model: InsufficientQuotaError (402), no retry, no ledger row."""
    caplog.set_level(logging.INFO, logger="tokenwire_client")
    _, key = sdk_gateway.create_key(f"broke-{transport}")
    async with AsyncClient(sdk_gateway.base_url, key, transport=transport) as client:
        with pytest.raises(InsufficientQuotaError) as info:
            await client.chat.completions.create(
                model="priced-sim", messages=HELLO, stream=True, max_tokens=10
            )
    assert info.value.status == 402 and info.value.code == "insufficient_quota"
    assert retries_logged(caplog) == []
    assert sdk_gateway.usage_rows(key, 0) == []


@TRANSPORTS
async def test_an_upstream_5xx_is_retried_as_new_generations_a_bounded_number_of_times(
    proxy_gateway: GatewayServer, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    """An upstream that always answers 503: max_retries retries (each a new generation, as the failed one is bound to its Idempotency-Key), then the typed 5xx; every attempt's ledger row costs nothing."""
    caplog.set_level(logging.INFO, logger="tokenwire_client")
    _, key = proxy_gateway.create_key(f"failing-{transport}", credits_usd="1")
    failing = [{"role": "user", "content": "please sim-fault:503"}]
    async with AsyncClient(
        proxy_gateway.base_url, key, transport=transport, retry_policy=FAST
    ) as client:
        with pytest.raises(InternalServerError) as info:
            await client.chat.completions.create(model="proxied-sim", messages=failing, stream=True)
    assert info.value.status >= 500
    decisions = retries_logged(caplog)
    assert [d["status"] for d in decisions] == [info.value.status] * FAST.max_retries
    rows = proxy_gateway.usage_rows(key, FAST.max_retries + 1)
    assert len({r["completion_id"] for r in rows}) == FAST.max_retries + 1
    assert {r["cost_micro"] for r in rows} == {0}


@TRANSPORTS
async def test_an_error_after_the_first_token_is_raised_not_retried(
    proxy_gateway: GatewayServer, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    """An upstream that fails after its first token: the chunk arrives, then the typed error is raised from the iterator; nothing is sent again."""
    caplog.set_level(logging.INFO, logger="tokenwire_client")
    failing = [{"role": "user", "content": "please sim-fault:500-after"}]
    texts: list[str] = []
    async with AsyncClient(
        proxy_gateway.base_url, proxy_gateway.api_key, transport=transport, retry_policy=FAST
    ) as client:
        stream = await client.chat.completions.create(
            model="proxied-sim", messages=failing, stream=True
        )
        with pytest.raises(APIStatusError) as info:
            async for text in stream.text_stream:
                texts.append(text)
        await stream.close()
    assert len(texts) == 1
    assert info.value.status >= 500
    assert retries_logged(caplog) == []
