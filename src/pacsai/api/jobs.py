"""``GET /jobs``, ``GET /jobs/{id}`` (viewer) and ``POST /jobs/{id}/retry`` (admin), answered
by :mod:`pacsai.operations.jobs`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query

from pacsai.api._context import ApiContext, api_context
from pacsai.api._params import CursorParam, JobIdPath, LimitParam, StudyUidQuery, page_limit
from pacsai.api.auth import Principal, require_role
from pacsai.api.problems import problem_responses
from pacsai.db import JobStatus
from pacsai.operations import jobs as operations
from pacsai.operations.jobs import JobDetail, JobPage, RetryOptions, RetryOutcome

__all__ = ["JobDetail", "JobPage", "RetryOutcome", "RetryRequest", "router"]

router = APIRouter(tags=["jobs"])


class RetryRequest(RetryOptions):
    """What to retry; with no flag, failed deliveries and a failed or skipped job."""


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
    """Jobs matching every filter given, with their results and deliveries; ``next_cursor``
    pages on (stable under inserts)."""
    return operations.list_jobs(
        context.database,
        principal.caller("GET /jobs"),
        status=status,
        study_instance_uid=study_uid,
        limit=page_limit(limit, context.settings.api.page_size),
        cursor=cursor,
    )


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
    return operations.get_job(context.database, principal.caller("GET /jobs/{job_id}"), job_id)


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
    outcome = operations.retry_job(
        context.database, principal.caller("POST /jobs/{job_id}/retry"), job_id, request
    )
    if context.on_retry is not None:
        context.on_retry()
    return outcome
