"""Query and path parameters shared by the routes: pages, cursors, UIDs, times.

Lists are paged by keyset (see :mod:`pacsai.operations._paging`); the cursor is opaque to
clients.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Path, Query

from pacsai.api.problems import ApiProblem
from pacsai.operations._paging import MAX_ID

__all__ = [
    "MAX_ID",
    "CursorParam",
    "JobIdPath",
    "LimitParam",
    "StudyUidPath",
    "StudyUidQuery",
    "page_limit",
    "to_utc",
]

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
_TEXT = r"^[^\x00-\x1f\x7f]*$"  # no control characters (PostgreSQL refuses NUL in text)

StudyUidPath = Annotated[
    str, Path(max_length=64, pattern=UID_PATTERN, description="A Study Instance UID")
]
StudyUidQuery = Annotated[
    str | None, Query(max_length=64, pattern=UID_PATTERN, description="A Study Instance UID")
]
JobIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="A job id")]
LimitParam = Annotated[
    int | None, Query(ge=1, le=1000, description="Items per page (default: api.page_size)")
]
CursorParam = Annotated[
    str | None,
    Query(max_length=64, pattern=_TEXT, description="`next_cursor` of the previous page"),
]


def text_query(max_length: int, description: str) -> object:
    """A plain-text query parameter of at most ``max_length`` characters, no controls."""
    return Query(min_length=1, max_length=max_length, pattern=_TEXT, description=description)


def page_limit(limit: int | None, default: int) -> int:
    """The page size asked for, or the configured default."""
    return default if limit is None else limit


def to_utc(value: datetime | None, name: str) -> datetime | None:
    """``value`` as an aware UTC datetime (naive values are taken as UTC).

    Raises
    ------
    ApiProblem
        422 if the time cannot be expressed in UTC (beyond year 1 or 9999).
    """
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ApiProblem(422, "validation", f"{name} is out of range once in UTC") from None
