"""Logging: one setup for our loggers and uvicorn's, request ids, and the access log.

- ``setup_logging`` installs one handler on the root logger: plain text lines by default, one
  JSON object per line with ``--log-format json`` (keys ``ts``, ``level``, ``logger``,
  ``message``, ``request_id``, ``model``, then any ``extra=`` fields). Uvicorn's loggers lose
  their own handlers and propagate to it, so every line of the process has one format.
- ``AccessLogMiddleware`` gives each request a ``RequestContext`` (its id comes from
  ``x-request-id`` or DB-GPT's ``db-gpt-trace-span-id`` header, else it is generated) held in a
  context variable, so any log line written while serving carries it; routes name the model
  with ``set_model``. When the response ends it writes one access line (method, path, status,
  duration, request id, model), except for the probe paths, which would drown everything else.
  A worker API request also says its outcome (``adapter/tracking.py``) and, when it failed
  in-band (HTTP 200 with an error frame), the error code:
  ``POST /api/worker/generate_stream 200 4.3ms outcome=error error_code=50005``.
- Request bodies are never logged at info level: they hold users' prompts.
- In the text format every control character of a line's message, tags and fields is escaped
  (``escape_controls``): a client value such as a model name with ``\n2026-… ERROR …`` in it
  cannot forge a log line. The JSON format escapes them by construction.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from random import getrandbits
from typing import Any, Final, TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROBE_PATHS: Final = frozenset({"/livez", "/readyz", "/metrics"})
REQUEST_ID_HEADERS: Final = (b"x-request-id", b"db-gpt-trace-span-id")
_UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
# httpx logs every request at info: a status poll every few seconds would drown the log.
_CHATTY_LOGGERS: Final = ("httpx", "httpcore")
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_KEYS: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

access_log = logging.getLogger("fastchat_adapter.access")


@dataclass
class RequestContext:
    """Mutable on purpose: a route sets ``model`` inside the request's own task (or a task
    copied from it), and the access-log middleware must see the change afterwards."""

    request_id: str
    model: str | None = None
    outcome: str | None = None  # set by the worker API's Tracker when the request is done
    error_code: int | None = None  # of an error output sent in-band, if any


_current: ContextVar[RequestContext | None] = ContextVar("fastchat_adapter_request", default=None)


def current_request() -> RequestContext | None:
    return _current.get()


def set_model(model: str | None) -> None:
    """Name the model the current request is for (shown in its log lines and access line)."""
    context = _current.get()
    if context is not None and model:
        context.model = model


class _ContextFilter(logging.Filter):
    """Stamps every record with the current request id and model (or None)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current.get()
        if not hasattr(record, "request_id"):
            record.request_id = context.request_id if context else None
        if not hasattr(record, "model"):
            record.model = context.model if context else None
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    # color_message: uvicorn's ANSI-coloured twin of the message.
    skip = _RECORD_KEYS | {"request_id", "model", "context", "fields", "color_message"}
    return {k: v for k, v in record.__dict__.items() if k not in skip and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "model": getattr(record, "model", None),
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: anything a terminal or
# a log shipper could take for the end of a line or an escape sequence.
_CONTROLS: Final = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as a ``\\xNN`` or ``\\uNNNN`` escape."""
    return text.translate(_CONTROLS)


class TextFormatter(logging.Formatter):
    """``2025-01-01 12:00:00,000 INFO fastchat_adapter.pool [rid model] message k=v``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s %(message)s%(fields)s")

    def format(self, record: logging.LogRecord) -> str:
        tags = [
            t for t in (getattr(record, "request_id", None), getattr(record, "model", None)) if t
        ]
        record.context = escape_controls(f" [{' '.join(tags)}]" if tags else "")
        # The access line already says everything its extras say; other extras are appended.
        extras = {} if getattr(record, "_in_message", False) else _extras(record)
        record.fields = escape_controls("".join(f" {k}={v}" for k, v in extras.items()))
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The message is escaped here, not in format(): a traceback appended after keeps its
        # own lines.
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so a second ``setup_logging`` replaces it and leaves other handlers alone."""


def setup_logging(
    log_format: str = "text", level: str = "info", stream: TextIO | None = None
) -> None:
    """Install our one handler; safe to call again (it replaces the previous one)."""
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    for name in _CHATTY_LOGGERS:
        quiet = root.level > logging.DEBUG
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)


def _request_id(scope: Scope) -> str:
    headers = dict(scope.get("headers") or ())
    for name in REQUEST_ID_HEADERS:
        value = headers.get(name)
        if value:
            return str(value.decode("latin-1"))[:128]
    # 128 random bits as 32 hex digits, like uuid4().hex, for a seventh of its cost: an id
    # needs to be unique, not unguessable.
    return f"{getrandbits(128):032x}"


class AccessLogMiddleware:
    """Outermost ASGI layer: request context, ``x-request-id`` echo, one access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = RequestContext(_request_id(scope))
        token = _current.set(context)
        status = 0
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", context.request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = status or 500  # what uvicorn answers for an unhandled error
            raise
        finally:
            path = scope.get("path", "")
            # (the line is built only when it is logged: at --log-level warning, never)
            if path not in PROBE_PATHS and access_log.isEnabledFor(logging.INFO):
                duration = time.perf_counter() - started
                said = (("outcome", context.outcome), ("error_code", context.error_code))
                access_log.info(
                    "%s %s %s %.1fms%s",
                    scope.get("method", ""),
                    path,
                    status or "-",
                    duration * 1000,
                    "".join(f" {key}={value}" for key, value in said if value),
                    extra={
                        "method": scope.get("method", ""),
                        "path": path,
                        "status": status or None,
                        "duration_ms": round(duration * 1000, 1),
                        "outcome": context.outcome,
                        "error_code": context.error_code,
                        "_in_message": True,
                    },
                )
            _current.reset(token)
