"""Structured logs: one line per event, `key=value` pairs (logfmt), to stderr.

    ts=2025-01-01T12:00:00.123Z level=info logger=kvevict.manager event=manager.ready port=50051

Values with spaces, quotes or `=` are JSON-quoted. `log_event(logger, level, event, **fields)`
writes one; `configure(level)` installs the formatter on the root logger.
"""

from __future__ import annotations

import json
import logging
import sys
import time


def _value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


def format_fields(**fields: object) -> str:
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items() if value is not None)


def log_event(logger: logging.Logger, level: int, event: str, **fields: object) -> None:
    """One event as one line: `event=<event> key=value ...`."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_fields(event=event, **fields))


class LogfmtFormatter(logging.Formatter):
    """Prefixes every record with ts, level and logger; tracebacks go on one JSON-quoted field."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " " + format_fields(traceback=self.formatException(record.exc_info))
        return line


def configure(level: str | int = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
