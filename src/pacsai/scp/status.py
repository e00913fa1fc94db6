"""Named DIMSE status values the receiver answers with (PS3.4 B.2.3, PS3.7 C)."""

from __future__ import annotations

import enum

__all__ = ["StoreStatus"]


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110  # PS3.7 C.4.1: retryable by the sender
    OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (storage below its minimum)
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: a required attribute is missing or wrong
    CANNOT_UNDERSTAND = 0xC000  # Error: the data set cannot be parsed
