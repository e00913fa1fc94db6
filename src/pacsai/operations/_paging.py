"""Keyset pages, newest first: a page holds rows with ids below the cursor's.

Rows inserted while a client pages through a list land before its first page and never shift the
pages that follow (no duplicates, no gaps). The cursor is opaque to clients.
"""

from __future__ import annotations

import base64
import binascii
import re

from pacsai.operations.errors import InvalidRequestError

__all__ = ["MAX_ID", "MAX_PAGE", "check_limit", "decode_cursor", "encode_cursor"]

MAX_ID = 2**31 - 1  # ids are 32-bit integers on PostgreSQL
MAX_PAGE = 1000
_CURSOR = re.compile(r"^v1:([1-9][0-9]{0,9})$")


def encode_cursor(last_id: int) -> str:
    """The cursor of the page after the row ``last_id``."""
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode("ascii")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The id below which the next page starts, or ``None`` for the first page.

    Raises
    ------
    InvalidRequestError
        If the cursor was not made by :func:`encode_cursor`.
    """
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    match = _CURSOR.match(raw)
    if match is None or int(match.group(1)) > MAX_ID:
        raise InvalidRequestError("cursor is not one this node gave out: use next_cursor as is")
    return int(match.group(1))


def check_limit(limit: int) -> int:
    """``limit`` if it is a page size this node serves (1 to 1000).

    Raises
    ------
    InvalidRequestError
        Otherwise.
    """
    if isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
        raise InvalidRequestError(f"limit must be 1 to {MAX_PAGE}, got {limit!r}")
    return limit
