"""Repository functions for jobs and their results (the job table is the queue's durable truth).

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
    "JobSummary",
    "add_result",
    "claim_job",
    "finish_job",
    "job_context",
    "list_jobs",
    "requeue_interrupted",
    "retry_jobs",
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


@dataclass(frozen=True)
class JobSummary:
    """A job as people look at it: what ran, what it found, where the results went."""

    job_id: int
    study_instance_uid: str
    status: JobStatus
    reason: str | None
    created_at: datetime
    seconds: float | None
    models: tuple[str, ...]
    findings: tuple[str, ...]
    objects: tuple[str, ...]
    deliveries: tuple[str, ...]


def list_jobs(
    *, session: Session, status: JobStatus | None = None, limit: int = 50
) -> list[JobSummary]:
    """The newest jobs (optionally of one status), with results, objects and deliveries."""
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    summaries = []
    for job in session.scalars(query):
        models: list[str] = []
        findings: list[str] = []
        objects: list[str] = []
        deliveries: list[str] = []
        for result in job.results:
            models.append(f"{result.model_name} {result.model_version}")
            findings.extend(_findings(json.loads(result.summary)))
            objects.extend(obj.kind for obj in result.objects)
            deliveries.extend(
                f"{d.destination}:{d.status.value}"
                + (f" ({d.last_error[:60]})" if d.last_error and d.status != "SENT" else "")
                for d in result.deliveries
            )
        seconds = (
            (job.finished_at - job.started_at).total_seconds()
            if job.finished_at and job.started_at
            else None
        )
        summaries.append(
            JobSummary(
                job_id=job.id,
                study_instance_uid=job.study.study_instance_uid,
                status=job.status,
                reason=job.reason,
                created_at=job.created_at,
                seconds=seconds,
                models=tuple(models),
                findings=tuple(findings),
                objects=tuple(objects),
                deliveries=tuple(deliveries),
            )
        )
    return summaries


def _findings(summary: dict[str, Any]) -> list[str]:
    if "probabilities" in summary:
        return [f"{name} {p:.2f}" for name, p in summary["probabilities"].items()]
    return [
        f"{label['name']} {label['volume_ml']:.1f} ml"
        for label in summary.get("labels", [])
        if label.get("voxels")
    ]


def retry_jobs(
    *,
    session: Session,
    job_ids: list[int],
    now: datetime,
    rerun: bool = False,
    resend: bool = False,
    new_uids: bool = False,
) -> dict[int, str]:
    """What `pacsai jobs retry` does to each job; a message per job id.

    FAILED deliveries go back to PENDING. A FAILED or SKIPPED job (or any finished job with
    ``rerun``) is QUEUED again; ``resend`` sends its results even to destinations that have them,
    ``new_uids`` writes them under new UIDs.
    """
    from pacsai.db.deliveries import retry_failed_deliveries

    messages: dict[int, str] = {}
    for job_id in job_ids:
        job = session.get(Job, job_id)
        if job is None:
            messages[job_id] = "no such job"
            continue
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            messages[job_id] = f"is {job.status.value}; nothing to retry"
            continue
        deliveries = retry_failed_deliveries(session=session, now=now, job_ids=[job_id])
        if rerun or new_uids or job.status in (JobStatus.FAILED, JobStatus.SKIPPED):
            job.status = JobStatus.QUEUED
            job.reason = None
            job.resend = resend or new_uids
            job.uid_salt = f"retry-{now.isoformat()}" if new_uids else job.uid_salt
            messages[job_id] = "queued again" + (
                f", {deliveries} failed deliveries pending" if deliveries else ""
            )
        elif deliveries:
            messages[job_id] = f"{deliveries} failed deliveries pending again"
        else:
            messages[job_id] = f"is {job.status.value} with nothing failed (use --rerun)"
    session.flush()
    return messages
