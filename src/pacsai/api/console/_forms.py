"""Checking what people type into the console's search forms (a message, never a 500)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

__all__ = ["FormError", "local_day_range", "text_field", "uid_field"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class FormError(ValueError):
    """A field holds something the console cannot search for; the message says which."""


def text_field(name: str, value: str | None, max_length: int) -> str | None:
    """``value`` stripped, or ``None`` when empty.

    Raises
    ------
    FormError
        If it is too long or holds control characters.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > max_length or _CONTROL.search(value):
        raise FormError(f"{name} must be at most {max_length} characters, without control ones")
    return value


def uid_field(name: str, value: str | None) -> str | None:
    """A DICOM UID (digits and dots, at most 64), or ``None`` when empty.

    Raises
    ------
    FormError
        If it is not a UID.
    """
    value = text_field(name, value, 64)
    if value is not None and not _UID.match(value):
        raise FormError(f"{name} must be a DICOM UID: digits and dots, at most 64 characters")
    return value


def _day(name: str, value: str | None) -> date | None:
    value = text_field(name, value, 10)
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise FormError(f"{name} must be a date like 2026-01-31") from exc


def local_day_range(first: str | None, last: str | None) -> tuple[datetime | None, datetime | None]:
    """The UTC times from the start of day ``first`` to the end of day ``last`` (both in the
    node's local time zone, both included).

    Raises
    ------
    FormError
        If a date is malformed or the range is reversed.
    """
    start_day, end_day = _day("from", first), _day("to", last)
    if start_day and end_day and end_day < start_day:
        raise FormError("the 'to' date is before the 'from' date")

    def midnight(day: date) -> datetime:
        return datetime.combine(day, time()).astimezone().astimezone(UTC)

    start = midnight(start_day) if start_day else None
    end = midnight(end_day + timedelta(days=1)) if end_day else None
    return start, end
