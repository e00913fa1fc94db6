"""UIDs of results that a re-run can derive again (PS3.5 B.2, UUID-derived UIDs under 2.25)."""

from __future__ import annotations

import json
import uuid

from pydicom.uid import UID

__all__ = ["result_uid"]

# Name-based UUIDs (ITU-T X.667 / RFC 9562 version 5) need a namespace; this one is pacsai's.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacsai:result-uid")


def result_uid(*parts: str) -> UID:
    """A UID that depends on ``parts`` only: the same parts always give the same UID.

    A job derives the Series and SOP Instance UIDs of its SEG and SR from what identifies the
    result (study, series, model and its weights, object kind), so that running the same job
    again writes the same instances instead of new ones the PACS would keep beside the old.

    ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` does not do this: without a
    prefix it ignores ``entropy_srcs`` and returns a random UUID. This function makes a
    name-based (version 5) UUID of the parts and writes it as ``2.25.<decimal>`` (PS3.5 B.2),
    at most 44 characters.

    Parameters
    ----------
    *parts : str
        At least one non-empty string. ``("a", "bc")`` and ``("ab", "c")`` give different UIDs.

    Returns
    -------
    pydicom.uid.UID

    Raises
    ------
    ValueError
        If no part is given or a part is empty.
    TypeError
        If a part is not a string.
    """
    if not parts:
        raise ValueError("result_uid needs at least one part")
    for index, part in enumerate(parts):
        if not isinstance(part, str):
            raise TypeError(f"result_uid part {index} must be a str, not {type(part).__name__}")
        if not part:
            raise ValueError(f"result_uid part {index} is empty")
    name = json.dumps(list(parts), ensure_ascii=False, separators=(",", ":"))
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")
