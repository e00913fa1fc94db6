"""Jobs: list them, read one with its timings and results, retry, re-run or re-send one, and
send its stored results to another destination.

The retry rules live here and only here: a QUEUED or RUNNING job cannot be retried; FAILED
deliveries go back to PENDING; a FAILED or SKIPPED job (or any finished job asked to run again)
is QUEUED again. Reads are audited as 110112 Query; a retry as 110100 Application Activity with
event type 110132 Use of Restricted Function, in the transaction that makes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacsai.config import Settings
from pacsai.db import (
    AuditEventId,
    AuditEventType,
    Database,
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    Result,
    Study,
    utcnow,
)
from pacsai.db.deliveries import queue_deliveries, retry_failed_deliveries
from pacsai.operations._audit import record, record_list, record_read
from pacsai.operations._paging import check_limit, decode_cursor, encode_cursor
from pacsai.operations.caller import Caller
from pacsai.operations.errors import ConflictError, InvalidRequestError, NotFoundError
from pacsai.operations.results import DeliveryOut, JobOut, ResultOut, job_out
from pacsai.operations.studies import results_of

__all__ = [
    "DeliveryState",
    "JobDetail",
    "JobListItem",
    "JobPage",
    "RetryOptions",
    "RetryOutcome",
    "SendOutcome",
    "delivery_states",
    "get_job",
    "list_jobs",
    "retry_job",
    "send_job_results",
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
        # The study's row lock orders this against a purge of its files (db.retention).
        study = _locked_study(session, job.study_id)
        instances_gone = study.purged_at is not None
        results_gone = _results_purged(session, job_id)
        if again and instances_gone:
            raise ConflictError(_instances_removed(study))
        requeue = (again or job.status in (JobStatus.FAILED, JobStatus.SKIPPED)) and not (
            instances_gone
        )
        resend_failed = failed_delivery is not None and not results_gone
        if not requeue and not resend_failed:
            raise ConflictError(
                _instances_removed(study) if instances_gone else _results_removed(job_id, study)
            )
        pending = (
            retry_failed_deliveries(session=session, now=now, job_ids=[job_id])
            if resend_failed
            else 0
        )
        if requeue:
            job.status = JobStatus.QUEUED
            job.reason = None
            job.published_at = None  # a broker backend publishes it again
            job.resend = flags.resend or flags.new_uids
            job.uid_salt = f"retry-{now.isoformat()}" if flags.new_uids else job.uid_salt
            message = "queued again" + (f", {pending} failed deliveries pending" if pending else "")
        else:
            message = f"{pending} failed deliveries pending again"
            if instances_gone and job.status in (JobStatus.FAILED, JobStatus.SKIPPED):
                message += " (the job is not queued again: its study's instances were removed)"
        session.flush()
        record(
            caller,
            session=session,
            event_id=AuditEventId.APPLICATION_ACTIVITY,
            event_type=AuditEventType.USE_OF_RESTRICTED_FUNCTION,
            study_instance_uid=study.study_instance_uid,
            patient_id=study.patient_id,
            detail={"job_id": job_id, "message": message, **flags.model_dump()},
        )
        status = job.status
    return RetryOutcome(job_id=job_id, status=status, message=message)


def _locked_study(session: Session, study_id: int) -> Study:
    """The study row, locked for the rest of the transaction (PostgreSQL; SQLite's write
    transactions are serialised anyway)."""
    return session.scalars(select(Study).where(Study.id == study_id).with_for_update()).one()


def _results_purged(session: Session, job_id: int) -> bool:
    return (
        session.scalar(
            select(Result.id).where(Result.job_id == job_id, Result.purged_at.is_not(None)).limit(1)
        )
        is not None
    )


def _instances_removed(study: Study) -> str:
    assert study.purged_at is not None
    return (
        f"the instances of study {study.study_instance_uid} were removed from this node on "
        f"{study.purged_at:%Y-%m-%d %H:%M} UTC (storage retention or `pacsai studies purge`): "
        "send the study again to run the models on it"
    )


def _results_removed(job_id: int, study: Study) -> str:
    rerun = (
        "send the study again to run it anew"
        if study.purged_at is not None
        else f"run it again with `pacsai jobs retry {job_id} --rerun`"
    )
    return (
        f"the result files of job {job_id} were removed from this node (storage retention or "
        f"`pacsai studies purge`); {rerun}"
    )


class SendOutcome(BaseModel):
    """What `jobs send` queued."""

    job_id: int
    destination: str
    delivery_ids: list[int] = Field(description="The new deliveries, sent by the node's workers")
    message: str


def send_job_results(
    database: Database,
    settings: Settings,
    caller: Caller,
    job_id: int,
    destination: str,
    *,
    again: bool = False,
    now: datetime | None = None,
) -> SendOutcome:
    """Send the stored DICOM objects of a finished job's results to ``destination`` (a
    configured DICOM destination), as new durable deliveries that the node's delivery workers
    send, retry and audit like any other. A destination that has them already, or is being sent
    them, gets them once more only with ``again``. Audited in the same transaction (110100,
    110132 Use of Restricted Function).

    Raises
    ------
    NotFoundError
        If there is no such job or no such destination.
    InvalidRequestError
        If the destination is not a DICOM destination.
    ConflictError
        If the job has not finished, wrote no DICOM objects, its result files were removed
        (retention, purge) or are missing, or the destination has its results already.
    """
    target = settings.destinations.get(destination)
    if target is None:
        known = ", ".join(sorted(settings.destinations)) or "none"
        raise NotFoundError(f"no destination {destination!r} is configured (destinations: {known})")
    dicom = settings.dicom_destinations.get(destination)
    if dicom is None:
        raise InvalidRequestError(
            f"{destination!r} is a {target.kind} destination: jobs send sends the DICOM objects "
            "of a result, to kind dicom destinations"
        )
    now = now or utcnow()
    routes = {route.name: route for route in settings.routes or []}
    with database.transaction() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id} on this node")
        study = _locked_study(session, job.study_id)
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise ConflictError(f"job {job_id} is {job.status.value}; send it once it has finished")
        results = [
            result
            for result in session.scalars(
                select(Result).where(Result.job_id == job_id).order_by(Result.id)
            )
            if result.objects
        ]
        if not results:
            raise ConflictError(
                f"job {job_id} ({job.status.value}) wrote no DICOM objects: nothing to send"
            )
        if any(result.purged_at is not None for result in results):
            raise ConflictError(_results_removed(job_id, study))
        _check_files(settings, job_id, results)
        queued: list[int] = []
        covered: list[Delivery] = []
        for result in results:
            route = routes.get(result.route_name)
            kinds = ["SEG", "SR"]
            if dicom.overlay or (route is not None and "overlay" in route.outputs):
                kinds.append("OVERLAY")
            earlier = _covering(session, result.id, destination)
            if earlier is not None and not again:
                covered.append(earlier)
                continue
            queued += queue_deliveries(
                session=session,
                result_id=result.id,
                targets=[(destination, kinds)],
                now=now,
                resend=again,
            )
        if not queued:
            if covered:
                first = covered[0]
                when = f", {first.sent_at:%Y-%m-%d %H:%M} UTC" if first.sent_at else ""
                state = f"delivery {first.id}, {first.status.value}{when}"
            else:
                state = "the same objects, from an earlier run of the job"
            raise ConflictError(
                f"{destination} has the results of job {job_id} already, or is being sent "
                f"them ({state}); pass --again to send them once more"
            )
        message = f"{len(queued)} deliveries to {destination} queued"
        record(
            caller,
            session=session,
            event_id=AuditEventId.APPLICATION_ACTIVITY,
            event_type=AuditEventType.USE_OF_RESTRICTED_FUNCTION,
            study_instance_uid=study.study_instance_uid,
            patient_id=study.patient_id,
            detail={
                "job_id": job_id,
                "destination": destination,
                "delivery_ids": queued,
                "again": again,
                "message": message,
            },
        )
    return SendOutcome(job_id=job_id, destination=destination, delivery_ids=queued, message=message)


def _covering(session: Session, result_id: int, destination: str) -> Delivery | None:
    """A delivery of ``result_id`` to ``destination`` that was sent or is to be sent."""
    return session.scalars(
        select(Delivery)
        .where(
            Delivery.result_id == result_id,
            Delivery.destination == destination,
            Delivery.status != DeliveryStatus.FAILED,
        )
        .order_by(Delivery.id.desc())
        .limit(1)
    ).first()


def _check_files(settings: Settings, job_id: int, results: list[Result]) -> None:
    root = Path(settings.storage.results_dir)
    for result in results:
        for obj in result.objects:
            if not (root / obj.path).is_file():
                raise ConflictError(
                    f"the {obj.kind} file of job {job_id} is missing from "
                    f"{root / obj.path}: run it again with `pacsai jobs retry {job_id} --rerun`"
                )


class DeliveryState(BaseModel):
    """Where one delivery stands (no patient data: not audited)."""

    id: int
    destination: str
    status: DeliveryStatus
    attempts: int
    last_error: str | None


def delivery_states(database: Database, delivery_ids: Sequence[int]) -> list[DeliveryState]:
    """The states of these deliveries, in id order (for waiting on `jobs send`)."""
    with database.reading() as session:
        return [
            DeliveryState(
                id=d.id,
                destination=d.destination,
                status=d.status,
                attempts=d.attempts,
                last_error=d.last_error,
            )
            for d in session.scalars(
                select(Delivery).where(Delivery.id.in_(list(delivery_ids))).order_by(Delivery.id)
            )
        ]
