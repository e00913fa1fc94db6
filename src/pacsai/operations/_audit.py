"""Appending the audit events of operations, each in its own transaction unless one is given."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from pacsai.db import AuditAction, AuditEventId, AuditEventType, AuditOutcome, Database
from pacsai.db import append_event as _append_event
from pacsai.operations.caller import Caller

__all__ = ["record", "record_list", "record_read"]


def record(
    caller: Caller,
    *,
    database: Database | None = None,
    session: Session | None = None,
    event_id: AuditEventId = AuditEventId.QUERY,
    event_type: AuditEventType | None = None,
    action: AuditAction = AuditAction.EXECUTE,
    outcome: AuditOutcome = AuditOutcome.SUCCESS,
    study_instance_uid: str | None = None,
    patient_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one event by ``caller``: in ``session`` if given, else in a transaction of its
    own on ``database`` (a read is answered only once it is recorded)."""
    values: dict[str, Any] = {
        "event_id": event_id,
        "event_type": event_type,
        "action": action,
        "outcome": outcome,
        "actor": caller.actor,
        "remote_address": caller.remote_address,
        "study_instance_uid": study_instance_uid,
        "patient_id": patient_id,
        "detail": caller.detail(**(detail or {})),
    }
    if session is not None:
        _append_event(session=session, **values)
        return
    assert database is not None, "record() needs a database or a session"
    with database.transaction() as own:
        _append_event(session=own, **values)


def record_read(
    database: Database,
    caller: Caller,
    *,
    study_instance_uid: str,
    patient_id: str | None,
    **detail: Any,
) -> None:
    """Audit the read of one study's data (110112 Query)."""
    record(
        caller,
        database=database,
        study_instance_uid=study_instance_uid,
        patient_id=patient_id,
        detail=detail,
    )


def record_list(
    database: Database,
    caller: Caller,
    filters: dict[str, Any],
    studies: list[tuple[str, str | None]],
) -> None:
    """Audit a list read (110112): its filters and the (study UID, patient ID) of every study
    returned. When one study was returned, the event names it and its patient."""
    uids = sorted({uid for uid, _ in studies})
    single = studies[0] if len(uids) == 1 else (None, None)
    record(
        caller,
        database=database,
        study_instance_uid=single[0],
        patient_id=single[1],
        detail={
            "filters": {k: v for k, v in filters.items() if v is not None},
            "returned": len(studies),
            "studies": uids,
        },
    )
