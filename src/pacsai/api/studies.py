"""``GET /studies`` and ``GET /studies/{study_uid}`` (viewer), answered by
:mod:`pacsai.operations.studies`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from pacsai.api._context import ApiContext, api_context
from pacsai.api._params import (
    CursorParam,
    LimitParam,
    StudyUidPath,
    page_limit,
    text_query,
    to_utc,
)
from pacsai.api.auth import Principal, require_role
from pacsai.api.problems import problem_responses
from pacsai.db import StudyStatus
from pacsai.operations import studies as operations
from pacsai.operations.studies import (
    SeriesOut,
    StudyDetail,
    StudyFilter,
    StudyPage,
    StudySummary,
)

__all__ = ["SeriesOut", "StudyDetail", "StudyPage", "StudySummary", "router"]

router = APIRouter(tags=["studies"])


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
    filters = StudyFilter(
        status=status,
        modality=modality,
        accession=accession,
        patient_id=patient_id,
        received_from=to_utc(received_from, "received_from"),
        received_to=to_utc(received_to, "received_to"),
    )
    return operations.search_studies(
        context.database,
        principal.caller("GET /studies"),
        filters,
        limit=page_limit(limit, context.settings.api.page_size),
        cursor=cursor,
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
    return operations.get_study(
        context.database, principal.caller("GET /studies/{study_uid}"), study_uid
    )
