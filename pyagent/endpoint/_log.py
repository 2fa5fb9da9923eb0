"""Structured logging: one line per event, `key=value` pairs, written through the stdlib `logging` module.

Events are logged with `log_event(logger, level, "session.started", agent="...", peer="...")`; the message of such a
record is already the `event=... key=value` text, and `KeyValueFormatter` adds the time and the level in front.
Records from other libraries (uvicorn, asyncio) are formatted as `event=log logger=NAME msg="..."`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@[]+,")
_KV_ATTR = "pyagent_kv"


def format_value(value: Any) -> str:
    """One value in key=value style: bare when it is safe to read back, JSON-quoted otherwise."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = value if isinstance(value, str) else str(value)
    if text and all(c in _PLAIN for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def format_fields(event: str, fields: dict[str, Any]) -> str:
    parts = [f"event={event}"]
    parts.extend(f"{key}={format_value(value)}" for key, value in fields.items())
    return " ".join(parts)


def log_event(logger: logging.Logger, level: int, event: str, /, **fields: Any) -> None:
    """Log one event; formats nothing unless the level is enabled (cheap on hot paths at debug level)."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_fields(event, fields), extra={_KV_ATTR: True})


def log_exception(logger: logging.Logger, event: str, /, **fields: Any) -> None:
    """Log an event at error level with the current exception's traceback (quoted onto the same line)."""
    logger.error("%s", format_fields(event, fields), exc_info=True, extra={_KV_ATTR: True})


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=warning event=frame.refused peer=127.0.0.1:5555 code=-32700 reason="..."`."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        head = f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()}"
        if getattr(record, _KV_ATTR, False):
            body = record.getMessage()
        else:
            body = f"event=log logger={format_value(record.name)} msg={format_value(record.getMessage())}"
        if record.exc_info:
            body += " exc=" + format_value(self.formatException(record.exc_info))
        return f"{head} {body}"


def configure_logging(level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Send every log record to stderr (or `stream`) as key=value lines; returns the installed handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn announces every start and stop at info; the endpoint logs its own events.
    logging.getLogger("uvicorn").setLevel(max(level, logging.WARNING))
    return handler
