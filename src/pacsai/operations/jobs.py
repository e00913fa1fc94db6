"""Jobs: list them, read one with its timings and results, and retry, re-run or re-send one.

The retry rules live here and only here: a QUEUED or RUNNING job cannot be retried; FAILED
deliveries go back to PENDING; a FAILED or SKIPPED job (or any finished job asked to run again)
is QUEUED again. Reads are audited as 110112 Query; a retry as 110100 Application Activity with
event type 110132 Use of Restricted Function, in the transaction that makes it.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from pacsai.db import (
    AuditEventId,
    AuditEventType,
    Database,
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    Study,
    utcnow,
)
from pacsai.db.deliveries import retry_failed_deliveries
from pacsai.operations._audit import record, record_list, record_read
from pacsai.operations._paging import check_limit, decode_cursor, encode_cursor
from pacsai.operations.caller import Caller
from pacsai.operations.errors import ConflictError, NotFoundError
from pacsai.operations.results import DeliveryOut, JobOut, ResultOut, job_out
from pacsai.operations.studies import results_of

__all__ = [
    "JobDetail",
    "JobListItem",
    "JobPage",
    "RetryOptions",
    "RetryOutcome",
    "get_job",
    "list_jobs",
    "retry_job",
]


class JobListItem(JobOut):
    """A job as listed, with its results (models, findings, objects) and deliveries."""

    results: list[ResultOut]
    deliveries: list[DeliveryOut]


class JobPage(BaseModel):
    """A page of jobs, newest first."""

    items: list[JobListItem]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: last")


class JobDetail(JobOut):
    """A job with its per-stage timings, results and deliveries."""

    patient_id: str | None
    accession_number: str | None
    results: list[ResultOut]
    deliveries: list[DeliveryOut]


class RetryOptions(BaseModel):
    """What to retry; with no flag, failed deliveries and a failed or skipped job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rerun: bool = Field(default=False, description="Run the models again even if it succeeded")
    resend: bool = Field(default=False, description="Send results even where they arrived")
    new_uids: bool = Field(default=False, description="Run again, results under new UIDs")


class RetryOutcome(BaseModel):
    """What the retry did."""

    job_id: int
    status: JobStatus
    message: str


def list_jobs(
    database: Database,
    caller: Caller,
    *,
    status: JobStatus | None = None,
    study_instance_uid: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> JobPage:
    """Jobs matching every filter given, newest first, with their results and deliveries;
    ``next_cursor`` pages on. Audited (110112) with the study UIDs listed.

    Raises
    ------
    InvalidRequestError
        If ``cursor`` or ``limit`` is not valid.
    """
    after = decode_cursor(cursor)
    size = check_limit(limit)
    query = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)
    if status is not None:
        query = query.where(Job.status == status)
    if study_instance_uid is not None:
        query = query.where(Study.study_instance_uid == study_instance_uid)
    if after is not None:
        query = query.where(Job.id < after)
    with database.reading() as session:
        rows = list(session.execute(query.order_by(Job.id.desc()).limit(size + 1)))
        more = len(rows) > size
        rows = rows[:size]
        results, deliveries = results_of(session, [job.id for job, _ in rows])
    items = [
        JobListItem(
            **job_out(job, uid).model_dump(),
            results=[r for r in results if r.job_id == job.id],
            deliveries=[d for d in deliveries if d.job_id == job.id],
        )
        for job, uid in rows
    ]
    record_list(
        database,
        caller,
        {"status": status, "study_uid": study_instance_uid, "cursor": cursor, "limit": size},
        [(item.study_instance_uid, None) for item in items],
    )
    return JobPage(items=items, next_cursor=encode_cursor(rows[-1][0].id) if more else None)


def get_job(database: Database, caller: Caller, job_id: int) -> JobDetail:
    """A job: its state, error or reason, per-stage timings, results and deliveries; audited
    (110112) naming its study and patient.

    Raises
    ------
    NotFoundError
        If there is no such job.
    """
    with database.reading() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id} on this node")
        study = session.get(Study, job.study_id)
        assert study is not None  # a foreign key
        results, deliveries = results_of(session, [job.id])
    detail = JobDetail(
        **job_out(job, study.study_instance_uid).model_dump(),
        patient_id=study.patient_id,
        accession_number=study.accession_number,
        results=results,
        deliveries=deliveries,
    )
    record_read(
        database,
        caller,
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
        job_id=job_id,
    )
    return detail


def retry_job(
    database: Database,
    caller: Caller,
    job_id: int,
    options: RetryOptions | None = None,
    *,
    now: datetime | None = None,
) -> RetryOutcome:
    """Retry a job: its FAILED deliveries go out again; a FAILED or SKIPPED job, or any finished
    job with ``rerun`` or ``new_uids``, is QUEUED again (``resend``: its results go even where
    they arrived; ``new_uids``: under new UIDs). Audited in the same transaction.

    The caller wakes its workers afterwards if it has any.

    Raises
    ------
    NotFoundError
        If there is no such job.
    ConflictError
        If the job is QUEUED or RUNNING, or succeeded with nothing failed and no re-run asked.
    """
    flags = options or RetryOptions()
    now = now or utcnow()
    with database.transaction() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id} on this node")
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise ConflictError(f"job {job_id} is {job.status.value}; wait for it to finish")
        failed_delivery = session.scalar(
            select(Delivery.id)
            .where(Delivery.job_id == job_id, Delivery.status == DeliveryStatus.FAILED)
            .limit(1)
        )
        again = flags.rerun or flags.new_uids
        if job.status == JobStatus.SUCCEEDED and failed_delivery is None and not again:
            raise ConflictError(
                f"job {job_id} succeeded and none of its deliveries failed; "
                "ask for a re-run to run it again"
            )
        pending = retry_failed_deliveries(session=session, now=now, job_ids=[job_id])
        if again or job.status in (JobStatus.FAILED, JobStatus.SKIPPED):
            job.status = JobStatus.QUEUED
            job.reason = None
            job.published_at = None  # a broker backend publishes it again
            job.resend = flags.resend or flags.new_uids
            job.uid_salt = f"retry-{now.isoformat()}" if flags.new_uids else job.uid_salt
            message = "queued again" + (f", {pending} failed deliveries pending" if pending else "")
        else:
            message = f"{pending} failed deliveries pending again"
        session.flush()
        study = session.get(Study, job.study_id)
        record(
            caller,
            session=session,
            event_id=AuditEventId.APPLICATION_ACTIVITY,
            event_type=AuditEventType.USE_OF_RESTRICTED_FUNCTION,
            study_instance_uid=study.study_instance_uid if study else None,
            patient_id=study.patient_id if study else None,
            detail={"job_id": job_id, "message": message, **flags.model_dump()},
        )
        status = job.status
    return RetryOutcome(job_id=job_id, status=status, message=message)
