"""Taking work back from lost workers: the one place that turns a lost lease into a new attempt
(or a FAILED job after ``queue.max_attempts``), and audits it.

Each lost attempt is an Application Activity event (110100) with outcome 4 (QUEUED again) or 8
(FAILED), naming the job, the attempt, the worker and what happened to it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import select

from pacsai.config import Settings
from pacsai.db import (
    AuditAction,
    AuditEventId,
    AuditOutcome,
    Database,
    Job,
    JobStatus,
    Study,
    append_event,
    utcnow,
)
from pacsai.db.deliveries import release_lost_deliveries
from pacsai.db.jobs import LostJob, release_lost_jobs

__all__ = ["recover_lost_work"]

log = logging.getLogger(__name__)


def recover_lost_work(
    database: Database,
    settings: Settings,
    *,
    owners: Sequence[str] | None = None,
    why: str | None = None,
    job_id: int | None = None,
) -> list[LostJob]:
    """Release RUNNING jobs of lost workers (expired leases, or every lease of ``owners``).

    With ``owners`` (workers known to be gone), their delivery leases are ended too, so that
    what they were sending is due at once. Returns the jobs taken back; those QUEUED again still
    have to reach a worker (the caller's queue submits them).
    """
    now = utcnow()
    with database.transaction() as session:
        lost = release_lost_jobs(
            session=session,
            now=now,
            max_attempts=settings.queue.max_attempts,
            owners=owners,
            why=why,
            job_id=job_id,
        )
        deliveries = release_lost_deliveries(session=session, owners=owners) if owners else 0
        studies = dict(
            session.execute(
                select(Job.id, Study)
                .join(Study, Study.id == Job.study_id)
                .where(Job.id.in_([job.job_id for job in lost]))
            ).all()
        )
        for job in lost:
            study = studies[job.job_id]
            append_event(
                session=session,
                event_id=AuditEventId.APPLICATION_ACTIVITY,
                action=AuditAction.EXECUTE,
                outcome=(
                    AuditOutcome.SERIOUS_FAILURE
                    if job.status is JobStatus.FAILED
                    else AuditOutcome.MINOR_FAILURE
                ),
                actor=settings.node.ae_title,
                study_instance_uid=study.study_instance_uid,
                patient_id=study.patient_id,
                detail={
                    "activity": "job attempt lost",
                    "job_id": job.job_id,
                    "attempt": job.attempts,
                    "worker": job.owner,
                    "status": job.status.value,
                    "reason": job.reason,
                },
            )
    for job in lost:
        log.warning(
            "job %d: attempt %d on %s was lost (%s); %s",
            job.job_id,
            job.attempts,
            job.owner or "an unknown worker",
            job.reason,
            "queued again" if job.status is JobStatus.QUEUED else "FAILED",
            extra={"action": "job_lost", "job_id": job.job_id, "status": job.status.value},
        )
    if deliveries:
        log.warning(
            "%d deliveries of a stopped worker are due again (each checks what already arrived)",
            deliveries,
        )
    return lost
