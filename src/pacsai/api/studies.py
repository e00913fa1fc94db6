"""``GET /studies`` and ``GET /studies/{study_uid}`` (viewer)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from pacsai.api._context import ApiContext, api_context, audit_list, audit_read
from pacsai.api._params import (
    CursorParam,
    LimitParam,
    StudyUidPath,
    decode_cursor,
    encode_cursor,
    page_limit,
    text_query,
    to_utc,
)
from pacsai.api.auth import Principal, require_role
from pacsai.api.problems import ApiProblem, problem_responses
from pacsai.api.schemas import DeliveryOut, JobOut, ResultOut, delivery_out, job_out, result_out
from pacsai.db import Delivery, Job, Result, ResultObject, Series, Study, StudyStatus

__all__ = ["StudyDetail", "StudyPage", "StudySummary", "router"]

router = APIRouter(tags=["studies"])


class StudySummary(BaseModel):
    """A study as listed."""

    model_config = ConfigDict(frozen=True)

    study_instance_uid: str
    patient_id: str | None
    accession_number: str | None
    study_date: str | None = Field(description="DICOM DA (YYYYMMDD) as received")
    study_description: str | None
    status: StudyStatus
    calling_ae_title: str = Field(description="The AE title that sent it")
    instance_count: int
    modalities: list[str]
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


class StudyPage(BaseModel):
    """A page of studies, newest first."""

    items: list[StudySummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: last")


class SeriesOut(BaseModel):
    """A series of a study."""

    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part_examined: str | None
    instance_count: int


class StudyDetail(StudySummary):
    """A study with its series, jobs, results (with their objects) and deliveries."""

    series: list[SeriesOut]
    jobs: list[JobOut]
    results: list[ResultOut]
    deliveries: list[DeliveryOut]


def _modalities(session: Session, study_ids: list[int]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {study_id: [] for study_id in study_ids}
    rows = session.execute(
        select(Series.study_id, Series.modality)
        .where(Series.study_id.in_(study_ids), Series.modality.is_not(None))
        .distinct()
        .order_by(Series.study_id, Series.modality)
    )
    for study_id, modality in rows:
        found[study_id].append(str(modality))
    return found


def _summary(study: Study, modalities: list[str]) -> dict[str, Any]:
    return {
        "study_instance_uid": study.study_instance_uid,
        "patient_id": study.patient_id,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "status": study.status,
        "calling_ae_title": study.calling_ae_title,
        "instance_count": study.instance_count,
        "modalities": modalities,
        "first_received_at": study.first_received_at,
        "last_received_at": study.last_received_at,
        "completed_at": study.completed_at,
    }


@router.get(
    "/studies",
    response_model=StudyPage,
    summary="List studies, newest first",
    responses=problem_responses(401, 422),
)
def list_studies(
    principal: Annotated[Principal, Depends(require_role("viewer"))],
    context: Annotated[ApiContext, Depends(api_context)],
    status: Annotated[StudyStatus | None, Query(description="RECEIVING or COMPLETE")] = None,
    modality: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=16,
            pattern=r"^[A-Za-z0-9_]+$",
            description="Studies with a series of this modality (e.g. CT)",
        ),
    ] = None,
    accession: Annotated[str | None, text_query(16, "Accession number")] = None,
    patient_id: Annotated[str | None, text_query(64, "Patient ID")] = None,
    received_from: Annotated[
        datetime | None, Query(description="First instance at or after (ISO 8601; UTC if naive)")
    ] = None,
    received_to: Annotated[
        datetime | None, Query(description="First instance before (ISO 8601; UTC if naive)")
    ] = None,
    limit: LimitParam = None,
    cursor: CursorParam = None,
) -> StudyPage:
    """Studies matching every filter given; ``next_cursor`` pages on (stable under inserts).

    ``received_from``/``received_to`` apply to the time the study's first instance arrived.
    """
    after = decode_cursor(cursor)
    size = page_limit(limit, context.settings.api.page_size)
    start, end = to_utc(received_from, "received_from"), to_utc(received_to, "received_to")
    query = select(Study)
    if status is not None:
        query = query.where(Study.status == status)
    if modality is not None:
        query = query.where(
            exists().where(Series.study_id == Study.id, Series.modality == modality.upper())
        )
    if accession is not None:
        query = query.where(Study.accession_number == accession)
    if patient_id is not None:
        query = query.where(Study.patient_id == patient_id)
    if start is not None:
        query = query.where(Study.first_received_at >= start)
    if end is not None:
        query = query.where(Study.first_received_at < end)
    if after is not None:
        query = query.where(Study.id < after)
    with context.database.reading() as session:
        studies = list(session.scalars(query.order_by(Study.id.desc()).limit(size + 1)))
        more = len(studies) > size
        studies = studies[:size]
        modalities = _modalities(session, [study.id for study in studies])
    items = [StudySummary(**_summary(s, modalities[s.id])) for s in studies]
    audit_list(
        context,
        principal,
        "GET /studies",
        {
            "status": status,
            "modality": modality,
            "accession": accession,
            "patient_id": patient_id,
            "received_from": start,
            "received_to": end,
            "cursor": cursor,
            "limit": size,
        },
        [(s.study_instance_uid, s.patient_id) for s in studies],
    )
    return StudyPage(
        items=items, next_cursor=encode_cursor(studies[-1].id) if more and studies else None
    )


@router.get(
    "/studies/{study_uid}",
    response_model=StudyDetail,
    summary="One study with its series, jobs, results and deliveries",
    responses=problem_responses(401, 404, 422),
)
def get_study(
    study_uid: StudyUidPath,
    principal: Annotated[Principal, Depends(require_role("viewer"))],
    context: Annotated[ApiContext, Depends(api_context)],
) -> StudyDetail:
    """Everything pacsai knows about one study."""
    with context.database.reading() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        if study is None:
            raise ApiProblem(404, "not-found", f"no study {study_uid} on this node")
        series = list(
            session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id))
        )
        jobs = list(session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)))
        results, deliveries = results_of(session, [job.id for job in jobs])
    detail = StudyDetail(
        **_summary(study, sorted({s.modality for s in series if s.modality})),
        series=[
            SeriesOut(
                series_instance_uid=s.series_instance_uid,
                modality=s.modality,
                series_number=s.series_number,
                series_description=s.series_description,
                body_part_examined=s.body_part_examined,
                instance_count=s.instance_count,
            )
            for s in series
        ],
        jobs=[job_out(job, study.study_instance_uid) for job in jobs],
        results=results,
        deliveries=deliveries,
    )
    audit_read(
        context,
        principal,
        "GET /studies/{study_uid}",
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
    )
    return detail


def results_of(
    session: Session, job_ids: list[int], *, with_deliveries: bool = True
) -> tuple[list[ResultOut], list[DeliveryOut]]:
    """The results of ``job_ids`` with their objects, and (unless not wanted) their deliveries,
    in id order."""
    if not job_ids:
        return [], []
    results = list(
        session.scalars(select(Result).where(Result.job_id.in_(job_ids)).order_by(Result.id))
    )
    result_ids = [result.id for result in results]
    objects: dict[int, list[ResultObject]] = {result_id: [] for result_id in result_ids}
    deliveries: list[Delivery] = []
    if result_ids:
        for obj in session.scalars(
            select(ResultObject)
            .where(ResultObject.result_id.in_(result_ids))
            .order_by(ResultObject.id)
        ):
            objects[obj.result_id].append(obj)
    if result_ids and with_deliveries:
        deliveries = list(
            session.scalars(
                select(Delivery).where(Delivery.result_id.in_(result_ids)).order_by(Delivery.id)
            )
        )
    return (
        [result_out(result, objects[result.id]) for result in results],
        [delivery_out(delivery) for delivery in deliveries],
    )
