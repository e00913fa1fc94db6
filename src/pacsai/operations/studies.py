"""Study search and a study's detail: what pacsai received, what ran on it, where results went.

Both are reads of patient data, audited as 110112 Query by the caller before they return.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from pacsai.db import Database, Delivery, Job, Result, ResultObject, Series, Study, StudyStatus
from pacsai.operations._audit import record_list, record_read
from pacsai.operations._paging import check_limit, decode_cursor, encode_cursor
from pacsai.operations.caller import Caller
from pacsai.operations.errors import NotFoundError
from pacsai.operations.results import (
    DeliveryOut,
    JobOut,
    ResultOut,
    delivery_out,
    job_out,
    result_out,
)

__all__ = [
    "SeriesOut",
    "StudyDetail",
    "StudyFilter",
    "StudyPage",
    "StudySummary",
    "get_study",
    "results_of",
    "search_studies",
]


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
    purged_at: datetime | None = Field(
        default=None,
        description="When its received instances were removed from this node (storage "
        "retention, `pacsai studies purge`); its series, jobs, findings and deliveries stay. "
        "Null while it holds what was received.",
    )


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


@dataclass(frozen=True)
class StudyFilter:
    """What a study search matches on; every condition given must hold.

    ``received_from`` and ``received_to`` (aware datetimes) apply to the time the study's first
    instance arrived: ``received_from <= first_received_at < received_to``.
    """

    status: StudyStatus | None = None
    modality: str | None = None
    accession: str | None = None
    patient_id: str | None = None
    received_from: datetime | None = None
    received_to: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        """The conditions as recorded in audit events."""
        return {
            "status": self.status,
            "modality": self.modality,
            "accession": self.accession,
            "patient_id": self.patient_id,
            "received_from": self.received_from,
            "received_to": self.received_to,
        }


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
        "purged_at": study.purged_at,
    }


def search_studies(
    database: Database,
    caller: Caller,
    filters: StudyFilter,
    *,
    limit: int = 50,
    cursor: str | None = None,
) -> StudyPage:
    """Studies matching ``filters``, newest first; ``next_cursor`` pages on (stable under
    inserts). Audited (110112) with the filters and every study returned.

    Raises
    ------
    InvalidRequestError
        If ``cursor`` or ``limit`` is not valid.
    """
    after = decode_cursor(cursor)
    size = check_limit(limit)
    query = select(Study)
    if filters.status is not None:
        query = query.where(Study.status == filters.status)
    if filters.modality is not None:
        query = query.where(
            exists().where(Series.study_id == Study.id, Series.modality == filters.modality.upper())
        )
    if filters.accession is not None:
        query = query.where(Study.accession_number == filters.accession)
    if filters.patient_id is not None:
        query = query.where(Study.patient_id == filters.patient_id)
    if filters.received_from is not None:
        query = query.where(Study.first_received_at >= filters.received_from)
    if filters.received_to is not None:
        query = query.where(Study.first_received_at < filters.received_to)
    if after is not None:
        query = query.where(Study.id < after)
    with database.reading() as session:
        studies = list(session.scalars(query.order_by(Study.id.desc()).limit(size + 1)))
        more = len(studies) > size
        studies = studies[:size]
        modalities = _modalities(session, [study.id for study in studies])
    items = [StudySummary(**_summary(s, modalities[s.id])) for s in studies]
    record_list(
        database,
        caller,
        {**filters.as_dict(), "cursor": cursor, "limit": size},
        [(s.study_instance_uid, s.patient_id) for s in studies],
    )
    return StudyPage(
        items=items, next_cursor=encode_cursor(studies[-1].id) if more and studies else None
    )


def get_study(database: Database, caller: Caller, study_instance_uid: str) -> StudyDetail:
    """Everything pacsai knows about one study; audited (110112) naming it and its patient.

    Raises
    ------
    NotFoundError
        If no study has that UID on this node.
    """
    with database.reading() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
        if study is None:
            raise NotFoundError(f"no study {study_instance_uid} on this node")
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
    record_read(
        database,
        caller,
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
    )
    return detail


def results_of(
    session: Session, job_ids: list[int], *, with_deliveries: bool = True
) -> tuple[list[ResultOut], list[DeliveryOut]]:
    """The results of ``job_ids`` with their objects, and (unless not wanted) their deliveries
    (of the results' objects, and of the jobs' messages), in id order."""
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
    if with_deliveries:
        deliveries = list(
            session.scalars(
                select(Delivery).where(Delivery.job_id.in_(job_ids)).order_by(Delivery.id)
            )
        )
    return (
        [result_out(result, objects[result.id]) for result in results],
        [delivery_out(delivery) for delivery in deliveries],
    )
