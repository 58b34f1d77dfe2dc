"""Logging: one JSON object per line (or a readable line on a terminal), for every logger.

tokenwire logs through the standard library's :mod:`logging`, as uvicorn, SQLAlchemy, Alembic
and aiohttp do, so one configuration formats all of them: :func:`configure_logging` (which
``tokenwire serve`` applies before anything logs) puts one handler on the root logger, on
stderr, with :class:`JSONFormatter` or :class:`TextFormatter`; uvicorn's error and access
loggers propagate to it. ``auto`` picks text when stderr is a terminal, JSON otherwise.

Structured fields travel in ``extra={"fields": {...}}``. The access log's fields are read from
uvicorn's own record (client, method, path, HTTP version, status). A line logged while a
generation pulls from its provider (its errors, the provider's) carries the ``completion_id``
from a context variable; the settlement's lines name it themselves. Every line passes
:func:`redact`, which hides anything shaped like a tokenwire API key (a client may put one in
a URL that the access log prints); keys are never logged on purpose, provider keys and
secrets never reach a logger.

What one completion logs: :func:`log_completion` (docs/operations.md, "Logs").
"""

from __future__ import annotations

import logging
import logging.config
import re
import time
from contextvars import ContextVar
from typing import Any, Literal, TextIO

import msgspec

from tokenwire.observability.records import CompletionRecord, Refusal

LogFormat = Literal["json", "text"]
LogFormatSetting = Literal["auto", "json", "text"]
COMPLETION_LOGGER = "tokenwire.completion"

completion_id_var: ContextVar[str | None] = ContextVar("tokenwire_completion_id", default=None)
"""The completion whose generation task is running (set by ``Generation._run``)."""

_KEY = re.compile(r"tw-[A-Za-z0-9_-]{16,}")
_encode = msgspec.json.Encoder().encode  # keys in insertion order: ts, level, logger first
# uvicorn's WebSocket handshake lines (logger uvicorn.error), read into fields like the access log
_WEBSOCKET_FORMATS = ('%s - "WebSocket %s" [accepted]', '%s - "WebSocket %s" 403')
_WEBSOCKET_STATUS_FORMAT = '%s - "WebSocket %s" %d'


def resolve_format(setting: LogFormatSetting, stream: TextIO) -> LogFormat:
    """``auto``: text on a terminal, JSON otherwise (a service manager, a pipe, a file)."""
    if setting != "auto":
        return setting
    isatty = getattr(stream, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


def redact(line: str) -> str:
    """``line`` with anything shaped like a tokenwire API key replaced."""
    return _KEY.sub("tw-[redacted]", line) if "tw-" in line else line


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of ``record``: its ``fields`` extra, uvicorn's access and
    WebSocket lines taken apart, and the running completion's id."""
    fields: dict[str, Any] = {}
    extra = getattr(record, "fields", None)
    if isinstance(extra, dict):
        fields.update(extra)
    args = record.args
    if isinstance(args, tuple):
        if record.name == "uvicorn.access" and len(args) == 5:
            client, method, path, http_version, status = args
            fields.update(
                event="access",
                client=client,
                method=method,
                path=path,
                http_version=http_version,
                status=status,
            )
        elif len(args) >= 2 and record.msg in (*_WEBSOCKET_FORMATS, _WEBSOCKET_STATUS_FORMAT):
            status = "accepted" if record.msg == _WEBSOCKET_FORMATS[0] else 403
            if record.msg == _WEBSOCKET_STATUS_FORMAT and len(args) == 3:
                status = args[2]
            fields.update(event="websocket", client=args[0], path=args[1], status=status)
    if "completion_id" not in fields:
        completion_id = completion_id_var.get()
        if completion_id is not None:
            fields["completion_id"] = completion_id
    return fields


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, the record's
    fields, and ``exception`` (the formatted traceback) when there is one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._second = -1  # the UTC second whose text is in _second_text
        self._second_text = ""

    def _timestamp(self, record: logging.LogRecord) -> str:
        """``2026-01-31T12:00:00.123Z`` (UTC, milliseconds; the seconds formatted once each)."""
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": self._timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record_fields(record)
        if fields.keys().isdisjoint(_STANDARD_KEYS):
            payload.update(fields)
        else:  # the standard keys win
            for name, value in fields.items():
                payload.setdefault(name, value)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return redact(_encode(payload).decode())


_STANDARD_KEYS = frozenset(("ts", "level", "logger", "message"))


class TextFormatter(logging.Formatter):
    """``12:00:00.123 INFO  tokenwire.completion  completion  model=sim status=completed …``"""

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        head = f"{clock}.{int(record.msecs):03d} {record.levelname:<7} {record.name}  "
        parts = [head + record.getMessage()]
        if record.name != "uvicorn.access":  # its message already says it all
            parts.extend(
                f"{name}={value}"
                for name, value in record_fields(record).items()
                if value is not None and name != "event"
            )
        text = "  ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return redact(text)


def logging_config(log_format: LogFormat, level: str = "INFO") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for the gateway: every logger to stderr, formatted.

    tokenwire and uvicorn log from ``level``; other libraries warnings and worse. Usable as
    the ``log_config`` of any ASGI server that takes a dict (uvicorn does).
    """
    formatter = JSONFormatter if log_format == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"tokenwire": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "tokenwire",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "tokenwire": {"level": level},
            # uvicorn's own configuration gives these handlers of their own; here they
            # propagate to the root's, so they are formatted like every other line
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": level, "handlers": [], "propagate": True},
        },
    }


def configure_logging(log_format: LogFormat, level: str = "INFO") -> None:
    """Apply :func:`logging_config` to this process; Python's warnings become log lines too.

    Records no longer note the process id, thread and process name: no formatter of ours
    shows them, and on Python 3.11 the process id is a system call per record (one log line
    per completion: about 1.3 us a record, a third of making it).
    """
    logging.config.dictConfig(logging_config(log_format, level))
    logging.captureWarnings(True)
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False


_completion_log = logging.getLogger(COMPLETION_LOGGER)
_LEVELS = {"upstream_error": logging.WARNING, "internal_error": logging.ERROR}


def completion_fields(record: CompletionRecord) -> dict[str, Any]:
    """The completion log line's fields (docs/operations.md lists them)."""
    return {
        "event": "completion",
        "completion_id": record.completion_id,
        "key_id": record.key_id,
        "model": record.model,
        "provider": record.provider,
        "transport": record.transport,
        "api": record.api,
        "status": record.outcome,
        "finish_reason": record.finish_reason,
        "error_code": record.error_code,
        "error_status": record.error_status,
        "ttft_ms": None if record.ttft_s is None else round(record.ttft_s * 1000, 1),
        "itl_ms": None if record.itl_s is None else round(record.itl_s * 1000, 2),
        "duration_ms": round(record.duration_s * 1000, 1),
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "usage_estimated": record.usage_estimated,
        "cost_micro": record.cost_micro,
        "charge_micro": record.charge_micro,
        "client": record.client,
        "upstream_attempts": len(record.attempts),
    }


def log_completion(record: CompletionRecord) -> None:
    """The one log line of a finished completion (INFO; WARNING when the upstream failed).

    The log record is made and handed to the logger's handlers directly (``makeRecord`` and
    ``handle``, both public): ``Logger.log`` would also walk the stack for the caller's file,
    line and function, which no tokenwire format prints (a third of the call's cost), and
    copy ``extra`` into the record key by key.
    """
    level = _LEVELS.get(record.outcome, logging.INFO)
    if _completion_log.isEnabledFor(level):
        line = _completion_log.makeRecord(
            COMPLETION_LOGGER, level, __file__, 0, "completion", (), None, "log_completion"
        )
        line.fields = completion_fields(record)
        _completion_log.handle(line)


def log_refusal(refusal: Refusal) -> None:
    """The log line of a request refused after its model was known."""
    if _completion_log.isEnabledFor(logging.INFO):
        fields = {
            "event": "refusal",
            "key_id": refusal.key_id,
            "model": refusal.model,
            "provider": refusal.provider,
            "transport": refusal.transport,
            "api": refusal.api,
            "status": refusal.outcome,
            "reason": refusal.reason,
            "error_code": refusal.error_code,
            "error_status": refusal.error_status,
            "client": refusal.client,
        }
        _completion_log.info("refused", extra={"fields": fields})
