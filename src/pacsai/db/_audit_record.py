"""The immutable form of an audit row that readers, exporters and listeners pass around."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from pacsai.db.models import AuditEvent

__all__ = ["AUDIT_COLUMNS", "AuditRecord"]

#: The columns of ``audit_events``, in table order.
AUDIT_COLUMNS = tuple(AuditEvent.__table__.columns)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit row as plain, immutable data (safe to hand to other threads and processes).

    The fields are the columns of :class:`~pacsai.db.models.AuditEvent`; ``detail`` is the JSON
    text exactly as it was hashed, :attr:`details` its decoded form.
    """

    id: int
    occurred_at: datetime
    event_id: str
    event_type: str | None
    action: str
    outcome: int
    actor: str
    remote_address: str | None
    study_instance_uid: str | None
    patient_id: str | None
    model_name: str | None
    model_version: str | None
    detail: str | None
    prev_hash: str
    row_hash: str

    @classmethod
    def from_row(cls, row: Any) -> AuditRecord:
        """Build from an ORM :class:`AuditEvent` or a Core row with the same column names."""
        return cls(**{column.key: getattr(row, column.key) for column in AUDIT_COLUMNS})

    @property
    def details(self) -> dict[str, Any] | None:
        """``detail`` decoded (text that is not a JSON object comes back as ``{"text": ...}``)."""
        if self.detail is None:
            return None
        try:
            value = json.loads(self.detail)
        except ValueError:
            return {"text": self.detail}
        return value if isinstance(value, dict) else {"value": value}

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready mapping: ISO 8601 time, ``detail`` decoded, hashes included."""
        data = asdict(self)
        data["occurred_at"] = self.occurred_at.isoformat(timespec="microseconds")
        data["detail"] = self.details
        return data
