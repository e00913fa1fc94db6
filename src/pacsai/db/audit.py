"""The append-only, hash-chained audit trail (DICOM PS3.15 A.5.3 event identifications).

Each row carries the SHA-256 of its own content plus the hash of the row before it, so that an
edited, deleted or out-of-order row is detected by :func:`verify_chain`. Appends are serialised:
on SQLite by the write lock every write transaction takes at BEGIN, on PostgreSQL by a
transaction-scoped advisory lock, so the chain stays linear with many writers.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from pacsai.db import audit_hooks
from pacsai.db.models import AuditEvent, utcnow

__all__ = [
    "GENESIS_HASH",
    "AuditAction",
    "AuditEventId",
    "AuditEventType",
    "AuditOutcome",
    "ChainReport",
    "append_event",
    "row_digest",
    "verify_chain",
]

GENESIS_HASH = "0" * 64
_CHAIN_LOCK_KEY = 0x70616373  # "pacs": the PostgreSQL advisory lock that serialises appends


class AuditEventId(enum.StrEnum):
    """DCM code values of PS3.15 A.5.3 audit message event IDs."""

    APPLICATION_ACTIVITY = "110100"
    AUDIT_LOG_USED = "110101"
    INSTANCES_ACCESSED = "110103"
    INSTANCES_TRANSFERRED = "110104"
    STUDY_DELETED = "110105"
    EXPORT = "110106"
    IMPORT = "110107"
    QUERY = "110112"
    SECURITY_ALERT = "110113"
    USER_AUTHENTICATION = "110114"


class AuditEventType(enum.StrEnum):
    """DCM code values of PS3.15 event type codes used with the IDs above."""

    APPLICATION_START = "110120"
    APPLICATION_STOP = "110121"
    LOGIN = "110122"
    LOGOUT = "110123"
    NODE_AUTHENTICATION = "110126"
    USE_OF_RESTRICTED_FUNCTION = "110132"


class AuditAction(enum.StrEnum):
    """PS3.15 EventActionCode."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class AuditOutcome(enum.IntEnum):
    """PS3.15 EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


_HASHED_FIELDS = (
    "occurred_at",
    "event_id",
    "event_type",
    "action",
    "outcome",
    "actor",
    "remote_address",
    "study_instance_uid",
    "patient_id",
    "model_name",
    "model_version",
    "detail",
)


def row_digest(event: AuditEvent) -> str:
    """The SHA-256 (hex) of a row's content and its ``prev_hash``."""
    content: dict[str, Any] = {name: getattr(event, name) for name in _HASHED_FIELDS}
    occurred: datetime = content["occurred_at"]
    content["occurred_at"] = occurred.isoformat(timespec="microseconds")
    content["prev_hash"] = event.prev_hash
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _lock_chain(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CHAIN_LOCK_KEY})
    # SQLite: the transaction already holds the database write lock (BEGIN IMMEDIATE).


def append_event(
    *,
    session: Session,
    event_id: AuditEventId,
    action: AuditAction,
    outcome: AuditOutcome,
    actor: str,
    event_type: AuditEventType | None = None,
    remote_address: str | None = None,
    study_instance_uid: str | None = None,
    patient_id: str | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    detail: dict[str, Any] | None = None,
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """Append one event to the chain within the caller's write transaction.

    The row is linked to the chain when the transaction commits; if it rolls back, nothing was
    appended. ``detail`` must be JSON-serialisable and never hold patient names or birth dates.
    After the commit the row is handed to the listeners of :mod:`pacsai.db.audit_hooks`.
    """
    _lock_chain(session)
    previous = session.execute(
        select(AuditEvent.row_hash).order_by(AuditEvent.id.desc()).limit(1)
    ).scalar_one_or_none()
    event = AuditEvent(
        occurred_at=occurred_at or utcnow(),
        event_id=str(event_id),
        event_type=None if event_type is None else str(event_type),
        action=str(action),
        outcome=int(outcome),
        actor=actor[:128],
        remote_address=remote_address,
        study_instance_uid=study_instance_uid,
        patient_id=patient_id,
        model_name=model_name,
        model_version=model_version,
        detail=None if detail is None else json.dumps(detail, sort_keys=True, default=str),
        prev_hash=previous or GENESIS_HASH,
    )
    event.row_hash = row_digest(event)
    session.add(event)
    session.flush()
    audit_hooks.note_appended(session, event)
    return event


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What :func:`verify_chain` found."""

    rows_checked: int
    first_bad_id: int | None
    problem: str | None

    @property
    def intact(self) -> bool:
        return self.first_bad_id is None


def verify_chain(*, session: Session, batch_size: int = 5000) -> ChainReport:
    """Walk the whole chain in id order and report the first row that breaks it."""
    result = session.execute(
        select(AuditEvent).order_by(AuditEvent.id).execution_options(yield_per=batch_size)
    )
    try:
        return _walk(result.scalars())
    finally:
        result.close()  # a server-side cursor on PostgreSQL: release it even on an early return


def _walk(rows: Any) -> ChainReport:
    expected_prev = GENESIS_HASH
    previous_id: int | None = None
    checked = 0
    for event in rows:
        if event.prev_hash != expected_prev:
            return ChainReport(
                checked,
                event.id,
                f"audit row {event.id} does not follow "
                + ("the start of the chain" if previous_id is None else f"row {previous_id}")
                + ": a row between them was deleted, a row was inserted out of order, "
                "or the earlier row was rewritten",
            )
        if row_digest(event) != event.row_hash:
            return ChainReport(checked, event.id, f"audit row {event.id} was edited")
        expected_prev = event.row_hash
        previous_id = event.id
        checked += 1
    return ChainReport(checked, None, None)
