"""Reading the audit trail: filters, keyset pagination and streaming over ``audit_events``.

Rows are returned in chain order (``id``), newest first by default. Pages are cut with a keyset
(``id < last id seen``) rather than an offset, so a page never repeats or skips a row however many
events are appended while someone pages through: appends always take a higher id than any row
already committed (they are serialised by the chain lock, see :mod:`pacsai.db.audit`).

The cursor handed out with a page is opaque to callers: URL-safe base64 of the last id, the
direction and a fingerprint of the filters, so that a cursor replayed with other filters is
refused instead of silently returning a mixture.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import Session

from pacsai.db._audit_record import AUDIT_COLUMNS, AuditRecord
from pacsai.db.audit import AuditAction, AuditEventId, AuditOutcome, ChainReport, append_event
from pacsai.db.models import AuditEvent
from pacsai.errors import PacsaiError

__all__ = [
    "MAX_PAGE_SIZE",
    "OUTCOMES",
    "AuditFilter",
    "AuditPage",
    "AuditQueryError",
    "AuditRecord",
    "build_query",
    "chain_head",
    "decode_cursor",
    "encode_cursor",
    "iter_records",
    "parse_time",
    "query_events",
    "record_audit_use",
    "record_verification",
]

#: The largest page :func:`query_events` hands out.
MAX_PAGE_SIZE: Final = 1000
#: PS3.15 EventOutcomeIndicator values.
OUTCOMES: Final = (0, 4, 8, 12)
_CURSOR_VERSION: Final = 1
_MAX_ID: Final = 2**63 - 1
_CURSOR: Final = re.compile(
    r"a1\.(?P<order>[no])\.(?P<id>0|[1-9][0-9]{0,18})\.(?P<fp>[0-9a-f]{12})"
)
_CONTROL = {chr(c) for c in range(32)} | {"\x7f"}


class AuditQueryError(PacsaiError, ValueError):
    """A filter value or a cursor that cannot be used; the message says which and why."""


def _text(name: str, value: str | None, max_length: int) -> str | None:
    if value is None:
        return None
    if not value or len(value) > max_length or any(c in _CONTROL for c in value):
        raise AuditQueryError(
            f"{name} must be 1 to {max_length} characters without control characters, "
            f"got {value[:80]!r}"
        )
    return value


def _code(name: str, value: str) -> str:
    if not (value.isascii() and value.isdigit() and 1 <= len(value) <= 16):
        raise AuditQueryError(
            f"{name} must be a DCM code value (digits, e.g. 110104), got {value!r}"
        )
    return value


def _aware(name: str, value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise AuditQueryError(f"{name} must carry a time zone (a naive time is ambiguous)")
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise AuditQueryError(f"{name} is out of range: {exc}") from exc


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Conditions an audit row must meet; all given ones must hold, a tuple matches any item.

    Parameters
    ----------
    event_ids
        DCM event ID code values (PS3.15 A.5.3), e.g. ``("110104", "110106")``.
    event_types
        DCM event type code values, e.g. ``("110120",)``.
    actor
        Exact actor: an AE title, ``api:<user>`` or ``cli:<os user>``.
    patient_id, study_instance_uid
        Exact identifiers.
    outcomes
        EventOutcomeIndicator values among 0, 4, 8 and 12.
    since, until
        Aware datetimes: ``since <= occurred_at < until``.

    Raises
    ------
    AuditQueryError
        If a value is malformed (control characters, too long, not a DCM code, an unknown
        outcome, a naive or out-of-range time).
    """

    event_ids: tuple[str, ...] = ()
    event_types: tuple[str, ...] = ()
    actor: str | None = None
    patient_id: str | None = None
    study_instance_uid: str | None = None
    outcomes: tuple[int, ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "event_ids", tuple(_code("event_id", v) for v in self.event_ids))
        set_(self, "event_types", tuple(_code("event_type", v) for v in self.event_types))
        set_(self, "actor", _text("actor", self.actor, 128))
        set_(self, "patient_id", _text("patient_id", self.patient_id, 64))
        set_(self, "study_instance_uid", _text("study_uid", self.study_instance_uid, 64))
        for outcome in self.outcomes:
            if isinstance(outcome, bool) or outcome not in OUTCOMES:
                raise AuditQueryError(f"outcome must be one of 0, 4, 8, 12; got {outcome!r}")
        set_(self, "since", _aware("since", self.since))
        set_(self, "until", _aware("until", self.until))

    def as_dict(self) -> dict[str, Any]:
        """The conditions that are set, JSON-ready (for audit details and cursor fingerprints)."""
        data: dict[str, Any] = {
            "event_id": list(self.event_ids),
            "event_type": list(self.event_types),
            "actor": self.actor,
            "patient_id": self.patient_id,
            "study_uid": self.study_instance_uid,
            "outcome": list(self.outcomes),
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
        }
        return {key: value for key, value in data.items() if value not in (None, [])}

    def conditions(self) -> list[ColumnElement[bool]]:
        """The SQL conditions (each served by an index of ``audit_events``)."""
        where: list[ColumnElement[bool]] = []
        if self.event_ids:
            where.append(AuditEvent.event_id.in_(self.event_ids))
        if self.event_types:
            where.append(AuditEvent.event_type.in_(self.event_types))
        if self.actor is not None:
            where.append(AuditEvent.actor == self.actor)
        if self.patient_id is not None:
            where.append(AuditEvent.patient_id == self.patient_id)
        if self.study_instance_uid is not None:
            where.append(AuditEvent.study_instance_uid == self.study_instance_uid)
        if self.outcomes:
            where.append(AuditEvent.outcome.in_(self.outcomes))
        if self.since is not None:
            where.append(AuditEvent.occurred_at >= self.since)
        if self.until is not None:
            where.append(AuditEvent.occurred_at < self.until)
        return where

    def fingerprint(self) -> str:
        """A short digest of the filters, carried in cursors."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def parse_time(value: str) -> datetime:
    """Parse an ISO 8601 date or date-time; one without a zone is taken as UTC.

    Raises
    ------
    AuditQueryError
        If `value` is not ISO 8601.
    """
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise AuditQueryError(
            f"{value!r} is not an ISO 8601 time (e.g. 2026-01-31 or 2026-01-31T08:00:00+01:00)"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    aware = _aware("time", parsed)
    assert aware is not None
    return aware


def encode_cursor(last_id: int, *, newest_first: bool, filters: AuditFilter) -> str:
    """The opaque cursor that continues after row `last_id` (at most 60 characters)."""
    raw = f"a{_CURSOR_VERSION}.{'n' if newest_first else 'o'}.{last_id}.{filters.fingerprint()}"
    return base64.urlsafe_b64encode(raw.encode("ascii")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str, *, newest_first: bool, filters: AuditFilter) -> int:
    """The row id a cursor continues after.

    Raises
    ------
    AuditQueryError
        If the cursor is malformed, or was issued for other filters or the other direction.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    match = _CURSOR.fullmatch(raw)
    if match is None or int(match.group("id")) > _MAX_ID:
        raise AuditQueryError("the cursor is malformed: pass the next_cursor of a page as it is")
    if (match.group("order") == "n") is not newest_first or match.group(
        "fp"
    ) != filters.fingerprint():
        raise AuditQueryError(
            "the cursor belongs to a query with other filters or order: repeat those, "
            "or start again without a cursor"
        )
    return int(match.group("id"))


def build_query(
    filters: AuditFilter, *, limit: int, after_id: int | None = None, newest_first: bool = True
) -> Select[Any]:
    """The SELECT of one page: the filters, the keyset condition, chain order and a limit."""
    stmt = select(*AUDIT_COLUMNS).where(*filters.conditions())
    if after_id is not None:
        stmt = stmt.where(AuditEvent.id < after_id if newest_first else AuditEvent.id > after_id)
    order = AuditEvent.id.desc() if newest_first else AuditEvent.id.asc()
    return stmt.order_by(order).limit(limit)


@dataclass(frozen=True, slots=True)
class AuditPage:
    """A page of audit rows and the cursor of the next page (``None`` on the last page)."""

    records: list[AuditRecord]
    next_cursor: str | None


def query_events(
    *,
    session: Session,
    filters: AuditFilter | None = None,
    limit: int = 50,
    cursor: str | None = None,
    newest_first: bool = True,
) -> AuditPage:
    """One page of the audit rows that meet `filters`, in chain order.

    Parameters
    ----------
    session
        A session (a reading one is enough).
    filters
        The conditions; ``None`` for every row.
    limit
        Rows per page, 1 to :data:`MAX_PAGE_SIZE`.
    cursor
        The ``next_cursor`` of the previous page, issued for the same filters and order.
    newest_first
        Newest rows first (default) or oldest first.

    Raises
    ------
    AuditQueryError
        If `limit` is out of range, or the cursor is malformed or belongs to other filters.
    """
    filters = filters or AuditFilter()
    if isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise AuditQueryError(f"limit must be 1 to {MAX_PAGE_SIZE}, got {limit!r}")
    after_id = (
        None
        if cursor is None
        else decode_cursor(cursor, newest_first=newest_first, filters=filters)
    )
    stmt = build_query(filters, limit=limit + 1, after_id=after_id, newest_first=newest_first)
    rows = session.execute(stmt).all()
    records = [AuditRecord.from_row(row) for row in rows[:limit]]
    more = len(rows) > limit
    next_cursor = (
        encode_cursor(records[-1].id, newest_first=newest_first, filters=filters) if more else None
    )
    return AuditPage(records, next_cursor)


def iter_records(
    *,
    session: Session,
    filters: AuditFilter | None = None,
    newest_first: bool = False,
    batch_size: int = 2000,
) -> Iterator[AuditRecord]:
    """Every row that meets `filters`, streamed in keyset batches (oldest first by default).

    Memory stays at one batch however many rows match; the session must stay open while the
    iterator is consumed.
    """
    filters = filters or AuditFilter()
    after_id: int | None = None
    while True:
        stmt = build_query(filters, limit=batch_size, after_id=after_id, newest_first=newest_first)
        rows = session.execute(stmt).all()
        for row in rows:
            yield AuditRecord.from_row(row)
        if len(rows) < batch_size:
            return
        after_id = rows[-1].id


def chain_head(*, session: Session) -> tuple[int, str] | None:
    """The id and ``row_hash`` of the newest row, or ``None`` for an empty trail.

    Verification cannot tell a trail whose newest rows were deleted from one that never had
    them; a head noted down (or forwarded to a collector) earlier and checked later can.
    """
    row = session.execute(
        select(AuditEvent.id, AuditEvent.row_hash).order_by(AuditEvent.id.desc()).limit(1)
    ).first()
    return None if row is None else (row.id, row.row_hash)


def record_audit_use(
    *,
    session: Session,
    actor: str,
    remote_address: str | None,
    detail: dict[str, Any],
    filters: AuditFilter | None = None,
    outcome: AuditOutcome = AuditOutcome.SUCCESS,
) -> None:
    """Append the 110101 Audit Log Used event of one read of the trail (PS3.15 A.5.3.2).

    The patient and study the read was restricted to, if any, are recorded as the event's, so
    that "who looked at this patient" finds reads of the audit trail too.
    """
    filters = filters or AuditFilter()
    append_event(
        session=session,
        event_id=AuditEventId.AUDIT_LOG_USED,
        action=AuditAction.READ,
        outcome=outcome,
        actor=actor,
        remote_address=remote_address,
        study_instance_uid=filters.study_instance_uid,
        patient_id=filters.patient_id,
        detail={**detail, "filters": filters.as_dict()} if filters.as_dict() else detail,
    )


def record_verification(
    *,
    session: Session,
    report: ChainReport,
    actor: str,
    remote_address: str | None,
    detail: dict[str, Any],
) -> None:
    """Append the 110101 event of a verification and, if the chain is broken, a 110113
    Security Alert naming the first bad row."""
    outcome = {
        "intact": report.intact,
        "rows_checked": report.rows_checked,
        "first_bad_id": report.first_bad_id,
    }
    record_audit_use(
        session=session, actor=actor, remote_address=remote_address, detail={**detail, **outcome}
    )
    if not report.intact:
        append_event(
            session=session,
            event_id=AuditEventId.SECURITY_ALERT,
            action=AuditAction.EXECUTE,
            outcome=AuditOutcome.SERIOUS_FAILURE,
            actor=actor,
            remote_address=remote_address,
            detail={**detail, **outcome, "reason": report.problem},
        )
