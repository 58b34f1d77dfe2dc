"""LocalProvider against the real SmolLM2-135M-Instruct model (llama-cpp-python, CPU)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from tokenwire.errors import InvalidRequest, ProviderUnavailable, RateLimited
from tokenwire.providers.base import ProviderCall
from tokenwire.providers.local import LocalProvider, default_model_path
from tokenwire.streams.events import Event, Finish, TextDelta, Usage
from tokenwire.wire.schema import decode_chat_request

MODEL = default_model_path()
pytestmark = [pytest.mark.local_model]

HAIKU = "Write a haiku about the sea."
STORY = "Write a long story about a dragon who learns to bake bread."
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def make_call(content: str, **params: Any) -> ProviderCall:
    """A one-user-message call, decoded exactly as the gateway decodes request bodies."""
    body = {"model": "local", "messages": [{"role": "user", "content": content}], **params}
    request = decode_chat_request(json.dumps(body).encode())
    return ProviderCall(request=request, upstream_model="local", raw_body=body)


def open_stream(provider: LocalProvider, call: ProviderCall) -> AsyncGenerator[Event, None]:
    """The provider's event stream, as the async generator it is (so it can be aclose'd)."""
    stream = provider.stream(call)
    assert isinstance(stream, AsyncGenerator)
    return stream


async def first_event(stream: AsyncIterator[Event]) -> Event:
    """The next event, as a coroutine (for create_task)."""
    return await anext(stream)


async def collect(events: AsyncIterator[Event]) -> tuple[str, list[TextDelta], Usage, Finish]:
    """Text, deltas, usage and finish of a stream, checking its shape (deltas, Usage, Finish)."""
    items = [event async for event in events]
    deltas = [e for e in items if isinstance(e, TextDelta)]
    usage, finish = items[-2], items[-1]
    assert isinstance(usage, Usage)
    assert isinstance(finish, Finish)
    assert len(deltas) == len(items) - 2
    return "".join(d.text for d in deltas), deltas, usage, finish


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the event loop until ``predicate`` holds (condition-based, not timed)."""
    async with asyncio.timeout(30):
        while not predicate():  # noqa: ASYNC110 - a provider counter, no event to wait on
            await asyncio.sleep(0)


@pytest.fixture(scope="module")
def reference() -> Iterator[Any]:
    """llama-cpp-python's own completion API on the same model, as an independent oracle."""
    llm = llama_cpp.Llama(model_path=str(MODEL), n_ctx=2048, verbose=False)
    yield llm
    llm.close()


@pytest.fixture
async def provider() -> AsyncIterator[LocalProvider]:
    local = LocalProvider("local")
    yield local
    await local.aclose()


def reference_completion(reference: Any, content: str, max_tokens: int) -> tuple[int, Any]:
    """Prompt length and greedy create_completion result for SmolLM2's ChatML prompt."""
    prompt = (
        f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    )
    tokens = reference.tokenize(prompt.encode(), add_bos=False, special=True)
    reference.reset()  # evaluate the whole prompt, as the provider does (no KV prefix reuse)
    result = reference.create_completion(
        tokens, max_tokens=max_tokens, temperature=0, repeat_penalty=1.0
    )
    return len(tokens), result


@pytest.mark.asyncio
@pytest.mark.parametrize("content", [HAIKU, "Write three emoji about the sea."])
async def test_stream_matches_reference(
    provider: LocalProvider, reference: Any, content: str
) -> None:
    """Greedy output, prompt/completion token counts and finish match llama.cpp's own API."""
    text, deltas, usage, finish = await collect(
        provider.stream(make_call(content, temperature=0, max_tokens=60))
    )
    prompt_len, ref = reference_completion(reference, content, 60)
    assert deltas and all(d.text for d in deltas)
    assert "\ufffd" not in text  # multi-byte characters split across tokens are reassembled
    assert text == ref["choices"][0]["text"]
    assert usage.prompt_tokens == prompt_len == ref["usage"]["prompt_tokens"]
    assert usage.completion_tokens == ref["usage"]["completion_tokens"]
    assert finish.reason == ref["choices"][0]["finish_reason"]
    assert finish.reason in ("stop", "length")
    assert provider.load_seconds is not None


@pytest.mark.asyncio
async def test_max_tokens_is_exact(provider: LocalProvider) -> None:
    """max_tokens=5 yields exactly 5 completion tokens and finish 'length'."""
    text, _, usage, finish = await collect(provider.stream(make_call(STORY, max_tokens=5)))
    assert text
    assert usage.completion_tokens == 5
    assert provider.tokens_generated == 5
    assert finish.reason == "length"


@pytest.mark.asyncio
@pytest.mark.parametrize("temperature", [0, 1.0])
async def test_same_seed_same_text(provider: LocalProvider, temperature: float) -> None:
    """The same seed and temperature give the same text twice."""
    call = make_call(STORY, temperature=temperature, seed=1234, max_tokens=40)
    first, _, _, _ = await collect(provider.stream(call))
    second, _, _, _ = await collect(provider.stream(call))
    assert first and first == second


@pytest.mark.asyncio
async def test_stop_sequence_is_cut_and_never_emitted(provider: LocalProvider) -> None:
    """A stop sequence spanning two tokens ends the text just before it, with finish 'stop'."""
    full, pieces, full_usage, _ = await collect(
        provider.stream(make_call(STORY, temperature=0, max_tokens=60))
    )
    i = next(i for i in range(len(pieces) // 2, len(pieces) - 1) if len(pieces[i].text) >= 3)
    stop = pieces[i].text[-2:] + pieces[i + 1].text[:2]  # straddles a token boundary
    text, _, usage, finish = await collect(
        provider.stream(make_call(STORY, temperature=0, max_tokens=60, stop=["zzqx", stop]))
    )
    assert text == full[: full.find(stop)]
    assert stop not in text
    assert finish.reason == "stop"
    assert usage.completion_tokens < full_usage.completion_tokens


@pytest.mark.asyncio
async def test_queue_bound_rate_limits() -> None:
    """With max_queue=1, a third concurrent request gets RateLimited; the waiter runs later."""
    local = LocalProvider("local", max_queue=1)
    try:
        running = open_stream(local, make_call(STORY, temperature=0, max_tokens=200))
        assert isinstance(await anext(running), TextDelta)
        waiter = local.stream(make_call(HAIKU, max_tokens=3))
        waiter_first = asyncio.create_task(first_event(waiter))
        await until(lambda: local.waiting == 1)
        with pytest.raises(RateLimited) as refused:
            await anext(local.stream(make_call(HAIKU, max_tokens=3)))
        assert refused.value.retry_after_s >= 1
        await running.aclose()
        first = await waiter_first
        _, _, usage, finish = await collect(waiter)
        assert isinstance(first, TextDelta)
        assert (usage.completion_tokens, finish.reason) == (3, "length")
    finally:
        await local.aclose()


@pytest.mark.asyncio
async def test_cancelled_waiter_leaves_queue() -> None:
    """Cancelling a waiting request frees its queue place at once."""
    local = LocalProvider("local", max_queue=1)
    try:
        running = open_stream(local, make_call(STORY, temperature=0, max_tokens=200))
        assert isinstance(await anext(running), TextDelta)
        waiter = asyncio.create_task(first_event(local.stream(make_call(HAIKU, max_tokens=3))))
        await until(lambda: local.waiting == 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert local.waiting == 0
        await running.aclose()
        _, _, usage, _ = await collect(local.stream(make_call(HAIKU, max_tokens=2)))
        assert usage.completion_tokens == 2
    finally:
        await local.aclose()


@pytest.mark.asyncio
async def test_cancel_running_stops_worker(provider: LocalProvider) -> None:
    """Closing a running stream stops its worker within a token and the next request runs."""
    running = open_stream(provider, make_call(STORY, temperature=0, max_tokens=1000))
    assert isinstance(await anext(running), TextDelta)
    await running.aclose()
    at_close = provider.tokens_generated
    async with asyncio.timeout(30):
        _, _, usage, finish = await collect(provider.stream(make_call(HAIKU, max_tokens=5)))
    assert (usage.completion_tokens, finish.reason) == (5, "length")
    # The next request only starts once the cancelled worker has returned, so this is final.
    assert provider.tokens_generated - 5 <= at_close + 1


@pytest.mark.asyncio
async def test_missing_model_file_is_unavailable(tmp_path: Path) -> None:
    """A model_path that does not exist raises ProviderUnavailable on first use."""
    local = LocalProvider("local", model_path=str(tmp_path / "missing.gguf"))
    try:
        with pytest.raises(ProviderUnavailable, match=r"missing\.gguf"):
            await anext(local.stream(make_call(HAIKU)))
    finally:
        await local.aclose()


@pytest.mark.asyncio
# llama-cpp-python 0.3.16's LlamaModel.__del__ reads an attribute a failed load never set.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_invalid_model_file_is_unavailable(tmp_path: Path) -> None:
    """A file that is not a GGUF model raises ProviderUnavailable, not a llama.cpp error."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    local = LocalProvider("local", model_path=str(bad))
    try:
        with pytest.raises(ProviderUnavailable, match="could not load"):
            await anext(local.stream(make_call(HAIKU)))
    finally:
        await local.aclose()


@pytest.mark.asyncio
async def test_prompt_longer_than_context_is_refused() -> None:
    """A prompt that does not fit in n_ctx is an InvalidRequest on 'messages'."""
    local = LocalProvider("local", n_ctx=64)
    try:
        with pytest.raises(InvalidRequest) as refused:
            await anext(local.stream(make_call(STORY * 20)))
        assert refused.value.param == "messages"
    finally:
        await local.aclose()
