"""``GET /jobs``, ``GET /jobs/{id}`` (viewer) and ``POST /jobs/{id}/retry`` (admin)."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from pacsai.api._context import ApiContext, api_context, audit_list, audit_read
from pacsai.api._params import (
    CursorParam,
    JobIdPath,
    LimitParam,
    StudyUidQuery,
    decode_cursor,
    encode_cursor,
    page_limit,
)
from pacsai.api.auth import Principal, require_role
from pacsai.api.problems import ApiProblem, problem_responses
from pacsai.api.schemas import DeliveryOut, JobOut, ResultOut, job_out
from pacsai.api.studies import results_of
from pacsai.db import (
    AuditAction,
    AuditEventId,
    AuditEventType,
    AuditOutcome,
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    Result,
    Study,
    append_event,
    utcnow,
)
from pacsai.db.jobs import retry_jobs

__all__ = ["JobDetail", "JobPage", "RetryOutcome", "RetryRequest", "router"]

router = APIRouter(tags=["jobs"])


class JobPage(BaseModel):
    """A page of jobs, newest first."""

    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: last")


class JobDetail(JobOut):
    """A job with its per-stage timings, results and deliveries."""

    patient_id: str | None
    accession_number: str | None
    timings: dict[str, float] = Field(
        description="Seconds per stage (route, load_model, volume, preprocessing, forward, "
        "postprocessing, store, report...)"
    )
    results: list[ResultOut]
    deliveries: list[DeliveryOut]


class RetryRequest(BaseModel):
    """What to retry; with no flag, failed deliveries and a failed or skipped job."""

    model_config = ConfigDict(extra="forbid")

    rerun: bool = Field(default=False, description="Run the models again even if it succeeded")
    resend: bool = Field(default=False, description="Send results even where they arrived")
    new_uids: bool = Field(default=False, description="Run again, results under new UIDs")


class RetryOutcome(BaseModel):
    """What the retry did."""

    job_id: int
    status: JobStatus
    message: str


@router.get(
    "/jobs",
    response_model=JobPage,
    summary="List jobs, newest first",
    responses=problem_responses(401, 422),
)
def list_jobs(
    principal: Annotated[Principal, Depends(require_role("viewer"))],
    context: Annotated[ApiContext, Depends(api_context)],
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state")] = None,
    study_uid: StudyUidQuery = None,
    limit: LimitParam = None,
    cursor: CursorParam = None,
) -> JobPage:
    """Jobs matching every filter given; ``next_cursor`` pages on (stable under inserts)."""
    after = decode_cursor(cursor)
    size = page_limit(limit, context.settings.api.page_size)
    query = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)
    if status is not None:
        query = query.where(Job.status == status)
    if study_uid is not None:
        query = query.where(Study.study_instance_uid == study_uid)
    if after is not None:
        query = query.where(Job.id < after)
    with context.database.reading() as session:
        rows = list(session.execute(query.order_by(Job.id.desc()).limit(size + 1)))
    more = len(rows) > size
    rows = rows[:size]
    items = [job_out(job, uid) for job, uid in rows]
    audit_list(
        context,
        principal,
        "GET /jobs",
        {"status": status, "study_uid": study_uid, "cursor": cursor, "limit": size},
        [(item.study_instance_uid, None) for item in items],
    )
    return JobPage(items=items, next_cursor=encode_cursor(rows[-1][0].id) if more else None)


@router.get(
    "/jobs/{job_id}",
    response_model=JobDetail,
    summary="One job with timings, results and deliveries",
    responses=problem_responses(401, 404, 422),
)
def get_job(
    job_id: JobIdPath,
    principal: Annotated[Principal, Depends(require_role("viewer"))],
    context: Annotated[ApiContext, Depends(api_context)],
) -> JobDetail:
    """A job: its state, error or reason, per-stage timings, results and deliveries."""
    with context.database.reading() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ApiProblem(404, "not-found", f"no job {job_id} on this node")
        study = session.get(Study, job.study_id)
        assert study is not None  # a foreign key
        results, deliveries = results_of(session, [job.id])
    timings = json.loads(job.timings) if job.timings else {}
    detail = JobDetail(
        **job_out(job, study.study_instance_uid).model_dump(),
        patient_id=study.patient_id,
        accession_number=study.accession_number,
        timings={str(k): float(v) for k, v in timings.items()},
        results=results,
        deliveries=deliveries,
    )
    audit_read(
        context,
        principal,
        "GET /jobs/{job_id}",
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
        job_id=job_id,
    )
    return detail


@router.post(
    "/jobs/{job_id}/retry",
    response_model=RetryOutcome,
    summary="Retry failed deliveries, and queue a failed or skipped job again",
    responses=problem_responses(400, 401, 403, 404, 409, 422),
)
def retry_job(
    job_id: JobIdPath,
    principal: Annotated[Principal, Depends(require_role("admin"))],
    context: Annotated[ApiContext, Depends(api_context)],
    request: Annotated[RetryRequest | None, Body()] = None,
) -> RetryOutcome:
    """What ``pacsai jobs retry`` does, for one job; audited like it (110100, 110132).

    409 when the job is queued or running, or when nothing of it failed and neither ``rerun``
    nor ``new_uids`` was asked.
    """
    flags = request or RetryRequest()
    with context.database.transaction() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ApiProblem(404, "not-found", f"no job {job_id} on this node")
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise ApiProblem(409, "conflict", f"job {job_id} is {job.status.value}; wait for it")
        failed_deliveries = session.scalar(
            select(Delivery.id)
            .join(Result, Result.id == Delivery.result_id)
            .where(Result.job_id == job_id, Delivery.status == DeliveryStatus.FAILED)
            .limit(1)
        )
        if (
            job.status == JobStatus.SUCCEEDED
            and failed_deliveries is None
            and not (flags.rerun or flags.new_uids)
        ):
            raise ApiProblem(
                409,
                "conflict",
                f"job {job_id} succeeded and none of its deliveries failed; "
                'ask {"rerun": true} to run it again',
            )
        study = session.get(Study, job.study_id)
        messages = retry_jobs(
            session=session,
            job_ids=[job_id],
            now=utcnow(),
            rerun=flags.rerun,
            resend=flags.resend,
            new_uids=flags.new_uids,
        )
        append_event(
            session=session,
            event_id=AuditEventId.APPLICATION_ACTIVITY,
            event_type=AuditEventType.USE_OF_RESTRICTED_FUNCTION,
            action=AuditAction.EXECUTE,
            outcome=AuditOutcome.SUCCESS,
            actor=principal.actor,
            remote_address=principal.remote_address,
            study_instance_uid=study.study_instance_uid if study else None,
            patient_id=study.patient_id if study else None,
            detail={
                "route": "POST /jobs/{job_id}/retry",
                "jobs": messages,
                **flags.model_dump(),
            },
        )
        status = job.status
    if context.on_retry is not None:
        context.on_retry()
    return RetryOutcome(job_id=job_id, status=status, message=messages[job_id])
