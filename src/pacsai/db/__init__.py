"""The database: models, engine, migrations, the audit chain and repository functions."""

from __future__ import annotations

from pacsai.db.audit import (
    AuditAction,
    AuditEventId,
    AuditEventType,
    AuditOutcome,
    ChainReport,
    append_event,
    verify_chain,
)
from pacsai.db.engine import Database
from pacsai.db.migrate import current_revision, head_revision, upgrade
from pacsai.db.models import (
    ApiToken,
    Association,
    AssociationOutcome,
    AuditEvent,
    Base,
    ConsoleSession,
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    Result,
    ResultKind,
    ResultObject,
    Series,
    Study,
    StudyStatus,
    TokenRole,
    utcnow,
)

__all__ = [
    "ApiToken",
    "Association",
    "AssociationOutcome",
    "AuditAction",
    "AuditEvent",
    "AuditEventId",
    "AuditEventType",
    "AuditOutcome",
    "Base",
    "ChainReport",
    "ConsoleSession",
    "Database",
    "Delivery",
    "DeliveryStatus",
    "Instance",
    "Job",
    "JobStatus",
    "Result",
    "ResultKind",
    "ResultObject",
    "Series",
    "Study",
    "StudyStatus",
    "TokenRole",
    "append_event",
    "current_revision",
    "head_revision",
    "upgrade",
    "utcnow",
    "verify_chain",
]
