"""Structured logs: one line per event, `key=value` pairs (logfmt), to stderr.

    ts=2025-01-01T12:00:00.123Z level=info logger=kvevict.manager event=manager.ready port=50051

Values with spaces, quotes or `=` are JSON-quoted. `log_event(logger, level, event, **fields)`
writes one; `configure(level)` installs the formatter on the root logger. `RateLimitedLog`
bounds the events a client can cause (refused calls), and `session_ref` names a session in a
log line without its id, which is the secret that opens the session.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable


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


def session_ref(session_id: str) -> str | None:
    """A short, stable digest of a session id for logs (None for no id): lines about one session
    can be matched, and the id cannot be recovered from it."""
    if not session_id:
        return None
    return hashlib.sha256(session_id.encode(errors="replace")).hexdigest()[:12]


class RateLimitedLog:
    """Logs at most `burst` lines of each event per `interval_s`; what it drops is counted and
    reported with the next line of that event that gets through (`suppressed=N`), so a flood
    of bad calls costs a few lines a second instead of a line each."""

    def __init__(self, logger: logging.Logger, burst: int = 20, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        self._windows: dict[str, list[float | int]] = {}  # event -> [window start, logged, dropped]
        self._lock = threading.Lock()

    def event(self, level: int, event: str, **fields: object) -> bool:
        """Logs the event unless its budget is spent; True if it was written."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        with self._lock:
            window = self._windows.setdefault(event, [now, 0, 0])
            if now - window[0] >= self.interval_s:
                window[0], window[1] = now, 0
            if window[1] >= self.burst:
                window[2] += 1
                return False
            window[1] += 1
            suppressed, window[2] = window[2], 0
        log_event(self.logger, level, event, **fields, suppressed=suppressed or None)
        return True


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
