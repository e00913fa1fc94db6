"""Logging set-up: one handler on the root logger, text or JSON lines.

Log records never carry patient names, IDs or birth dates: modules log UIDs, AE titles and
counts only, and pynetdicom's own identifier logging is switched off in :mod:`pacsai.service`.

Whatever a record holds, what reaches the log is safe to read and to parse, for every logger
(pacsai's, pynetdicom's, uvicorn's):

* **One record, one line.** Control characters, line and paragraph separators and bidirectional
  overrides are written as escapes (``\\n``, ``\\x1b``, ``\\u2028``), in the message, in tracebacks
  and in every JSON field: a newline in a SeriesDescription or an AE title cannot start a forged
  line, an escape sequence cannot repaint a terminal.
* **Warnings are records.** Python warnings (pydicom's about odd data sets) go through the same
  handler, escaped and rate-limited, instead of to stderr as they are.
* **Repeats are summarised.** After ``burst`` identical lines (same logger, level and text)
  within ``window`` seconds, further ones are counted, not written, and a summary line says how
  many were left out once the window is over (600 KB of 0xFF bytes from a peer: a few lines, not
  100,000).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from pacsai.config import LoggingSettings

__all__ = ["RepeatLimiter", "SafeJsonFormatter", "SafeTextFormatter", "escape", "setup_logging"]

_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` with every character that could break or forge a log line written as an escape
    (tabs are kept)."""
    return _UNSAFE.sub(_escaped, text)


class SafeTextFormatter(logging.Formatter):
    """The standard formatter, with the whole record (traceback included) on one line."""

    def format(self, record: logging.LogRecord) -> str:
        return escape(super().format(record))


class SafeJsonFormatter(JsonFormatter):
    """JSON lines whose string fields hold no control characters, not even escaped by JSON."""

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {key: _escape_value(value) for key, value in log_data.items()}


def _escape_value(value: Any) -> Any:
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, list | tuple):
        return [_escape_value(item) for item in value]
    if isinstance(value, dict):
        return {escape(str(k)): _escape_value(v) for k, v in value.items()}
    return value


@dataclass(slots=True)
class _Seen:
    started: float
    written: int
    left_out: int
    record: logging.LogRecord


class RepeatLimiter:
    """Decides which records are written: at most `burst` identical ones per `window` seconds.

    Parameters
    ----------
    burst
        Identical records written per window before the rest are counted instead.
    window
        Seconds a window lasts, from its first record.
    max_keys
        Distinct recent messages remembered (the oldest are forgotten first).
    """

    def __init__(self, *, burst: int = 5, window: float = 10.0, max_keys: int = 10_000) -> None:
        self.burst = burst
        self.window = window
        self.max_keys = max_keys
        self._seen: dict[tuple[str, int, str], _Seen] = {}
        self._lock = threading.Lock()
        self._next_check = 0.0  # windows are looked over at most once a second

    def admit(self, record: logging.LogRecord, now: float | None = None) -> bool:
        """Whether `record` is written (it counts toward its window either way)."""
        now = time.monotonic() if now is None else now
        key = (record.name, record.levelno, record.getMessage())
        with self._lock:
            seen = self._seen.get(key)
            if seen is None or now - seen.started >= self.window:
                if len(self._seen) >= self.max_keys:
                    self._forget(now)
                self._seen[key] = _Seen(now, 1, 0, record)
                return True
            if seen.written < self.burst:
                seen.written += 1
                return True
            seen.left_out += 1
            seen.record = record
            return False

    def summaries(self, now: float | None = None, *, all_: bool = False) -> list[logging.LogRecord]:
        """Summary records of the windows that are over (all of them with `all_`)."""
        now = time.monotonic() if now is None else now
        out: list[logging.LogRecord] = []
        with self._lock:
            if not all_ and now < self._next_check:
                return out
            self._next_check = now + 1.0
            for key, seen in list(self._seen.items()):
                if not all_ and now - seen.started < self.window:
                    continue
                if seen.left_out:
                    out.append(self._summary(seen, now))
                del self._seen[key]
        return out

    def _summary(self, seen: _Seen, now: float) -> logging.LogRecord:
        last = seen.record
        message = last.getMessage()
        if len(message) > 200:
            message = message[:200] + "..."
        summary = logging.LogRecord(
            last.name,
            last.levelno,
            last.pathname,
            last.lineno,
            "the previous message was repeated %d more times in %.0f s: %s",
            (seen.left_out, max(now - seen.started, self.window), message),
            None,
        )
        summary.action = "repeated"
        return summary

    def _forget(self, now: float) -> None:
        for key, seen in list(self._seen.items()):
            if now - seen.started >= self.window and not seen.left_out:
                del self._seen[key]
        while len(self._seen) >= self.max_keys:
            del self._seen[next(iter(self._seen))]


class _LimitedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes repeated records once per window and then a summary."""

    def __init__(self, stream: Any, limiter: RepeatLimiter) -> None:
        super().__init__(stream)
        self.limiter = limiter

    def emit(self, record: logging.LogRecord) -> None:
        for summary in self.limiter.summaries():
            super().emit(summary)
        if self.limiter.admit(record):
            super().emit(record)

    def close(self) -> None:
        self.acquire()
        try:
            for summary in self.limiter.summaries(all_=True):
                super().emit(summary)
        finally:
            self.release()
        super().close()


def setup_logging(settings: LoggingSettings) -> None:
    """Configure the root logger once, at start-up."""
    handler = _LimitedStreamHandler(sys.stderr, RepeatLimiter())
    if settings.format == "json":
        handler.setFormatter(
            SafeJsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(SafeTextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.level)
    # Python warnings (pydicom's, about the data sets peers send) go through the same handler
    # instead of to stderr as two raw lines.
    logging.captureWarnings(True)
    # pynetdicom logs PDUs and DIMSE messages at INFO/DEBUG, identifiers included.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
