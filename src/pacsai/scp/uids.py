"""UID syntax (PS3.5 9.1): checked before a UID is used in any path or query."""

from __future__ import annotations

import re

from pacsai.errors import InvalidInstanceError

__all__ = ["validate_uid"]

# Components of digits, separated by single dots; no leading zero except the component "0".
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def validate_uid(value: object, what: str) -> str:
    """Return `value` as a UID string, or raise if it is not a valid DICOM UID.

    Trailing NUL and space padding (as written by some encoders) is removed first.

    Raises
    ------
    InvalidInstanceError
        If the UID is missing, longer than 64 characters, or not digits and dots.
    """
    if value is None:
        raise InvalidInstanceError(f"{what} is missing")
    uid = str(value).rstrip("\x00 ")
    if not uid:
        raise InvalidInstanceError(f"{what} is empty")
    if len(uid) > 64:
        raise InvalidInstanceError(f"{what} is {len(uid)} characters long; at most 64 are allowed")
    if not _UID.fullmatch(uid):
        raise InvalidInstanceError(
            f"{what} {uid[:70]!r} is not a UID (digits and dots, no leading zeros)"
        )
    return uid
