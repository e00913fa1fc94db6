"""``GET /audit`` and ``GET /audit/verify`` (auditor).

Both are reads of the audit trail, and each is itself recorded as a 110101 Audit Log Used event
(PS3.15 A.5.3.2) naming the token's user (``api:<name>``) before the answer leaves.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

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
from pacsai.db import AuditOutcome
from pacsai.db.audit_export import EVENT_ID_MEANINGS, export_csv
from pacsai.db.audit_query import AuditFilter, AuditQueryError, AuditRecord
from pacsai.operations.audit import query_audit, verify_audit

__all__ = ["AuditEventOut", "AuditPage", "ChainVerification", "router"]

router = APIRouter(tags=["audit"])

_CODES = r"^[0-9]{1,16}(,[0-9]{1,16}){0,15}$"


class AuditEventOut(BaseModel):
    """One audit event (a row of the hash chain)."""

    model_config = ConfigDict(frozen=True)

    id: int = Field(description="Position in the chain")
    occurred_at: datetime
    event_id: str = Field(description="DCM code of the PS3.15 A.5.3 event ID, e.g. 110104")
    event: str = Field(description="The event ID's meaning, e.g. DICOM Instances Transferred")
    event_type: str | None = Field(description="DCM code of the event type, e.g. 110120")
    action: str = Field(description="EventActionCode: C, R, U, D or E")
    outcome: int = Field(description="EventOutcomeIndicator: 0, 4, 8 or 12")
    actor: str = Field(description="AE title, api:<token name> or cli:<os user>")
    remote_address: str | None
    study_instance_uid: str | None
    patient_id: str | None
    model_name: str | None
    model_version: str | None
    detail: dict[str, Any] | None
    prev_hash: str = Field(description="SHA-256 of the row before (hex)")
    row_hash: str = Field(description="SHA-256 of this row's content and prev_hash (hex)")


class AuditPage(BaseModel):
    """A page of audit events, newest first."""

    items: list[AuditEventOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: last")


class ChainVerification(BaseModel):
    """What a walk of the whole chain found."""

    intact: bool = Field(description="True when no row was edited, deleted or inserted")
    rows_checked: int = Field(description="Rows verified before the first bad one (or all)")
    first_bad_id: int | None = Field(description="The first row that breaks the chain")
    problem: str | None = Field(description="What is wrong with that row")
    head_id: int | None = Field(description="The newest row: note it to detect later truncation")
    head_hash: str | None = Field(description="row_hash of the newest row")


def _event_out(record: AuditRecord) -> AuditEventOut:
    data = record.as_json()
    data["occurred_at"] = record.occurred_at
    data["event"] = EVENT_ID_MEANINGS.get(record.event_id, record.event_id)
    return AuditEventOut(**data)


def _codes(value: str | None) -> tuple[str, ...]:
    return () if value is None else tuple(value.split(","))


@router.get(
    "/audit",
    response_model=AuditPage,
    summary="Audit events, newest first (JSON or CSV)",
    responses={
        200: {
            "description": "A page of audit events; with format=csv, as CSV (header line first)",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
        **problem_responses(401, 403, 422),
    },
)
def list_audit_events(
    request: Request,
    principal: Annotated[Principal, Depends(require_role("auditor"))],
    context: Annotated[ApiContext, Depends(api_context)],
    event_id: Annotated[
        str | None,
        Query(pattern=_CODES, description="DCM event IDs, comma-separated (e.g. 110104,110106)"),
    ] = None,
    event_type: Annotated[
        str | None,
        Query(pattern=_CODES, description="DCM event type codes, comma-separated (e.g. 110120)"),
    ] = None,
    actor: Annotated[
        str | None, text_query(128, "Exact actor: AE title, api:<name> or cli:<user>")
    ] = None,
    patient_id: Annotated[str | None, text_query(64, "Patient ID")] = None,
    study_uid: StudyUidQuery = None,
    outcome: Annotated[
        AuditOutcome | None, Query(description="EventOutcomeIndicator: 0, 4, 8 or 12")
    ] = None,
    since: Annotated[
        datetime | None, Query(description="Events at or after (ISO 8601; UTC if naive)")
    ] = None,
    until: Annotated[
        datetime | None, Query(description="Events before (ISO 8601; UTC if naive)")
    ] = None,
    limit: LimitParam = None,
    cursor: CursorParam = None,
    fmt: Annotated[
        Literal["json", "csv"], Query(alias="format", description="json (default) or csv")
    ] = "json",
    raw: Annotated[
        bool,
        Query(
            description="CSV: values exactly as stored, to check the hashes (by default a value "
            "a spreadsheet would run as a formula gets a leading ')"
        ),
    ] = False,
) -> Any:
    """Audit events matching every filter given; ``next_cursor`` pages on (stable under inserts).

    With ``format=csv`` the same page comes as CSV, the next cursor in the ``X-Next-Cursor``
    header. Use ``pacsai audit export`` for the whole trail or the DICOM audit message format.
    """
    size = page_limit(limit, context.settings.api.page_size)
    try:
        filters = AuditFilter(
            event_ids=_codes(event_id),
            event_types=_codes(event_type),
            actor=actor,
            patient_id=patient_id,
            study_instance_uid=study_uid,
            outcomes=() if outcome is None else (int(outcome),),
            since=to_utc(since, "since"),
            until=to_utc(until, "until"),
        )
    except AuditQueryError as exc:
        raise ApiProblem(422, "validation", str(exc)) from None
    page = query_audit(
        context.database,
        principal.caller("GET /audit"),
        filters,
        limit=size,
        cursor=cursor,
        uri=request.url.path,
        format=fmt,
        raw=raw if fmt == "csv" else None,
    )
    if fmt == "csv":
        headers = {"Content-Disposition": 'attachment; filename="pacsai-audit.csv"'}
        if page.next_cursor is not None:
            headers["X-Next-Cursor"] = page.next_cursor
        chunks: Iterator[str] = export_csv(page.records, raw=raw)
        return StreamingResponse(chunks, media_type="text/csv; charset=utf-8", headers=headers)
    return AuditPage(
        items=[_event_out(record) for record in page.records], next_cursor=page.next_cursor
    )


@router.get(
    "/audit/verify",
    response_model=ChainVerification,
    summary="Walk the hash chain and name the first row that breaks it",
    responses=problem_responses(401, 403),
)
def verify_audit_chain(
    request: Request,
    principal: Annotated[Principal, Depends(require_role("auditor"))],
    context: Annotated[ApiContext, Depends(api_context)],
) -> ChainVerification:
    """Verify every row of the audit trail (this reads the whole table: seconds per million).

    A broken chain is answered 200 with ``intact: false``, and recorded as a 110113 Security
    Alert besides the 110101 Audit Log Used event every verification records.
    """
    report = verify_audit(
        context.database, principal.caller("GET /audit/verify", uri=request.url.path)
    )
    return ChainVerification(
        intact=report.intact,
        rows_checked=report.rows_checked,
        first_bad_id=report.first_bad_id,
        problem=report.problem,
        head_id=report.head_id,
        head_hash=report.head_hash,
    )
