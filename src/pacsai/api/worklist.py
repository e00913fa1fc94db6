"""``GET /worklist-results`` (viewer): per study, what the AI found, for a worklist or RIS.

For each study with a finished job: the models run (name, version), the findings (segmented
labels present with their volumes, class probabilities), a ``priority`` flag, and the series UIDs
of the SEG and SR written. Results come from the study's latest job that succeeded. The study is
priority when any :class:`pacsai.config.PriorityRule` of a route whose model ran holds on that
route's findings.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from pacsai.api._context import ApiContext, api_context
from pacsai.api._params import (
    CursorParam,
    LimitParam,
    StudyUidQuery,
    page_limit,
    text_query,
    to_utc,
)
from pacsai.api.auth import Principal, require_role
from pacsai.api.problems import ApiProblem, problem_responses
from pacsai.config import Route
from pacsai.db import Job, JobStatus, Study
from pacsai.operations._audit import record_list
from pacsai.operations._paging import decode_cursor, encode_cursor
from pacsai.operations.priority import priority_reasons
from pacsai.operations.results import Finding, ResultOut
from pacsai.operations.studies import results_of

__all__ = ["WorklistFinding", "WorklistPage", "WorklistStudy", "priority_reasons", "router"]

router = APIRouter(tags=["worklist"])


class ModelRun(BaseModel):
    """A model that ran on the study, and on which series."""

    name: str
    version: str
    route: str
    series_instance_uid: str


class WorklistFinding(Finding):
    """A finding and the model that made it."""

    model: str
    route: str


class WorklistStudy(BaseModel):
    """The AI results of one study."""

    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    job_id: int = Field(description="The job shown: the latest that succeeded, else the latest")
    job_status: JobStatus
    reason: str | None
    finished_at: datetime | None
    models: list[ModelRun]
    findings: list[WorklistFinding]
    priority: bool
    priority_reasons: list[str] = Field(description="Each route rule that holds, in words")
    seg_series_uids: list[str]
    sr_series_uids: list[str]


class WorklistPage(BaseModel):
    """A page of studies with AI results, newest study first."""

    items: list[WorklistStudy]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: last")


def _shown_jobs(session: Session, study_ids: list[int]) -> dict[int, Job]:
    """Per study: its latest succeeded job, else its latest finished job."""
    shown: dict[int, Job] = {}
    jobs = session.scalars(
        select(Job)
        .where(Job.study_id.in_(study_ids), Job.status.in_(JobStatus.finished()))
        .order_by(Job.id.desc())
    )
    for job in jobs:
        current = shown.get(job.study_id)
        if current is None or (
            current.status != JobStatus.SUCCEEDED and job.status == JobStatus.SUCCEEDED
        ):
            shown[job.study_id] = job
    return shown


def _item(
    study: Study, job: Job, results: list[ResultOut], routes: dict[str, Route]
) -> WorklistStudy:
    reasons = priority_reasons(results, routes)
    objects = [obj for result in results for obj in result.objects]
    return WorklistStudy(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        job_id=job.id,
        job_status=job.status,
        reason=job.reason,
        finished_at=job.finished_at,
        models=[
            ModelRun(
                name=r.model_name,
                version=r.model_version,
                route=r.route,
                series_instance_uid=r.series_instance_uid,
            )
            for r in results
        ],
        findings=[
            WorklistFinding(**finding.model_dump(), model=r.model_name, route=r.route)
            for r in results
            for finding in r.findings
        ],
        priority=bool(reasons),
        priority_reasons=reasons,
        seg_series_uids=list(
            dict.fromkeys(o.series_instance_uid for o in objects if o.kind == "SEG")
        ),
        sr_series_uids=list(
            dict.fromkeys(o.series_instance_uid for o in objects if o.kind == "SR")
        ),
    )


@router.get(
    "/worklist-results",
    response_model=WorklistPage,
    summary="AI results per study, by accession number, study UID or since a time",
    responses=problem_responses(401, 422),
)
def worklist_results(
    principal: Annotated[Principal, Depends(require_role("viewer"))],
    context: Annotated[ApiContext, Depends(api_context)],
    accession: Annotated[str | None, text_query(16, "Accession number")] = None,
    study_uid: StudyUidQuery = None,
    since: Annotated[
        datetime | None,
        Query(description="Studies with a job finished at or after (ISO 8601; UTC if naive)"),
    ] = None,
    limit: LimitParam = None,
    cursor: CursorParam = None,
) -> WorklistPage:
    """The AI results of the studies matching every filter given (at least one is needed).

    A RIS can poll with ``since`` set to the time of its previous poll.
    """
    if accession is None and study_uid is None and since is None:
        raise ApiProblem(422, "validation", "give accession, study_uid or since")
    after = decode_cursor(cursor)
    size = page_limit(limit, context.settings.api.page_size)
    start = to_utc(since, "since")
    finished = Job.study_id == Study.id, Job.status.in_(JobStatus.finished())
    query = select(Study).where(exists().where(*finished))
    if accession is not None:
        query = query.where(Study.accession_number == accession)
    if study_uid is not None:
        query = query.where(Study.study_instance_uid == study_uid)
    if start is not None:
        query = query.where(exists().where(*finished, Job.finished_at >= start))
    if after is not None:
        query = query.where(Study.id < after)
    routes = {route.name: route for route in context.settings.routes or []}
    with context.database.reading() as session:
        studies = list(session.scalars(query.order_by(Study.id.desc()).limit(size + 1)))
        more = len(studies) > size
        studies = studies[:size]
        shown = _shown_jobs(session, [study.id for study in studies])
        succeeded = [job.id for job in shown.values() if job.status == JobStatus.SUCCEEDED]
        results, _ = results_of(session, succeeded, with_deliveries=False)
    by_job: dict[int, list[ResultOut]] = {}
    for result in results:
        by_job.setdefault(result.job_id, []).append(result)
    items = [
        _item(study, shown[study.id], by_job.get(shown[study.id].id, []), routes)
        for study in studies
        if study.id in shown  # a job retried between the two queries: shown on the next poll
    ]
    record_list(
        context.database,
        principal.caller("GET /worklist-results"),
        {
            "accession": accession,
            "study_uid": study_uid,
            "since": start,
            "cursor": cursor,
            "limit": size,
        },
        [(study.study_instance_uid, study.patient_id) for study in studies if study.id in shown],
    )
    return WorklistPage(
        items=items, next_cursor=encode_cursor(studies[-1].id) if more and studies else None
    )
