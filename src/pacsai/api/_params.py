"""Query and path parameters shared by the routes: pages, cursors, UIDs, times.

Lists are paged by keyset, newest first: a page holds rows with ids below the cursor's, so rows
inserted while a client pages through a list land before its first page and never shift the
pages that follow (no duplicates, no gaps). The cursor is opaque to clients.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Path, Query

from pacsai.api.problems import ApiProblem

__all__ = [
    "MAX_ID",
    "CursorParam",
    "JobIdPath",
    "LimitParam",
    "StudyUidPath",
    "StudyUidQuery",
    "decode_cursor",
    "encode_cursor",
    "page_limit",
    "to_utc",
]

MAX_ID = 2**31 - 1  # ids are 32-bit integers on PostgreSQL
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
_CURSOR = re.compile(r"^v1:([1-9][0-9]{0,9})$")
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


def encode_cursor(last_id: int) -> str:
    """The cursor of the page after the row ``last_id``."""
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode("ascii")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The id below which the next page starts, or ``None`` for the first page.

    Raises
    ------
    ApiProblem
        422 if the cursor was not made by this API.
    """
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    match = _CURSOR.match(raw)
    if match is None or int(match.group(1)) > MAX_ID:
        raise ApiProblem(
            422, "validation", "cursor is not one this API gave out: use next_cursor as is"
        )
    return int(match.group(1))


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
