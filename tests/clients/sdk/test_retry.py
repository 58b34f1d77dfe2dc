"""The client's retry policy and error mapping, without I/O: which answers are retried, how
long the waits are, when it gives up, and which exception each gateway error becomes."""

from __future__ import annotations

import email.utils
import random

import pytest

from tokenwire_client import errors
from tokenwire_client.retry import (
    GiveUp,
    RetryPolicy,
    RetryState,
    is_retryable,
    parse_go_duration,
    retry_after_from_headers,
)


def status_error(status: int, code: str | None = None) -> errors.APIStatusError:
    return errors.error_from_body(status, {"error": {"message": "m", "code": code}})


@pytest.mark.parametrize(
    ("status", "code", "retried"),
    [
        (429, "rate_limit_exceeded", True),
        (429, "concurrent_streams_exceeded", True),
        (429, "tokens_exceed_limit", False),  # larger than the limit: no wait can fix it
        (409, "idempotency_key_in_use", True),
        (409, "idempotency_key_reused", False),
        (500, "internal_error", True),
        (502, "upstream_error", True),
        (503, "provider_unavailable", True),
        (504, "upstream_timeout", True),
        (529, None, True),
        (400, "invalid_value", False),
        (401, "invalid_api_key", False),
        (402, "insufficient_quota", False),
        (403, "model_not_allowed", False),
        (404, "model_not_found", False),
        (410, "stream_expired", False),
        (413, "request_too_large", False),
    ],
)
def test_which_answers_are_retried(status: int, code: str | None, retried: bool) -> None:
    """429 (but tokens_exceed_limit), 409 in use and 5xx are retried; 400/401/402/403/404/409 reused/410/413 never."""
    assert is_retryable(status_error(status, code)) is retried


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, None, errors.BadRequestError),
        (401, "invalid_api_key", errors.AuthenticationError),
        (402, "insufficient_quota", errors.InsufficientQuotaError),
        (403, None, errors.PermissionDeniedError),
        (404, "model_not_found", errors.ModelNotFoundError),
        (404, "stream_not_found", errors.StreamNotFoundError),
        (409, "idempotency_key_reused", errors.IdempotencyConflictError),
        (409, "idempotency_key_in_use", errors.IdempotencyInProgressError),
        (410, "cursor_out_of_range", errors.StreamGoneError),
        (413, None, errors.RequestTooLargeError),
        (429, None, errors.RateLimitError),
        (500, None, errors.InternalServerError),
        (502, None, errors.UpstreamError),
        (503, None, errors.ServiceUnavailableError),
        (504, None, errors.UpstreamTimeoutError),
        (529, None, errors.InternalServerError),
    ],
)
def test_each_gateway_error_has_its_class(
    status: int, code: str | None, cls: type[errors.APIStatusError]
) -> None:
    """Status and code pick the exception class; status, code and message are kept."""
    error = status_error(status, code)
    assert type(error) is cls
    assert (error.status, error.code, error.message) == (status, code, "m")


def test_an_error_body_that_is_not_openai_shaped_still_gives_a_typed_error() -> None:
    """A proxy's HTML 502 or an empty body: the class by status and a message naming it."""
    error = errors.error_from_body(502, None)
    assert isinstance(error, errors.UpstreamError)
    assert "502" in error.message


def test_retry_after_headers() -> None:
    """Retry-After seconds or HTTP date, retry-after-ms, then the reset of an exhausted limit; None when nothing says."""
    now = 1_800_000_000.0
    assert retry_after_from_headers({"Retry-After": "2"}, now=now) == 2.0
    assert retry_after_from_headers({"retry-after-ms": "250", "Retry-After": "2"}, now=now) == 0.25
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert retry_after_from_headers({"Retry-After": date}, now=now) == pytest.approx(7, abs=1)
    exhausted = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"}
    assert retry_after_from_headers(exhausted, now=now) == 1.5
    both = {
        **exhausted,
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert retry_after_from_headers(both, now=now) == 360.0
    left = {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "9s"}
    assert retry_after_from_headers(left, now=now) is None  # not exhausted: says nothing
    epoch = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(now) + 4)}
    assert retry_after_from_headers(epoch, now=now) == 4.0
    assert retry_after_from_headers({"Retry-After": "soon"}, now=now) is None
    assert retry_after_from_headers({}, now=now) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20ms", 0.02), ("1s", 1.0), ("1.5s", 1.5), ("6m0s", 360.0), ("1h2m3s", 3723.0), ("x", None)],
)
def test_go_durations(text: str, seconds: float | None) -> None:
    """OpenAI's reset durations parse to seconds; anything else is None."""
    assert parse_go_duration(text) == seconds


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    """Each wait is uniform in [0, min(cap, base * 2^(n-1))]: spread out, never over the ceiling."""
    policy = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=4.0)
    rng = random.Random(1)
    for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        waits = [policy.backoff(failures, rng) for _ in range(500)]
        assert min(waits) >= 0 and max(waits) <= ceiling
        assert max(waits) > 0.8 * ceiling and min(waits) < 0.2 * ceiling  # the whole range


def test_retry_state_bounds_attempts_and_time_and_resets_on_progress() -> None:
    """max_retries failures in a row, then GiveUp; progress starts afresh; a first drop after progress waits 0; an asked wait is a floor; a wait past the time budget is not started."""
    state = RetryState(RetryPolicy(max_retries=2, max_retry_time_s=60), random.Random(2))
    state.next_wait()
    state.next_wait()
    with pytest.raises(GiveUp):
        state.next_wait()
    state.progress()
    assert state.next_wait(after_progress=True) == 0.0
    assert state.next_wait(asked_s=3.0) >= 3.0
    short = RetryState(RetryPolicy(max_retries=9, max_retry_time_s=5.0))
    with pytest.raises(GiveUp):
        short.next_wait(asked_s=30.0)  # the gateway asks for more than the budget: raise now
