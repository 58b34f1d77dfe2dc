"""Per-key rate limits end to end, with the in-process and the Redis limiter: rpm over SSE (429
with ``Retry-After``, OpenAI's ``x-ratelimit-*`` headers and the common ``X-RateLimit-*`` trio,
served again after the window), only the headers of the limits that are set, the exact remaining
count of a fresh bucket, rpm over the WebSocket envelope (an ``error`` with ``retry_after_ms``; the
socket stays open), tpm (a request larger than the limit, its token headers, the estimate
reconciled with real usage) and what a refusal by one limit reports about the other.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.accounting.conftest import (
    SHORT_WINDOW_S,
    accounts,
    bearer,
    chat,
    check_openai_error,
    poll,
    recv_json,
    settled,
    sim_plan,
    sse,
    wait_for,
    ws_request,
    ws_url,
)
from websockets.asyncio.client import ClientConnection, connect

from tokenwire.accounting.budget import estimate_prompt_tokens
from tokenwire.accounting.keys import KeyLimits
from tokenwire.limits.base import gcra
from tokenwire.testing import GatewayServer
from tokenwire.wire.schema import decode_chat_request


def prompt_estimate(body: dict[str, Any]) -> int:
    """The gateway's admission estimate of the prompt (what it reserves for)."""
    return estimate_prompt_tokens(decode_chat_request(json.dumps(body).encode()))


_GO_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_go_duration(text: str) -> float:
    """``400ms``, ``1.6s``, ``1m2s`` → seconds."""
    if text.endswith("ms") and text[:-2].isdigit():
        return int(text[:-2]) / 1000
    match = _GO_DURATION.match(text)
    assert match is not None and text, f"not a Go duration: {text!r}"
    hours, minutes, seconds = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


async def still_open(ws: ClientConnection) -> None:
    """The socket answers a ping: it stayed open."""
    await ws.send(json.dumps({"type": "ping"}))
    while True:
        message = await recv_json(ws)
        if message.get("type") == "pong":
            return


# -- requests per window -----------------------------------------------------------------------


async def test_rpm_over_sse_headers_429_and_recovery(
    short_window: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """rpm=5: five streams with headers counting down, a 6th 429 with Retry-After, headers and an OpenAI body, then served again."""
    gw = short_window
    async with accounts(gw) as acc:
        record, key = await acc.keys.create("rpm5", limits=KeyLimits(rpm=5, tpm=100_000))
    body = chat("count down", max_tokens=2)
    estimate = prompt_estimate(body) + 2
    replies = []
    for _ in range(5):
        replies.append(await sse(http, gw, key, body))
    for i, reply in enumerate(replies):
        assert reply.status == 200, reply
        assert reply.error is None and reply.text == sim_plan(body).text
        h = reply.headers
        assert h["x-ratelimit-limit-requests"] == "5"
        assert h["x-ratelimit-remaining-requests"] == str(4 - i), (i, h)
        reset = parse_go_duration(h["x-ratelimit-reset-requests"])
        assert 0.4 * (i + 1) - 0.2 <= reset <= 0.4 * (i + 1) + 0.01, (
            i,
            h["x-ratelimit-reset-requests"],
        )
        assert h["x-ratelimit-limit-tokens"] == "100000"
        assert 100_000 - (i + 1) * estimate - 1 <= int(h["x-ratelimit-remaining-tokens"]) <= 100_000
        parse_go_duration(h["x-ratelimit-reset-tokens"])
        assert h["x-ratelimit-limit"] == "5"
        assert h["x-ratelimit-remaining"] == str(4 - i)
        assert (
            time.time()
            <= int(h["x-ratelimit-reset"])
            <= math.ceil(time.time() + SHORT_WINDOW_S) + 1
        )
    remaining_tokens = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in replies]
    assert remaining_tokens == sorted(remaining_tokens, reverse=True), remaining_tokens

    refused = await sse(http, gw, key, body)
    refused_at = time.monotonic()
    assert refused.status == 429, refused
    check_openai_error(refused.error, type_="rate_limit_error", code="rate_limit_exceeded")
    h = refused.headers
    retry_after = int(h["retry-after"])
    assert 1 <= retry_after <= math.ceil(SHORT_WINDOW_S)
    assert h["x-ratelimit-limit-requests"] == "5"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert 0 < parse_go_duration(h["x-ratelimit-reset-requests"]) <= SHORT_WINDOW_S
    assert h["x-ratelimit-limit-tokens"] == "100000"
    assert "x-ratelimit-remaining-tokens" in h and "x-ratelimit-reset-tokens" in h
    assert h["x-ratelimit-limit"] == "5" and h["x-ratelimit-remaining"] == "0"
    assert int(h["x-ratelimit-reset"]) >= int(time.time())
    assert "x-stream-id" not in h  # nothing started

    again, served_at = await poll(
        lambda: sse(http, gw, key, body), lambda r: r.status != 429, SHORT_WINDOW_S + 3
    )
    assert again.status == 200, again
    assert served_at - refused_at <= retry_after + 0.5, "not served again within Retry-After"
    assert again.text == sim_plan(body).text
    async with accounts(gw) as acc:
        assert await wait_for(lambda: settled(gw, acc, record.id, 6), 5)
        rows = await acc.ledger.rows(key_id=record.id)
    assert len(rows) == 6  # five, then the one served after the window; the 429 wrote nothing
    assert {r.completion_id for r in rows} == {r.stream_id for r in [*replies, again]}


async def test_headers_follow_the_limits_that_are_set(
    short_window: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """Only rpm set: no token headers; only tpm: token headers and the trio from tokens; none: no rate headers."""
    gw = short_window
    async with accounts(gw) as acc:
        _, rpm_only = await acc.keys.create("rpm-only", limits=KeyLimits(rpm=50))
        _, tpm_only = await acc.keys.create("tpm-only", limits=KeyLimits(tpm=5000))
        _, unlimited = await acc.keys.create("unlimited")
    body = chat("headers", max_tokens=3)
    estimate = prompt_estimate(body) + 3

    reply = await sse(http, gw, rpm_only, body)
    assert reply.status == 200
    assert reply.headers["x-ratelimit-limit-requests"] == "50"
    assert reply.headers["x-ratelimit-remaining-requests"] == "49"
    assert not [h for h in reply.headers if h.endswith("-tokens")], reply.headers

    reply = await sse(http, gw, tpm_only, body)
    assert reply.status == 200
    assert reply.headers["x-ratelimit-limit-tokens"] == "5000"
    # exact would be 5000 - estimate; +-1 tolerated here because of the float rounding pinned
    # down by test_fresh_bucket_remaining_is_exact (it decides this at random)
    assert abs(int(reply.headers["x-ratelimit-remaining-tokens"]) - (5000 - estimate)) <= 1
    assert "x-ratelimit-limit-requests" not in reply.headers
    assert reply.headers["x-ratelimit-limit"] == "5000"
    assert reply.headers["x-ratelimit-remaining"] == reply.headers["x-ratelimit-remaining-tokens"]

    reply = await sse(http, gw, unlimited, body)
    assert reply.status == 200
    assert not [h for h in reply.headers if "ratelimit" in h], reply.headers


@given(now=st.floats(min_value=1.0, max_value=1e7, allow_nan=False, allow_infinity=False))
@settings(max_examples=300, deadline=None)
def test_fresh_bucket_remaining_is_exact(now: float) -> None:
    """The remaining count after one admission on a fresh bucket is limit - cost exactly, whatever the monotonic clock reads."""
    for limit, window_s, cost in [(100_000, 60.0, 8), (5000, 2.0, 11), (30_000, 60.0, 1)]:
        step = gcra(now, now, cost, limit, window_s)
        assert step.allowed
        assert step.remaining == limit - cost, (now, limit, window_s, cost, step)


async def test_rpm_over_websocket_envelope(short_window: GatewayServer) -> None:
    """rpm=5 over one socket: five done, the 6th an error (429, code, retry_after_ms), the socket stays open and serves again after the window."""
    gw = short_window
    async with accounts(gw) as acc:
        record, key = await acc.keys.create("ws-rpm5", limits=KeyLimits(rpm=5))
    body = chat("over the socket", max_tokens=3)
    async with connect(ws_url(gw), additional_headers=bearer(key)) as ws:
        for i in range(5):
            done = await ws_request(ws, f"r{i}", body)
            assert done["type"] == "chat.completion.done", done
            assert done["finish_reason"] == "length"
        refused = await ws_request(ws, "r5", body)
        refused_at = time.monotonic()
        assert refused["type"] == "error", refused
        assert refused["request_id"] == "r5"
        error = refused["error"]
        check_openai_error(error, type_="rate_limit_error", code="rate_limit_exceeded")
        assert error["status"] == 429
        retry_after_ms = error["retry_after_ms"]
        assert isinstance(retry_after_ms, int)
        assert 0 < retry_after_ms <= SHORT_WINDOW_S * 1000
        await still_open(ws)

        attempts = iter(range(6, 10_000))
        served, served_at = await poll(
            lambda: ws_request(ws, f"r{next(attempts)}", body),
            lambda m: m["type"] != "error",
            SHORT_WINDOW_S + 3,
        )
        assert served["type"] == "chat.completion.done", served
        waited = served_at - refused_at
        assert waited >= retry_after_ms / 1000 - 0.05, "served before retry_after_ms had passed"
        assert waited <= retry_after_ms / 1000 + 0.5, "not served again within retry_after_ms"
        await still_open(ws)
    async with accounts(gw) as acc:
        assert await wait_for(lambda: settled(gw, acc, record.id, 6), 5)
        rows = await acc.ledger.rows(key_id=record.id)
    assert len(rows) == 6
    assert all(r.transport == "ws" and r.status == "completed" for r in rows)


# -- tokens per window -------------------------------------------------------------------------


async def test_request_larger_than_tpm(
    minute_window: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """prompt + max_tokens over tpm: 429 tokens_exceed_limit (with the token headers), nothing consumed, a smaller request still passes."""
    gw = minute_window
    async with accounts(gw) as acc:
        record, key = await acc.keys.create("tpm100", limits=KeyLimits(tpm=100))
    too_big = chat("large", max_tokens=200)
    assert prompt_estimate(too_big) + 200 > 100
    refused = await sse(http, gw, key, too_big)
    assert refused.status == 429, refused
    check_openai_error(refused.error, type_="rate_limit_error", code="tokens_exceed_limit")
    assert int(refused.headers["retry-after"]) >= 1

    small = chat("large", max_tokens=10)
    ok = await sse(http, gw, key, small)
    assert ok.status == 200, ok
    assert ok.headers["x-ratelimit-remaining-tokens"] == str(100 - prompt_estimate(small) - 10)
    async with accounts(gw) as acc:
        assert await wait_for(lambda: settled(gw, acc, record.id, 1), 5)
        assert len(await acc.ledger.rows(key_id=record.id)) == 1


async def test_too_large_refusal_carries_token_headers(
    minute_window: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """The 429 tokens_exceed_limit of a key with a tpm limit carries the token headers (limit, remaining, reset) as other responses do."""
    gw = minute_window
    async with accounts(gw) as acc:
        _, key = await acc.keys.create("tpm100-headers", limits=KeyLimits(tpm=100))
    refused = await sse(http, gw, key, chat("large", max_tokens=200))
    assert refused.status == 429, refused
    check_openai_error(refused.error, type_="rate_limit_error", code="tokens_exceed_limit")
    h = refused.headers
    assert h.get("x-ratelimit-limit-tokens") == "100", f"no token headers on the refusal: {h}"
    assert h.get("x-ratelimit-remaining-tokens") == "100", h  # nothing was consumed
    assert "x-ratelimit-reset-tokens" in h, h
    assert h.get("x-ratelimit-limit") == "100", h


async def test_tpm_reconciled_with_real_usage(
    minute_window: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """A request estimated at ~900 tokens that used ~8 gives the rest back: the next one is admitted at once, not ~54 s later."""
    gw = minute_window
    tpm = 1000
    async with accounts(gw) as acc:
        record, key = await acc.keys.create("tpm1000", limits=KeyLimits(tpm=tpm))
    body = chat("reconcile", max_tokens=900, stop=[" "])  # the stop cuts the output to one token
    sim = sim_plan(body)
    assert sim.completion_tokens == 1
    estimate = prompt_estimate(body) + 900
    actual = sim.prompt_tokens + sim.completion_tokens
    assert 2 * estimate > tpm  # without reconciliation the second request would wait ~54 s

    first = await sse(http, gw, key, body)
    assert first.status == 200, first
    first_remaining = int(first.headers["x-ratelimit-remaining-tokens"])
    assert tpm - estimate <= first_remaining <= tpm - estimate + 1
    started = time.monotonic()
    second, _ = await poll(lambda: sse(http, gw, key, body), lambda r: r.status != 429, 5)
    elapsed = time.monotonic() - started
    assert second.status == 200, f"the budget did not come back after real usage: {second}"
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    regenerated = math.ceil((elapsed + 0.5) * tpm / 60)
    assert tpm - actual - estimate <= remaining <= tpm - actual - estimate + regenerated, remaining
    async with accounts(gw) as acc:
        assert await wait_for(lambda: settled(gw, acc, record.id, 2), 5)
        rows = await acc.ledger.rows(key_id=record.id)
    assert [r.completion_tokens for r in rows] == [1, 1]


async def test_rpm_refusal_reports_tokens_left(
    minute_window: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """A request refused by rpm consumes no tokens, and the 429's remaining-tokens reports what really remains."""
    gw = minute_window
    async with accounts(gw) as acc:
        rpm_record, rpm_key = await acc.keys.create("rpm1-tpm", limits=KeyLimits(rpm=1, tpm=1000))

        # refused by rpm: the tokens it would have taken are not taken
        body = chat("big", max_tokens=300)
        used = sim_plan(body).prompt_tokens + 300
        assert (await sse(http, gw, rpm_key, body)).status == 200
        assert await wait_for(lambda: settled(gw, acc, rpm_record.id, 1), 5)
    refused = await sse(http, gw, rpm_key, body)
    assert refused.status == 429 and refused.error is not None
    assert refused.error["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    left = int(refused.headers["x-ratelimit-remaining-tokens"])
    assert left >= 1000 - used - 1, f"the 429 reports {left} tokens left; {1000 - used} are"


async def test_tpm_refusal_reports_requests_left(
    minute_window: GatewayServer, http: aiohttp.ClientSession
) -> None:
    """A request refused by tpm is not counted against rpm, and the 429's remaining-requests says so."""
    gw = minute_window
    async with accounts(gw) as acc:
        _, tpm_key = await acc.keys.create("rpm10-tpm100", limits=KeyLimits(rpm=10, tpm=100))
    small = chat("small", max_tokens=60)
    first = await sse(http, gw, tpm_key, small)
    assert first.status == 200 and first.headers["x-ratelimit-remaining-requests"] == "9"
    refused = await sse(http, gw, tpm_key, small)
    assert refused.status == 429 and refused.error is not None
    assert refused.error["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-requests"] == "9", refused.headers
