"""The in-process rate-limit backend: one gateway process, no external service.

State is a dict of GCRA arrival times and a dict of open stream ids per key, owned by one
event loop (no locks needed: every method runs without awaiting in between).
"""

from __future__ import annotations

import time

from tokenwire.limits.base import (
    Admission,
    BucketState,
    LimitSpec,
    gcra,
    raise_if_refused,
    rate_headers,
)


class MemoryRateLimiter:
    """Rate limits kept in this process."""

    def __init__(self, *, window_s: float = 60.0, auth_failures_per_window: int = 30) -> None:
        self._window_s = window_s
        self._auth_limit = auth_failures_per_window
        self._tat: dict[str, float] = {}
        self._streams: dict[str, set[str]] = {}

    def _prune(self, now: float) -> None:
        if len(self._tat) > 50_000:
            self._tat = {k: v for k, v in self._tat.items() if v > now}

    async def admit(self, key_id: str, spec: LimitSpec, tokens: int, stream_id: str) -> Admission:
        now = time.monotonic()
        self._prune(now)
        window = self._window_s
        requests = tokens_result = None
        if spec.rpm is not None:
            requests = gcra(self._tat.get("r:" + key_id, now), now, 1, spec.rpm, window)
        if spec.tpm is not None and tokens <= spec.tpm:
            tokens_result = gcra(self._tat.get("t:" + key_id, now), now, tokens, spec.tpm, window)
        request_state = (
            None
            if requests is None
            else BucketState(spec.rpm or 0, requests.remaining, requests.reset_s)
        )
        token_state = (
            None
            if tokens_result is None
            else BucketState(spec.tpm or 0, tokens_result.remaining, tokens_result.reset_s)
        )
        requests_retry = None if requests is None or requests.allowed else requests.retry_after_s
        tokens_retry = (
            None if tokens_result is None or tokens_result.allowed else tokens_result.retry_after_s
        )
        open_streams = len(self._streams.get(key_id, ()))
        refused = (
            requests_retry is not None
            or tokens_retry is not None
            or (spec.tpm is not None and tokens > spec.tpm)
            or (spec.max_streams is not None and open_streams >= spec.max_streams)
        )
        if refused:  # nothing is consumed: report the buckets as they stand
            request_state = self._peek("r:" + key_id, spec.rpm, now)
            token_state = self._peek("t:" + key_id, spec.tpm, now)
        headers = rate_headers(request_state, token_state)
        raise_if_refused(
            spec,
            window,
            tokens,
            requests_retry_s=requests_retry,
            tokens_retry_s=tokens_retry,
            open_streams=open_streams,
            headers=headers,
        )
        if requests is not None:
            self._tat["r:" + key_id] = requests.new_tat
        if tokens_result is not None:
            self._tat["t:" + key_id] = tokens_result.new_tat
        if spec.max_streams is not None:
            self._streams.setdefault(key_id, set()).add(stream_id)
        return Admission(key_id, stream_id, tokens, request_state, token_state, headers)

    def _peek(self, name: str, limit: int | None, now: float) -> BucketState | None:
        if limit is None:
            return None
        state = gcra(self._tat.get(name, now), now, 0, limit, self._window_s)
        return BucketState(limit, state.remaining, state.reset_s)

    async def release(self, admission: Admission, spec: LimitSpec, actual_tokens: int) -> None:
        self.release_nowait(admission, spec, actual_tokens)

    def release_nowait(self, admission: Admission, spec: LimitSpec, actual_tokens: int) -> bool:
        """Release at once: all of it is in this process's memory."""
        streams = self._streams.get(admission.key_id)
        if streams is not None:
            streams.discard(admission.stream_id)
            if not streams:
                del self._streams[admission.key_id]
        if spec.tpm is not None and actual_tokens != admission.tokens:
            now = time.monotonic()
            name = "t:" + admission.key_id
            interval = self._window_s / spec.tpm
            current = max(self._tat.get(name, now), now)
            self._tat[name] = max(now, current + (actual_tokens - admission.tokens) * interval)
        return True

    @property
    def held_slots(self) -> int:
        """Stream slots held (admitted, not yet released)."""
        return sum(len(streams) for streams in self._streams.values())

    async def auth_blocked(self, client: str) -> float | None:
        now = time.monotonic()
        peek = gcra(self._tat.get("a:" + client, now), now, 1, self._auth_limit, self._window_s)
        return None if peek.allowed else peek.retry_after_s

    async def auth_failed(self, client: str) -> None:
        now = time.monotonic()
        name = "a:" + client
        step = gcra(self._tat.get(name, now), now, 1, self._auth_limit, self._window_s)
        if step.allowed:
            self._tat[name] = step.new_tat

    async def aclose(self) -> None:
        return None
