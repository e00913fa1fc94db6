"""The logging layer: one record, one line, whatever it holds; repeats summarised."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator

import pytest

from pacsai.config import LoggingSettings
from pacsai.logs import RepeatLimiter, escape, setup_logging

FORGED = "ok\n2026-01-01 00:00:00,000 ERROR   pacsai.audit: chain verified\r\x1b[2J\u2028x"
LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +\S+: ")


@pytest.fixture(params=["text", "json"])
def captured(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, io.StringIO]]:
    """pacsai's own logging set-up, writing to a string, restored afterwards."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging(LoggingSettings(level="DEBUG", format=request.param))
    try:
        yield request.param, stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_escape_writes_controls_separators_and_bidi_overrides_as_escapes() -> None:
    assert escape("a\nb\rc\x00d\x1b[0m\u2028e\u202ef\x85") == (
        "a\\nb\\rc\\x00d\\x1b[0m\\u2028e\\u202ef\\x85"
    )
    assert escape("tab\tand accents: é, Ä, ß, 東京") == "tab\tand accents: é, Ä, ß, 東京"


def test_a_message_with_newlines_stays_one_line(captured: tuple[str, io.StringIO]) -> None:
    fmt, stream = captured
    log = logging.getLogger("pacsai.test")
    log.warning("job skipped: %s", f"series description {FORGED}")
    log.info("association from %s accepted", "EVIL\nAE")

    lines = _lines(stream)
    assert len(lines) == 2
    if fmt == "text":
        assert all(LINE_START.match(line) for line in lines), lines
        assert "\\n2026-01-01" in lines[0] and "\\x1b[2J" in lines[0] and "\\u2028" in lines[0]
    else:
        records = [json.loads(line) for line in lines]
        assert records[1]["message"] == "association from EVIL\\nAE accepted"
        assert not any(c in records[0]["message"] for c in "\n\r\x1b\u2028")


def test_a_traceback_stays_one_line(captured: tuple[str, io.StringIO]) -> None:
    fmt, stream = captured
    try:
        raise ValueError(f"bad value {FORGED}")
    except ValueError:
        logging.getLogger("pacsai.test").exception("it failed")

    [line] = _lines(stream)
    assert "Traceback (most recent call last):" in line
    if fmt == "json":
        record = json.loads(line)
        assert (
            "\n" not in record["exc_info"] and "ValueError: bad value ok\\n" in record["exc_info"]
        )


def test_extra_fields_are_escaped_too(captured: tuple[str, io.StringIO]) -> None:
    fmt, stream = captured
    logging.getLogger("pacsai.test").info("stored", extra={"calling": "A\nB", "n": 3})
    [line] = _lines(stream)
    if fmt == "json":
        record = json.loads(line)
        assert record["calling"] == "A\\nB" and record["n"] == 3


def test_a_hundred_thousand_identical_lines_are_summarised(
    captured: tuple[str, io.StringIO],
) -> None:
    _, stream = captured
    log = logging.getLogger("pynetdicom.dul")
    for _ in range(100_000):
        log.error("Unknown PDU type received '0xFF'")
    log.error("something else")
    logging.getLogger().handlers[0].close()  # the window is not over: close writes the summary

    lines = _lines(stream)
    assert 6 <= len(lines) <= 8, lines
    assert sum("Unknown PDU type" in line for line in lines) == 6  # 5 and the summary
    assert any("repeated 99995 more times" in line for line in lines), lines[-2:]


def test_the_limiter_writes_a_burst_per_window_and_then_a_summary() -> None:
    limiter = RepeatLimiter(burst=3, window=10.0)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "same %s", ("thing",), None)
    other = logging.LogRecord("x", logging.ERROR, __file__, 1, "other", None, None)

    written = [limiter.admit(record, now=100.0 + n * 0.01) for n in range(50)]
    assert written == [True] * 3 + [False] * 47
    assert limiter.admit(other, now=101.0)  # other messages are not held back
    assert limiter.summaries(now=105.0) == []  # the window is not over yet

    [summary] = limiter.summaries(now=110.5)
    assert summary.getMessage() == (
        "the previous message was repeated 47 more times in 10 s: same thing"
    )
    assert limiter.admit(record, now=111.0)  # a new window
