"""``tokenwire chat``: talk to a gateway from the terminal, through the Python SDK.

With a prompt it streams one answer and exits; without one it opens an interactive session
that keeps the conversation, with line editing and history (the arrow keys) from the
standard library's ``readline``. Ctrl-C during an answer stops it, and the SDK cancels it
upstream (it is billed for what was generated), then the prompt comes back; Ctrl-C at the
prompt clears the line; Ctrl-D (or ``/exit``) ends the session. A footer on stderr gives the
time to first token, tokens per second, tokens and the cost the gateway charged.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, TextIO

import typer

from tokenwire_client import Client, CompletionUsage, TokenwireError

HISTORY_LINES = 1000
COMMANDS = "/exit (or Ctrl-D) ends the session, /reset forgets the conversation"


class TransportName(enum.StrEnum):
    sse = "sse"
    ws = "ws"


@dataclass
class Answer:
    """One streamed answer: its text, how it went, and the figures for the footer."""

    text: str = ""
    cancelled: bool = False
    ttft_s: float | None = None
    duration_s: float = 0.0
    usage: CompletionUsage | None = None
    chunks: int = 0


def history_file() -> Path:
    """Where the interactive session keeps its input history (XDG state dir)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tokenwire" / "chat_history"


@contextlib.contextmanager
def line_history() -> Iterator[None]:
    """Arrow keys and a persistent history for ``input()`` (GNU readline or libedit)."""
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input() still works
        yield
        return
    path = history_file()
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(HISTORY_LINES)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)


def stream_answer(
    client: Client,
    model: str,
    messages: list[dict[str, Any]],
    *,
    as_json: bool,
    params: dict[str, Any],
    out: TextIO,
) -> Answer:
    """Stream one answer to ``out``; Ctrl-C stops it (cancelled upstream) and returns."""
    answer = Answer()
    started = time.perf_counter()
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": as_json},
            **params,
        )
        with stream:
            try:
                for chunk in stream:
                    answer.chunks += 1
                    text = chunk.text
                    if text and answer.ttft_s is None:
                        answer.ttft_s = time.perf_counter() - started
                    answer.text += text
                    if as_json:
                        out.write(json.dumps(chunk.to_dict()) + "\n")
                    elif text:
                        out.write(text)
                    out.flush()
            except KeyboardInterrupt:
                answer.cancelled = True  # leaving the ``with`` cancels the stream upstream
        answer.usage = stream.usage
    except KeyboardInterrupt:
        answer.cancelled = True  # before the first token: create() cancelled it
    answer.duration_s = time.perf_counter() - started
    if not as_json and answer.text and not answer.text.endswith("\n"):
        out.write("\n")
    return answer


def footer(answer: Answer) -> str:
    """``TTFT 85 ms · 41.2 tokens/s · 12 → 40 tokens · $0.000636`` (+ ``cancelled``)."""
    parts: list[str] = []
    if answer.cancelled:
        parts.append("cancelled")
    if answer.ttft_s is not None:
        parts.append(f"TTFT {answer.ttft_s * 1000:.0f} ms")
    usage = answer.usage
    if usage is not None:
        if answer.ttft_s is not None and answer.duration_s > answer.ttft_s:
            rate = usage.completion_tokens / (answer.duration_s - answer.ttft_s)
            parts.append(f"{rate:.1f} tokens/s")
        parts.append(f"{usage.prompt_tokens} → {usage.completion_tokens} tokens")
        if usage.cost_usd is not None:
            parts.append(f"${usage.cost_usd:.6f}")
    return " · ".join(parts)


def chat(
    prompt: Annotated[
        Optional[str],  # noqa: UP045 - typer needs Optional at runtime
        typer.Argument(help="Ask this and exit; without it, an interactive session."),
    ] = None,
    model: Annotated[
        str, typer.Option("--model", "-m", envvar="TOKENWIRE_MODEL", help="The model to ask.")
    ] = "sim",
    transport: Annotated[
        TransportName, typer.Option(help="Stream over SSE or one WebSocket.")
    ] = TransportName.sse,
    system: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="A system message that starts the conversation."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each chunk as a JSON line (usage last).")
    ] = False,
    max_tokens: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="The longest answer, in tokens."),
    ] = None,
    base_url: Annotated[
        str, typer.Option(envvar="TOKENWIRE_BASE_URL", help="The gateway.")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="TOKENWIRE_API_KEY", help="An API key (tw-...).", show_default=False),
    ] = None,
) -> None:
    """Chat with a model through the gateway (streamed; Ctrl-C stops an answer)."""
    if not api_key:
        typer.echo("error: an API key is needed: --api-key or TOKENWIRE_API_KEY", err=True)
        raise typer.Exit(1)
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    params: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
    # Ctrl-C stops an answer: Python only turns SIGINT into KeyboardInterrupt when it started
    # with SIGINT at its default, and a shell without job control (CI, `cmd &`) starts
    # children with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with Client(base_url, api_key, transport=transport.value) as client:
        if prompt is not None:
            answer = _turn(client, model, messages, prompt, as_json, params)
            raise typer.Exit(130 if answer is None or answer.cancelled else 0)
        _session(client, model, messages, as_json, params)


def _turn(
    client: Client,
    model: str,
    messages: list[dict[str, Any]],
    prompt: str,
    as_json: bool,
    params: dict[str, Any],
) -> Answer | None:
    """Ask ``prompt``; the answer (kept in ``messages``), or None after an error (shown)."""
    messages.append({"role": "user", "content": prompt})
    try:
        answer = stream_answer(
            client, model, messages, as_json=as_json, params=params, out=sys.stdout
        )
    except TokenwireError as exc:
        messages.pop()
        typer.echo(f"error: {exc}", err=True)
        return None
    if answer.text or not answer.cancelled:
        messages.append({"role": "assistant", "content": answer.text})
    else:
        messages.pop()  # nothing was said: ask again rather than keep a question unanswered
    typer.secho(footer(answer), err=True, dim=True)
    return answer


def _session(
    client: Client,
    model: str,
    messages: list[dict[str, Any]],
    as_json: bool,
    params: dict[str, Any],
) -> None:
    """The interactive loop: one prompt, one streamed answer, until Ctrl-D or /exit."""
    opening = list(messages)
    typer.secho(f"{model} via {client.base_url} ({client.transport}); {COMMANDS}", dim=True)
    with line_history():
        while True:
            try:
                line = input("> ")
            except KeyboardInterrupt:
                sys.stdout.write("\n")
                continue
            except EOFError:
                sys.stdout.write("\n")
                return
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                messages[:] = opening
                typer.secho("(conversation forgotten)", dim=True)
                continue
            _turn(client, model, messages, text, as_json, params)
