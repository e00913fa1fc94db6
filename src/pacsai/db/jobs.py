"""Repository functions for jobs and their results (the job table is the queue's durable truth).

A worker claims a QUEUED job with a guarded update and holds it under a lease (``lease_owner``,
``lease_until``) that it renews while it runs the job. Its writes are fenced: each checks that
the job is still RUNNING under the same owner and attempt (:func:`hold_job`), so a worker that
was taken for lost can never record a second result. Only an expired lease, or the owner's own
node taking its leases back at start-up, makes a RUNNING job QUEUED again
(:func:`release_lost_jobs`); after ``max_attempts`` it ends FAILED with the reason instead.

Listing jobs for people and the retry rules are operations (:mod:`pacsai.operations.jobs`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from pacsai._routing_attributes import RoutingAttributes
from pacsai.db.models import Instance, Job, JobStatus, Result, ResultKind, Series, Study
from pacsai.errors import LeaseLostError

__all__ = [
    "JobContext",
    "JobLease",
    "LostJob",
    "RecordedSeries",
    "StudyInstances",
    "add_result",
    "claim_job",
    "finish_job",
    "hold_job",
    "job_context",
    "queue_job",
    "release_lost_jobs",
    "renew_job_leases",
    "study_instances",
]


@dataclass(frozen=True)
class JobLease:
    """A RUNNING job held by a worker; (job, owner, attempt) fences every write of the run."""

    job_id: int
    owner: str
    attempt: int


def claim_job(
    *,
    session: Session,
    now: datetime,
    owner: str,
    lease_seconds: float,
    queues: Sequence[str] | None = None,
    job_id: int | None = None,
) -> JobLease | None:
    """Move the oldest QUEUED job (of ``queues``, or ``job_id``) to RUNNING under a lease.

    Returns the lease, or ``None`` when no such job is QUEUED (another worker took it first).
    """
    query = select(Job.id).where(Job.status == JobStatus.QUEUED)
    if queues is not None:
        query = query.where(Job.queue.in_(list(queues)))
    if job_id is not None:
        query = query.where(Job.id == job_id)
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
                lease_owner=owner,
                lease_until=now + timedelta(seconds=lease_seconds),
            )
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            attempt = session.scalar(select(Job.attempts).where(Job.id == candidate))
            return JobLease(int(candidate), owner, int(attempt or 0))
    return None


def renew_job_leases(
    *, session: Session, owner: str, job_ids: Sequence[int], now: datetime, lease_seconds: float
) -> int:
    """Extend the leases ``owner`` holds on these RUNNING jobs; how many it still held."""
    if not job_ids:
        return 0
    result = session.execute(
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
        .values(lease_until=now + timedelta(seconds=lease_seconds))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def hold_job(*, session: Session, lease: JobLease) -> None:
    """Lock the job's row for this transaction if ``lease`` still holds it.

    Raises
    ------
    LeaseLostError
        If the job is no longer RUNNING under this owner and attempt.
    """
    row = session.execute(
        select(Job.status, Job.lease_owner, Job.attempts)
        .where(Job.id == lease.job_id)
        .with_for_update()
    ).one_or_none()
    if row is None or (row.status, row.lease_owner, row.attempts) != (
        JobStatus.RUNNING,
        lease.owner,
        lease.attempt,
    ):
        state = "gone" if row is None else f"{row.status.value}, attempt {row.attempts}"
        raise LeaseLostError(
            f"job {lease.job_id}: attempt {lease.attempt} of {lease.owner} lost its lease "
            f"(the job is now {state})"
        )


@dataclass(frozen=True)
class LostJob:
    """A RUNNING job whose worker was taken for lost, and what became of it."""

    job_id: int
    attempts: int
    owner: str | None
    status: JobStatus  # QUEUED again, or FAILED after max_attempts
    reason: str | None


def release_lost_jobs(
    *,
    session: Session,
    now: datetime,
    max_attempts: int,
    owners: Sequence[str] | None = None,
    why: str | None = None,
    job_id: int | None = None,
) -> list[LostJob]:
    """Take RUNNING jobs back from workers taken for lost: QUEUED again, or FAILED.

    Without ``owners``, the jobs whose lease has run out (or that carry none: left by a version
    without leases). With ``owners``, every job those workers hold, whatever the lease says:
    only for workers known to be gone (the caller saw the process end), or a worker giving up a
    job it can no longer record (``job_id``). A job started
    ``max_attempts`` times ends FAILED with the reason (``why`` says what happened to the
    worker), so a study that kills its worker cannot loop.
    """
    lost = Job.status == JobStatus.RUNNING
    if owners is None:
        lost = lost & or_(Job.lease_until.is_(None), Job.lease_until < now)
    else:
        lost = lost & Job.lease_owner.in_(list(owners))
    if job_id is not None:
        lost = lost & (Job.id == job_id)
    released: list[LostJob] = []
    rows = session.execute(select(Job.id, Job.attempts, Job.lease_owner).where(lost)).all()
    for job_id, attempts, owner in rows:
        if why is not None:
            cause = why
        elif owner is not None:
            cause = f"worker {owner} stopped renewing its lease"
        else:
            cause = "left RUNNING by a stopped node"
        if attempts >= max_attempts:
            status = JobStatus.FAILED
            reason: str | None = (
                f"its worker was lost {attempts} times while running it ({cause}: the process "
                "crashed or was killed, for example by the out-of-memory killer); retry it "
                "once the cause is fixed"
            )
            values: dict[str, Any] = {"status": status, "finished_at": now, "reason": reason}
        else:
            status, reason = JobStatus.QUEUED, None
            values = {"status": status, "started_at": None, "published_at": None}
        guard = Job.lease_owner.is_(None) if owner is None else Job.lease_owner == owner
        result = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == JobStatus.RUNNING,
                Job.attempts == attempts,
                guard,
            )
            .values(lease_owner=None, lease_until=None, **values)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            released.append(LostJob(int(job_id), int(attempts), owner, status, reason or cause))
    return released


def queue_job(
    *,
    session: Session,
    study_id: int,
    instance_count: int,
    now: datetime,
    queue: str,
    routes: Sequence[str] | None = None,
    resend: bool = False,
    uid_salt: str | None = None,
) -> Job:
    """A new QUEUED job for a study, on ``queue``, running only ``routes`` when given."""
    job = Job(
        study_id=study_id,
        status=JobStatus.QUEUED,
        instance_count=instance_count,
        attempts=0,
        created_at=now,
        queue=queue,
        routes=json.dumps(list(routes)) if routes is not None else None,
        resend=resend,
        uid_salt=uid_salt,
    )
    session.add(job)
    session.flush()
    return job


def finish_job(
    *,
    session: Session,
    job_id: int,
    status: JobStatus,
    now: datetime,
    reason: str | None = None,
    timings: dict[str, float] | None = None,
    lease: JobLease | None = None,
) -> None:
    """Record the end of a RUNNING job and release its lease.

    Raises
    ------
    LeaseLostError
        If ``lease`` is given and no longer holds the job (nothing is recorded).
    """
    if lease is not None:
        hold_job(session=session, lease=lease)
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            status=status,
            finished_at=now,
            reason=reason,
            timings=json.dumps({k: round(v, 4) for k, v in (timings or {}).items()}),
            lease_owner=None,
            lease_until=None,
        )
    )


@dataclass(frozen=True)
class RecordedSeries:
    """An image series of a stored study as the receiver recorded it (see
    :class:`~pacsai._routing_attributes.RoutingAttributes`)."""

    series_instance_uid: str
    attributes: RoutingAttributes  # of its first image
    paths: tuple[Path, ...]  # of its images, in the order received; relative to the spool
    images: int


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
    queue: str = "default"
    routes: tuple[str, ...] | None = None  # the only routes this job runs (None: all that fire)
    # Its image series in the order of their first image; None: an instance was recorded
    # before the receiver recorded what routing reads (or since replaced): read the files.
    series: tuple[RecordedSeries, ...] | None = None


def job_context(*, session: Session, job_id: int) -> JobContext:
    """The study of ``job_id``, the spool paths of all its instances and its image series."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"job {job_id} does not exist")
    study = session.get(Study, job.study_id)
    assert study is not None
    instances = study_instances(session=session, study_id=study.id)
    return JobContext(
        job_id=job.id,
        study_id=study.id,
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
        calling_ae_title=study.calling_ae_title,
        paths=instances.paths,
        resend=bool(job.resend),
        uid_salt=job.uid_salt or "",
        queue=job.queue,
        routes=tuple(json.loads(job.routes)) if job.routes else None,
        series=instances.series,
    )


@dataclass(frozen=True)
class StudyInstances:
    """The instances of a stored study: every file, and its image series as recorded."""

    paths: tuple[Path, ...]  # in the order received; relative to storage.spool_dir
    # In the order of their first image; None when an instance row lacks what routing reads
    # (recorded before migration 0012, or since replaced in a way that may change a series'
    # first image): route from the files' headers then.
    series: tuple[RecordedSeries, ...] | None


def study_instances(*, session: Session, study_id: int) -> StudyInstances:
    """The spool paths of a stored study's instances and its image series (one query)."""
    rows = session.execute(
        select(
            Instance.path,
            Instance.frames,
            Series.series_instance_uid,
            Series.routing_attributes,
        )
        .join(Series, Series.id == Instance.series_id)
        .where(Instance.study_id == study_id)
        .order_by(Instance.id)
    ).all()
    paths = tuple(Path(row.path) for row in rows)
    if any(row.frames is None for row in rows):
        return StudyInstances(paths, None)
    grouped: dict[str, tuple[str | None, list[Path], list[int]]] = {}
    for row, path in zip(rows, paths, strict=True):
        if row.frames:  # an image: routing sees only those
            one = grouped.setdefault(row.series_instance_uid, (row.routing_attributes, [], []))
            one[1].append(path)
            one[2].append(row.frames)
    series = []
    for uid, (recorded, image_paths, frames) in grouped.items():
        attributes = RoutingAttributes.from_json(recorded)
        if attributes is None:
            return StudyInstances(paths, None)
        series.append(RecordedSeries(uid, attributes, tuple(image_paths), sum(frames)))
    return StudyInstances(paths, tuple(series))


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
