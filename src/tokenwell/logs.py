"""Logging for ``tokenwell serve``: text or JSON lines, the request id on every
line about a request, and the drivers' chatter kept out of the way.

A request's id lives in a context variable from the moment its ledger row is
opened (``bind_request``); every record logged in that context — by tokenwell,
by an engine, by a driver — carries it (``request_id``), so ``grep req_…``
finds all of one request. Structured fields go in ``extra={"fields": {...}}``:
the JSON format writes them as keys, the text format as ``key=value``.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tokenwell_request_id", default=None
)

# Libraries whose debug and info output is their own internals (SQL statements,
# pool recycling, every read of a socket): warnings and errors only, even when
# tokenwell itself logs at `debug`.
QUIET = (
    "aiosqlite",
    "sqlalchemy",
    "alembic",
    "asyncio",
    "httpcore",
    "httpx",
    "hpack",
    "psycopg",
    "redis",
    "urllib3",
    "multipart",
    "python_multipart",
    "aiohttp",
    "watchfiles",
    "filelock",
)

FORMATS = ("text", "json")


def bind_request(rid: str) -> None:
    """From here on, lines logged in this context are about request ``rid``."""
    request_id.set(rid)


class RequestContext(logging.Filter):
    """Stamp every record with the request id of the context it was logged in."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    """``2026-01-31 12:00:00,123 INFO tokenwell.requests [req_…] message k=v …``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        text = super().format(record)
        fields = _fields(record)
        if fields:
            head, sep, tail = text.partition("\n")  # after the message, before a traceback
            pairs = " ".join(
                f"{k}={_text(v)}"
                for k, v in fields.items()
                if not (k == "request_id" and v == rid)  # already in the brackets
            )
            text = f"{head} {pairs}{sep}{tail}"
        return text


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, the
    record's fields, and ``exc`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            line["request_id"] = rid
        for key, value in _fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def _iso(ts: float) -> str:
    millis = int(ts * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{millis:03d}Z"


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send every logger's records to stderr in ``fmt`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestContext())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))
    # uvicorn's start and stop lines, not a line per connection.
    logging.getLogger("uvicorn.error").setLevel(max(root.level, logging.INFO))
    # uvicorn configures its own loggers (and handlers) unless told not to; it
    # is told to (log_config=None), so its records come here, in this format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
