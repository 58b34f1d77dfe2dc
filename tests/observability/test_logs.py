"""Log formatting: JSON lines with fields, uvicorn's access and WebSocket lines taken apart,
the completion id from a generation's task, key redaction, and the configuration that sends
tokenwire's and uvicorn's loggers through the same handler."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tokenwire.observability.logs import (
    JSONFormatter,
    TextFormatter,
    completion_fields,
    completion_id_var,
    log_completion,
    logging_config,
    redact,
    resolve_format,
)
from tokenwire.observability.records import CompletionRecord
from tokenwire.streams.events import AttemptFailed, Routed

RecordFactory = Callable[..., CompletionRecord]  # the ``completion`` fixture (conftest.py)

KEY = "tw-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0U1v"


def make_record(
    name: str,
    msg: str,
    args: tuple[Any, ...] | None = None,
    level: int = logging.INFO,
    **extra: Any,
) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    for attribute, value in extra.items():
        setattr(record, attribute, value)
    return record


def as_json(record: logging.LogRecord) -> dict[str, Any]:
    line = JSONFormatter().format(record)
    assert "\n" not in line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_json_line_has_the_standard_fields_first_then_extras() -> None:
    """A record becomes one JSON object: ts, level, logger, message, then its fields."""
    parsed = as_json(
        make_record("tokenwire.x", "hello %s", ("world",), fields={"model": "sim", "n": 3})
    )
    assert list(parsed)[:4] == ["ts", "level", "logger", "message"]
    assert parsed["level"] == "info"
    assert parsed["logger"] == "tokenwire.x"
    assert parsed["message"] == "hello world"
    assert parsed["model"] == "sim" and parsed["n"] == 3
    assert parsed["ts"].endswith("Z") and "T" in parsed["ts"]


def test_timestamps_are_utc_milliseconds_whichever_second_came_before() -> None:
    """``ts`` is the record's own UTC time to the millisecond, also when a record of another
    second (earlier or later) was formatted just before by the same formatter."""
    formatter = JSONFormatter()
    stamps = []
    for created in (0.5, 86_400.25, 0.999, 0.001):
        record = make_record("tokenwire.x", "tick")
        record.created, record.msecs = created, (created - int(created)) * 1000
        stamps.append(json.loads(formatter.format(record))["ts"])
    assert stamps == [
        "1970-01-01T00:00:00.500Z",
        "1970-01-02T00:00:00.250Z",
        "1970-01-01T00:00:00.999Z",
        "1970-01-01T00:00:00.001Z",
    ]


def test_access_line_is_taken_apart() -> None:
    """uvicorn's access record becomes client, method, path, HTTP version and status fields."""
    record = make_record(
        "uvicorn.access",
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", "/v1/chat/completions", "1.1", 429),
    )
    parsed = as_json(record)
    assert parsed["event"] == "access"
    assert parsed["client"] == "127.0.0.1:5000"
    assert parsed["method"] == "POST"
    assert parsed["path"] == "/v1/chat/completions"
    assert parsed["http_version"] == "1.1"
    assert parsed["status"] == 429


def test_websocket_handshake_lines_are_taken_apart() -> None:
    """uvicorn's WebSocket accepted / refused lines become client, path and status fields."""
    accepted = as_json(
        make_record("uvicorn.error", '%s - "WebSocket %s" [accepted]', ("1.2.3.4:9", "/v1/ws/chat"))
    )
    refused = as_json(
        make_record("uvicorn.error", '%s - "WebSocket %s" 403', ("1.2.3.4:9", "/v1/ws/chat"))
    )
    assert accepted["event"] == "websocket" and accepted["status"] == "accepted"
    assert accepted["path"] == "/v1/ws/chat" and accepted["client"] == "1.2.3.4:9"
    assert refused["status"] == 403


def test_exception_is_one_field_of_one_line() -> None:
    """A traceback is kept in the ``exception`` field; the line stays one line."""
    try:
        raise ValueError("boom")
    except ValueError:
        record = make_record("tokenwire.x", "failed", level=logging.ERROR)
        record.exc_info = sys.exc_info()
    parsed = as_json(record)
    assert parsed["level"] == "error"
    assert "ValueError: boom" in parsed["exception"]


def test_completion_id_comes_from_the_running_generation() -> None:
    """A line logged in a task where a completion id is set carries it; elsewhere none."""

    async def in_generation_task() -> dict[str, Any]:
        completion_id_var.set("chatcmpl-task")
        return as_json(make_record("tokenwire.providers", "upstream hiccup"))

    inside = asyncio.run(in_generation_task())
    outside = as_json(make_record("tokenwire.providers", "upstream hiccup"))
    assert inside["completion_id"] == "chatcmpl-task"
    assert "completion_id" not in outside


def test_explicit_completion_id_wins_over_the_context() -> None:
    """A record that names its completion keeps that id."""

    async def other_task() -> dict[str, Any]:
        completion_id_var.set("chatcmpl-context")
        return as_json(
            make_record("tokenwire.x", "x", fields={"completion_id": "chatcmpl-explicit"})
        )

    assert asyncio.run(other_task())["completion_id"] == "chatcmpl-explicit"


def test_api_keys_are_redacted_in_both_formats() -> None:
    """Anything shaped like a tokenwire key (e.g. in a URL a client sent) never reaches a line."""
    record = make_record(
        "uvicorn.access",
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", f"/v1/models?api_key={KEY}", "1.1", 401),
    )
    for formatter in (JSONFormatter(), TextFormatter()):
        line = formatter.format(record)
        assert KEY not in line
        assert "tw-[redacted]" in line
    assert redact("prefix tw-AbC1dE… stays") == "prefix tw-AbC1dE… stays"  # listings' prefixes


def test_text_line_is_readable_and_carries_fields() -> None:
    """The terminal format: time, level, logger, message, then key=value fields."""
    record = make_record(
        "tokenwire.completion",
        "completion",
        fields={"event": "completion", "model": "sim", "ttft_ms": 12.3, "error_code": None},
    )
    line = TextFormatter().format(record)
    assert "INFO" in line and "tokenwire.completion" in line
    assert "model=sim" in line and "ttft_ms=12.3" in line
    assert "error_code" not in line and "event=" not in line  # nothing empty, no noise


def test_completion_fields_name_everything_but_the_key(completion: RecordFactory) -> None:
    """The completion line: ids, model, provider, transport, status, timings, tokens, cost,
    client and attempts; milliseconds rounded; the key only by its id."""
    record = completion(
        completion_id="chatcmpl-abc",
        key_id="key_123",
        model="sim",
        provider="sim",
        transport="ws-envelope",
        ttft_s=0.0123,
        itl_s=0.004,
        duration_s=0.25,
        prompt_tokens=7,
        completion_tokens=16,
        cost_micro=123,
        charge_micro=200,
        client="10.0.0.1",
        attempts=(AttemptFailed("a", "m", "server_error"), Routed("b", "m")),
    )
    fields = completion_fields(record)
    assert fields == {
        "event": "completion",
        "completion_id": "chatcmpl-abc",
        "key_id": "key_123",
        "model": "sim",
        "provider": "sim",
        "transport": "ws-envelope",
        "api": "chat",
        "status": "completed",
        "finish_reason": "stop",
        "error_code": None,
        "error_status": None,
        "ttft_ms": 12.3,
        "itl_ms": 4.0,
        "duration_ms": 250.0,
        "prompt_tokens": 7,
        "completion_tokens": 16,
        "usage_estimated": False,
        "cost_micro": 123,
        "charge_micro": 200,
        "client": "10.0.0.1",
        "upstream_attempts": 2,
    }


@pytest.mark.parametrize(("setting", "tty", "expected"), [
    ("auto", True, "text"),
    ("auto", False, "json"),
    ("json", True, "json"),
    ("text", False, "text"),
])  # fmt: skip
def test_auto_format_follows_the_terminal(setting: Any, tty: bool, expected: str) -> None:
    """``auto`` is text on a terminal and JSON otherwise; an explicit format always wins."""

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    assert resolve_format(setting, Stream()) == expected


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the logging configuration back after a test that replaces it."""
    loggers = ["", "tokenwire", "uvicorn", "uvicorn.error", "uvicorn.access"]
    saved = {
        name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level)
        for name in loggers
    }
    propagate = {name: logging.getLogger(name).propagate for name in loggers}
    yield
    for name, (handlers, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers = handlers
        logger.setLevel(level)
        logger.propagate = propagate[name]


def test_one_configuration_formats_tokenwire_and_uvicorn(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """After ``logging_config``, tokenwire's, uvicorn's and other libraries' lines all reach
    stderr as JSON; INFO from libraries other than tokenwire and uvicorn is dropped."""
    logging.config.dictConfig(logging_config("json"))
    logging.getLogger("tokenwire.completion").info("completion", extra={"fields": {"a": 1}})
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 1)
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/healthz", "1.1", 200
    )
    logging.getLogger("sqlalchemy.engine").info("SELECT 1")
    logging.getLogger("aiohttp.client").warning("slow")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [json.loads(line) for line in captured.err.splitlines()]
    assert [line["logger"] for line in lines] == [
        "tokenwire.completion",
        "uvicorn.error",
        "uvicorn.access",
        "aiohttp.client",
    ]
    assert lines[0]["a"] == 1 and lines[2]["status"] == 200


def test_log_completion_writes_one_line_with_every_field(
    restore_logging: None, capsys: pytest.CaptureFixture[str], completion: RecordFactory
) -> None:
    """``log_completion`` writes one JSON line per completion: the standard keys, then exactly
    the completion's fields; WARNING when the upstream failed; nothing when the level is off."""
    logging.config.dictConfig(logging_config("json"))
    done = completion(completion_id="chatcmpl-ok")
    failed = completion(
        completion_id="chatcmpl-502", outcome="upstream_error", error_code="x", error_status=502
    )
    log_completion(done)
    log_completion(failed)
    logging.getLogger("tokenwire").setLevel(logging.WARNING)
    log_completion(completion(completion_id="chatcmpl-quiet"))  # INFO is off now
    log_completion(completion(completion_id="chatcmpl-loud", outcome="upstream_error"))
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["completion_id"] for line in lines] == [
        "chatcmpl-ok",
        "chatcmpl-502",
        "chatcmpl-loud",
    ]
    assert [line["level"] for line in lines] == ["info", "warning", "warning"]
    for line, record in zip(lines, (done, failed), strict=False):
        assert list(line)[:4] == ["ts", "level", "logger", "message"]
        assert line["logger"] == "tokenwire.completion" and line["message"] == "completion"
        assert {k: v for k, v in line.items() if k not in list(line)[:4]} == completion_fields(
            record
        )
