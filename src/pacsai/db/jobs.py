"""Repository functions for jobs and their results (the job table is the queue's durable truth).

Listing jobs for people and the retry rules are operations (:mod:`pacsai.operations.jobs`).

Claiming is a guarded update (``... WHERE status = 'QUEUED'``), so several workers, threads or
processes never run the same job twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacsai.db.models import Instance, Job, JobStatus, Result, ResultKind, Study

__all__ = [
    "JobContext",
    "add_result",
    "claim_job",
    "finish_job",
    "job_context",
    "requeue_interrupted",
]


def claim_job(*, session: Session, now: datetime) -> int | None:
    """Move the oldest QUEUED job to RUNNING; its id, or ``None`` if none."""
    query = select(Job.id).where(Job.status == JobStatus.QUEUED)
    for (candidate,) in session.execute(query.order_by(Job.created_at, Job.id).limit(5)).all():
        result = session.execute(
            update(Job)
            .where(Job.id == candidate, Job.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                started_at=now,
                finished_at=None,
                reason=None,
                attempts=Job.attempts + 1,
            )
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return int(candidate)
    return None


def requeue_interrupted(*, session: Session, now: datetime, max_attempts: int) -> tuple[int, int]:
    """Put RUNNING jobs left by a stopped node back in the queue (at start-up, local backend).

    A job that was already started ``max_attempts`` times is FAILED instead, so a study that
    crashes the node cannot loop forever. Returns (requeued, failed).
    """
    running = session.execute(
        select(Job.id, Job.attempts).where(Job.status == JobStatus.RUNNING)
    ).all()
    requeued = failed = 0
    for job_id, attempts in running:
        if attempts >= max_attempts:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    status=JobStatus.FAILED,
                    finished_at=now,
                    reason=f"interrupted {attempts} times (node stopped while it ran); "
                    "retry it once the cause is fixed",
                )
            )
            failed += 1
        else:
            session.execute(
                update(Job).where(Job.id == job_id).values(status=JobStatus.QUEUED, started_at=None)
            )
            requeued += 1
    return requeued, failed


def finish_job(
    *,
    session: Session,
    job_id: int,
    status: JobStatus,
    now: datetime,
    reason: str | None = None,
    timings: dict[str, float] | None = None,
) -> None:
    """Record the end of a RUNNING job."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            status=status,
            finished_at=now,
            reason=reason,
            timings=json.dumps({k: round(v, 4) for k, v in (timings or {}).items()}),
        )
    )


@dataclass(frozen=True)
class JobContext:
    """What a worker needs to know about a job's study."""

    job_id: int
    study_id: int
    study_instance_uid: str
    patient_id: str | None
    calling_ae_title: str
    paths: tuple[Path, ...]  # relative to storage.spool_dir
    resend: bool = False
    uid_salt: str = ""


def job_context(*, session: Session, job_id: int) -> JobContext:
    """The study of ``job_id`` and the spool paths of all its instances."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"job {job_id} does not exist")
    study = session.get(Study, job.study_id)
    assert study is not None
    paths = session.scalars(
        select(Instance.path).where(Instance.study_id == study.id).order_by(Instance.id)
    ).all()
    return JobContext(
        job_id=job.id,
        study_id=study.id,
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
        calling_ae_title=study.calling_ae_title,
        paths=tuple(Path(p) for p in paths),
        resend=bool(job.resend),
        uid_salt=job.uid_salt or "",
    )


def add_result(
    *,
    session: Session,
    job_id: int,
    route_name: str,
    series_instance_uid: str,
    kind: ResultKind,
    model_name: str,
    model_version: str,
    weights_sha256: str,
    output_path: str,
    summary: dict[str, Any],
    now: datetime,
) -> Result:
    """Store one model output's row."""
    result = Result(
        job_id=job_id,
        route_name=route_name,
        series_instance_uid=series_instance_uid,
        kind=kind,
        model_name=model_name,
        model_version=model_version,
        weights_sha256=weights_sha256,
        output_path=output_path,
        summary=json.dumps(summary, sort_keys=True),
        created_at=now,
    )
    session.add(result)
    session.flush()
    return result
