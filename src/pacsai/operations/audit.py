"""The audit trail: query it, verify its hash chain, export it; and when it was last verified.

Every use is itself audited as 110101 Audit Log Used (PS3.15 A.5.3.2) naming the caller; a
broken chain is also recorded as a 110113 Security Alert naming the first bad row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from pacsai.db import AuditEvent, AuditEventId, AuditOutcome, Database, verify_chain
from pacsai.db.audit_export import ExportFormat, export_records
from pacsai.db.audit_query import (
    AuditFilter,
    AuditPage,
    AuditQueryError,
    AuditRecord,
    chain_head,
    iter_records,
    query_events,
    record_audit_use,
    record_verification,
)
from pacsai.operations.caller import Caller
from pacsai.operations.errors import InvalidRequestError

__all__ = [
    "AuditExport",
    "ChainVerification",
    "LastVerification",
    "audit_export",
    "last_verification",
    "query_audit",
    "stream_audit_export",
    "verify_audit",
]


def query_audit(
    database: Database,
    caller: Caller,
    filters: AuditFilter,
    *,
    limit: int = 50,
    cursor: str | None = None,
    **detail: Any,
) -> AuditPage:
    """One page of audit events meeting ``filters``, newest first; recorded as 110101 with
    ``detail`` and the ids returned.

    Raises
    ------
    InvalidRequestError
        If ``limit`` is out of range or the cursor is malformed or belongs to other filters.
    """
    try:
        with database.reading() as session:
            page = query_events(session=session, filters=filters, limit=limit, cursor=cursor)
    except AuditQueryError as exc:
        raise InvalidRequestError(str(exc)) from exc
    with database.transaction() as session:
        record_audit_use(
            session=session,
            actor=caller.actor,
            remote_address=caller.remote_address,
            filters=filters,
            detail=caller.detail(
                **detail,
                returned=len(page.records),
                first_id=page.records[0].id if page.records else None,
                last_id=page.records[-1].id if page.records else None,
            ),
        )
    return page


@dataclass(frozen=True)
class ChainVerification:
    """What a walk of the whole chain found.

    ``problems`` lists, for people, everything wrong: the first row that breaks the chain, and
    an expected head (noted at an earlier verification) that is gone or rewritten.
    """

    intact: bool
    rows_checked: int
    first_bad_id: int | None
    problem: str | None
    head_id: int | None
    head_hash: str | None
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """The chain is intact and the expected head, if any, is still there unchanged."""
        return not self.problems


def verify_audit(
    database: Database, caller: Caller, *, expect_head: tuple[int, str] | None = None
) -> ChainVerification:
    """Verify every row of the audit trail (seconds per million rows), and that the row
    ``expect_head`` = (id, row_hash) noted earlier is still there unchanged (a truncation of the
    newest rows is otherwise invisible). Recorded as 110101, and 110113 when broken."""
    with database.reading() as session:
        head = chain_head(session=session)  # first: every row up to it is verified below
        report = verify_chain(session=session)
        anchor = None if expect_head is None else session.get(AuditEvent, expect_head[0])
        anchor_hash = None if anchor is None else anchor.row_hash
    problems: list[str] = []
    if not report.intact:
        problems.append(f"audit trail BROKEN at row {report.first_bad_id}: {report.problem}")
    if expect_head is not None:
        if anchor_hash is None:
            problems.append(
                f"row {expect_head[0]} (the expected head) is gone: the newest rows were deleted"
            )
        elif anchor_hash != expect_head[1]:
            problems.append(f"row {expect_head[0]} no longer has the expected hash: rewritten")
    with database.transaction() as session:
        record_verification(
            session=session,
            report=report,
            actor=caller.actor,
            remote_address=caller.remote_address,
            detail=caller.detail(
                expect_head=None if expect_head is None else f"{expect_head[0]}:{expect_head[1]}",
                head_id=None if head is None else head[0],
            ),
        )
    return ChainVerification(
        intact=report.intact,
        rows_checked=report.rows_checked,
        first_bad_id=report.first_bad_id,
        problem=report.problem,
        head_id=None if head is None else head[0],
        head_hash=None if head is None else head[1],
        problems=tuple(problems),
    )


@dataclass(frozen=True)
class LastVerification:
    """The newest recorded verification of the chain (a 110101 event of a verify)."""

    at: datetime
    actor: str
    intact: bool
    rows_checked: int | None
    first_bad_id: int | None


def last_verification(database: Database) -> LastVerification | None:
    """When the chain was last verified, by whom, and what was found; ``None`` if never.

    It is read from the trail itself: the verification's own 110101 event, whose detail holds
    the outcome (and which the chain protects like any other row).
    """
    query = (
        select(AuditEvent.occurred_at, AuditEvent.actor, AuditEvent.detail)
        .where(AuditEvent.event_id == str(AuditEventId.AUDIT_LOG_USED))
        .where(AuditEvent.detail.like('%"intact": %'))
        .order_by(AuditEvent.id.desc())
        .limit(1)
    )
    with database.reading() as session:
        row = session.execute(query).first()
    if row is None:
        return None
    try:
        detail = json.loads(row.detail or "{}")
    except ValueError:
        return None
    return LastVerification(
        at=row.occurred_at,
        actor=row.actor,
        intact=bool(detail.get("intact")),
        rows_checked=detail.get("rows_checked"),
        first_bad_id=detail.get("first_bad_id"),
    )


@dataclass
class AuditExport:
    """An export being written: its text chunks, and how many rows they held so far."""

    chunks: Iterator[str]
    rows: int = 0


@contextmanager
def audit_export(
    database: Database,
    caller: Caller,
    filters: AuditFilter,
    fmt: ExportFormat,
    *,
    audit_source_id: str,
    raw_csv: bool = False,
    **detail: Any,
) -> Iterator[AuditExport]:
    """Stream every matching event, oldest first, as ``fmt`` (see
    :func:`pacsai.db.audit_export.export_records`).

    The export is recorded as 110101 when the ``with`` block ends: outcome 0 with the row count
    if it ended normally, 8 (serious failure) if it raised (a write that failed, a client that
    went away). The chunks must be consumed inside the block.
    """

    def counted(records: Iterator[AuditRecord]) -> Iterator[AuditRecord]:
        for item in records:
            export.rows += 1
            yield item

    export = AuditExport(chunks=iter(()))
    completed = False
    try:
        with database.reading() as session:
            export.chunks = export_records(
                counted(iter_records(session=session, filters=filters)),
                fmt,
                audit_source_id=audit_source_id,
                raw_csv=raw_csv,
            )
            yield export
        completed = True
    finally:
        with database.transaction() as session:
            record_audit_use(
                session=session,
                actor=caller.actor,
                remote_address=caller.remote_address,
                filters=filters,
                outcome=AuditOutcome.SUCCESS if completed else AuditOutcome.SERIOUS_FAILURE,
                detail=caller.detail(**detail, format=fmt, raw=raw_csv, rows=export.rows),
            )


def stream_audit_export(
    database: Database,
    caller: Caller,
    filters: AuditFilter,
    fmt: ExportFormat,
    *,
    audit_source_id: str,
    raw_csv: bool = False,
    **detail: Any,
) -> Iterator[str]:
    """:func:`audit_export` as one iterator of chunks, for an HTTP response: recorded once the
    last chunk is taken, or as a failure if the iterator is closed early."""
    with audit_export(
        database,
        caller,
        filters,
        fmt,
        audit_source_id=audit_source_id,
        raw_csv=raw_csv,
        **detail,
    ) as export:
        yield from export.chunks
