"""GCRA arithmetic and the rate-limit headers, without any backend."""

from __future__ import annotations

import pytest

from tokenwire.limits.base import (
    BucketState,
    LimitExceeded,
    LimitSpec,
    gcra,
    go_duration,
    raise_if_refused,
    rate_headers,
)


def test_gcra_allows_a_burst_of_the_limit_then_one_per_interval() -> None:
    """A limit of 5 per 60 s admits 5 at once, refuses the 6th for 12 s, then admits one."""
    tat, now = 0.0, 100.0
    remaining = []
    for _ in range(5):
        step = gcra(tat, now, 1, 5, 60.0)
        assert step.allowed
        tat = step.new_tat
        remaining.append(step.remaining)
    assert remaining == [4, 3, 2, 1, 0]
    refused = gcra(tat, now, 1, 5, 60.0)
    assert not refused.allowed and refused.new_tat == tat
    assert abs(refused.retry_after_s - 12.0) < 1e-9
    assert gcra(tat, now + 12.0, 1, 5, 60.0).allowed


def test_gcra_costs_and_full_reset() -> None:
    """A cost of n consumes n units; reset is the time until the bucket is full again."""
    step = gcra(0.0, 10.0, 600, 1000, 60.0)
    assert step.allowed and step.remaining == 400
    assert abs(step.reset_s - 36.0) < 1e-9
    assert not gcra(step.new_tat, 10.0, 401, 1000, 60.0).allowed


def test_go_duration_matches_openai_style() -> None:
    """Durations read like OpenAI's reset headers."""
    assert go_duration(0.02) == "20ms"
    assert go_duration(1) == "1s"
    assert go_duration(12.5) == "12.5s"
    assert go_duration(360) == "6m0s"
    assert go_duration(3723) == "1h2m3s"


def test_rate_headers_and_limit_exceeded() -> None:
    """Both header families are present, and a 429 adds Retry-After in whole seconds."""
    headers = rate_headers(BucketState(5, 0, 12.0), BucketState(1000, 400, 36.0), now_wall=1000.0)
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "12s"
    assert headers["x-ratelimit-remaining-tokens"] == "400"
    assert headers["X-RateLimit-Reset"] == "1012"
    error = LimitExceeded(
        "slow", retry_after_s=11.2, code="rate_limit_exceeded", limit_headers=headers
    )
    assert error.http_status == 429
    assert error.headers()["Retry-After"] == "12"
    assert error.headers()["X-RateLimit-Limit"] == "5"


@pytest.mark.parametrize(
    ("spec", "tokens", "retries", "open_streams", "reason"),
    [
        (LimitSpec(rpm=1), 1, (5.0, None), 0, "requests"),
        (LimitSpec(tpm=100), 10, (None, 3.0), 0, "tokens"),
        (LimitSpec(tpm=100), 500, (None, None), 0, "request_too_large"),
        (LimitSpec(max_streams=1), 1, (None, None), 1, "streams"),
        (LimitSpec(rpm=1, max_streams=1), 1, (0.5, None), 1, "streams"),  # the longest wait
    ],
)
def test_a_refusal_names_the_limit_that_refused(
    spec: LimitSpec,
    tokens: int,
    retries: tuple[float | None, float | None],
    open_streams: int,
    reason: str,
) -> None:
    """LimitExceeded carries which limit refused (for metrics), the one whose wait is longest."""
    with pytest.raises(LimitExceeded) as refused:
        raise_if_refused(
            spec,
            60.0,
            tokens,
            requests_retry_s=retries[0],
            tokens_retry_s=retries[1],
            open_streams=open_streams,
            headers={},
        )
    assert refused.value.reason == reason
