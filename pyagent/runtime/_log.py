"""Python `logging` routed to the host logger as one `key=value` line per record.

    logger=pyagent.runtime event=bundle.loaded bundle=hello version=1.0.0 msg="bundle loaded"

Runtime code logs through `log_event()`, which attaches an event name and fields; any other record (bundles,
libraries, asyncio) is formatted the same way without them. Values that contain spaces, quotes, `=` or control
characters are written as JSON strings, so a record is always exactly one line (tracebacks included).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def host_level(levelno: int) -> int:
    """The host logger knows 10, 20, 30 and 40: round other levels down to one of them (CRITICAL is 40)."""
    if levelno < logging.INFO:
        return logging.DEBUG
    if levelno < logging.WARNING:
        return logging.INFO
    if levelno < logging.ERROR:
        return logging.WARNING
    return logging.ERROR


def log_event(logger: logging.Logger, level: int, event: str, msg: str, /, *, exc_info: bool = False,
              **fields: Any) -> None:
    """Log `msg` with an event name (`bundle.loaded`, `call.failed`, …) and extra key=value fields."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, exc_info=exc_info, extra={"event": event, "fields": fields}, stacklevel=2)


def quote(value: object) -> str:
    """A value as it appears after `key=`: bare when safe, else a JSON string."""
    text = value if isinstance(value, str) else str(value)
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def format_record(record: logging.LogRecord) -> str:
    # No level here: the host logger stamps ts= and level= from the numeric level it is given.
    parts = [f"logger={quote(record.name)}"]
    event = getattr(record, "event", None)
    if event is not None:
        parts.append(f"event={quote(event)}")
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        parts.extend(f"{key}={quote(value)}" for key, value in fields.items())
    parts.append(f"msg={quote(record.getMessage())}")
    if record.exc_info and record.exc_info[1] is not None:
        parts.append(f"exc={quote(logging.Formatter().formatException(record.exc_info))}")
    return " ".join(parts)


class HostLogHandler(logging.Handler):
    """Hands every record to `host_log(level, line)` (`_pyagent_host.log`) at one of the host's levels."""

    def __init__(self, host_log: Callable[[int, str], object], level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._host_log = host_log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._host_log(host_level(record.levelno), format_record(record))
        except Exception:
            self.handleError(record)


class LogSetup:
    """Installs a HostLogHandler on the root logger at `level` and undoes it on `close()`."""

    def __init__(self, host_log: Callable[[int, str], object], level: str) -> None:
        self.handler = HostLogHandler(host_log)
        self.root = logging.getLogger()
        self._old_level = self.root.level
        self.root.addHandler(self.handler)
        self.root.setLevel(LEVELS[level])

    def close(self) -> None:
        self.root.removeHandler(self.handler)
        self.root.setLevel(self._old_level)
        self.handler.close()
