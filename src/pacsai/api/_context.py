"""What every route reaches through the application: settings, database, probes; and the audit
events of the API's own (authentication refusals). Reads and changes are audited by the
operations they call (:mod:`pacsai.operations`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from pacsai.config import Settings
from pacsai.db import AuditAction, AuditEventId, AuditEventType, AuditOutcome, Database
from pacsai.db import append_event as _append_event

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pacsai.inference import ModelRegistry
    from pacsai.jobs.queue import JobQueue

__all__ = [
    "ApiContext",
    "Notify",
    "QueueProbe",
    "api_context",
    "audit",
    "remote_address",
]

QueueProbe = Callable[[], tuple[bool, str]]
"""Whether the node's own worker process runs, and a sentence saying so."""

Notify = Callable[[], None]
"""Wakes the node's job and delivery workers after a retry queued something."""


@dataclass
class ApiContext:
    """The node's pieces the API reads; one per application, in ``app.state.pacsai``."""

    settings: Settings
    database: Database
    registry: ModelRegistry | None = None
    queue: JobQueue | None = None
    queue_probe: QueueProbe | None = None
    on_retry: Notify | None = None
    metrics: CollectorRegistry | None = None


def api_context(request: Request) -> ApiContext:
    """The :class:`ApiContext` of the application answering ``request``."""
    context: ApiContext = request.app.state.pacsai
    return context


def remote_address(request: Request) -> str | None:
    """The peer's address as the server saw it (a reverse proxy's, behind one)."""
    return request.client.host if request.client is not None else None


def audit(
    context: ApiContext,
    *,
    actor: str,
    remote: str | None,
    event_id: AuditEventId = AuditEventId.QUERY,
    event_type: AuditEventType | None = None,
    action: AuditAction = AuditAction.EXECUTE,
    outcome: AuditOutcome = AuditOutcome.SUCCESS,
    study_instance_uid: str | None = None,
    patient_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one audit event in its own transaction (a read is answered only once recorded)."""
    with context.database.transaction() as session:
        _append_event(
            session=session,
            event_id=event_id,
            event_type=event_type,
            action=action,
            outcome=outcome,
            actor=actor,
            remote_address=remote,
            study_instance_uid=study_instance_uid,
            patient_id=patient_id,
            detail=detail,
        )
