"""Retrieving studies from a PACS, as `pacsai retrieve` and ``POST /retrieve`` do it.

:func:`start_retrieval` checks the request (the source is known, the criteria make a query)
and records it in the retrievals table as RUNNING, audited as the use of a restricted function
(110100 / 110132). :func:`run_retrieval` then lists the studies (C-FIND), fetches each (C-MOVE to
this node's AE title, or C-GET through the receive path) and writes the progress of each study
to the row as the PACS reports it, ending SUCCEEDED or FAILED with the DIMSE status of each
study that failed. It is audited by :func:`pacsai.retrieve.audit_retrieval`: the query (110112)
and one Import (110107) per study. The CLI runs both in the foreground; the API answers 202
after :func:`start_retrieval` and runs :func:`run_retrieval` in a thread.

:func:`get_retrieval` and :func:`list_retrievals` read them back (audited, 110112): a retrieval
left RUNNING by a process that no longer runs on this host is shown, and recorded, INTERRUPTED.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from pacsai.config import Settings
from pacsai.db import (
    AuditEventId,
    AuditEventType,
    AuditOutcome,
    Database,
    Retrieval,
    RetrievalStatus,
    utcnow,
)
from pacsai.errors import ConfigError, PacsaiError
from pacsai.jobs.identity import host_name, process_alive
from pacsai.operations._audit import record
from pacsai.operations._paging import check_limit
from pacsai.operations.caller import Caller
from pacsai.operations.errors import InvalidRequestError, NotFoundError

__all__ = [
    "RetrievalOut",
    "RetrieveRequest",
    "StudyProgress",
    "abandon_retrieval",
    "get_retrieval",
    "list_retrievals",
    "run_retrieval",
    "start_retrieval",
]

log = logging.getLogger(__name__)

_PROGRESS_EVERY = 0.5  # seconds between writes of a study's progress to the row
_TEXT = r"^[^\\*?\x00-\x1f\x7f]+$"  # one value (no wildcard, no backslash), no control characters


class RetrieveRequest(BaseModel):
    """What to retrieve from which PACS; the criteria given are combined (all must match)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        min_length=1,
        max_length=128,
        description="A name under sources:, a DICOM destination, or AET@HOST:PORT",
    )
    accession: str | None = Field(
        default=None, max_length=64, pattern=_TEXT, description="Accession number"
    )
    study_uid: str | None = Field(
        default=None, max_length=64, pattern=r"^[0-9.]+$", description="Study Instance UID"
    )
    patient_id: str | None = Field(
        default=None, max_length=64, pattern=_TEXT, description="Patient ID"
    )
    since: date | None = Field(default=None, description="Studies from this date on")
    until: date | None = Field(default=None, description="Studies up to this date")
    modality: str | None = Field(
        default=None, max_length=16, pattern=r"^[A-Za-z0-9_]+$", description="e.g. CT"
    )
    method: Literal["move", "get"] | None = Field(
        default=None, description="C-MOVE or C-GET; null: the source's retrieve: setting"
    )
    move_to: str | None = Field(
        default=None,
        pattern=r"^[\x20-\x5b\x5d-\x7e]*[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]*$",
        max_length=16,
        description="AE title to C-MOVE to (default node.ae_title)",
    )
    dry_run: bool = Field(default=False, description="List what would be retrieved, and stop")

    def criteria(self) -> dict[str, Any]:
        """The criteria given, as recorded (JSON-ready)."""
        values = {
            "accession": self.accession,
            "study_uid": self.study_uid,
            "patient_id": self.patient_id,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "modality": self.modality.upper() if self.modality else None,
        }
        return {name: value for name, value in values.items() if value is not None}


class StudyProgress(BaseModel):
    """How the retrieval of one study found on the PACS goes (no patient name)."""

    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    study_date: str | None
    modalities: list[str]
    expected: int | None = Field(description="Instances the PACS listed for the study")
    state: Literal["waiting", "retrieving", "retrieved", "failed"]
    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int | None = None
    dimse_status: str | None = Field(
        default=None, description="The final DIMSE status, e.g. 0x0000 Success, 0xA801 ..."
    )
    error: str | None = None


class RetrievalOut(BaseModel):
    """A retrieval: what was asked, of which PACS, and how each study went."""

    model_config = ConfigDict(frozen=True)

    id: int
    status: RetrievalStatus
    source: str
    method: str
    criteria: dict[str, Any]
    dry_run: bool
    actor: str
    found: int | None = Field(description="Studies the C-FIND listed (null: not asked yet)")
    retrieved: int = Field(description="Studies retrieved completely")
    studies: list[StudyProgress]
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


def _out(row: Retrieval) -> RetrievalOut:
    studies = [StudyProgress(**item) for item in json.loads(row.studies or "[]")]
    return RetrievalOut(
        id=row.id,
        status=row.status,
        source=row.source,
        method=row.method,
        criteria=json.loads(row.criteria or "{}"),
        dry_run=row.dry_run,
        actor=row.actor,
        found=row.found,
        retrieved=sum(1 for s in studies if s.state == "retrieved"),
        studies=studies,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
    )


def _plan(
    settings: Settings, request: RetrieveRequest, *, any_address: bool = False
) -> tuple[str, Any, Any]:
    """(source name, Source, StudyQuery) of ``request``; ``AET@HOST:PORT`` only with
    ``any_address`` (the CLI's), else a configured source or DICOM destination.

    Raises
    ------
    InvalidRequestError
        If the source is unknown or the criteria do not make a query.
    """
    from pacsai.retrieve import StudyQuery, resolve_source

    configured = request.source in settings.sources or request.source in (
        settings.dicom_destinations
    )
    if not any_address and not configured:
        known = sorted(settings.sources) + sorted(settings.dicom_destinations)
        raise InvalidRequestError(
            f"{request.source!r} is not under sources: or a DICOM destination"
            + (f" (known: {', '.join(known)})" if known else "")
            + "; a PACS is retrieved from here only once it is configured"
        )
    try:
        name, source = resolve_source(settings, request.source)
    except (ConfigError, ValueError) as exc:
        raise InvalidRequestError(str(exc)) from exc
    if request.method is not None:
        source = source.model_copy(update={"retrieve": request.method})
    try:
        query = StudyQuery(
            accession_number=request.accession,
            study_instance_uid=request.study_uid,
            patient_id=request.patient_id,
            since=request.since,
            until=request.until,
            modality=request.modality.upper() if request.modality else None,
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    return name, source, query


def start_retrieval(
    database: Database,
    settings: Settings,
    caller: Caller,
    request: RetrieveRequest,
    *,
    any_address: bool = False,
) -> RetrievalOut:
    """Record a retrieval as RUNNING once its request checks out; audited (110100, 110132).

    ``any_address``: the source may also be ``AET@HOST:PORT`` (for a person at the node's
    command line; the API retrieves from configured PACSs only).

    Raises
    ------
    InvalidRequestError
        If the source is unknown or the criteria do not make a query.
    """
    name, source, query = _plan(settings, request, any_address=any_address)
    now = utcnow()
    with database.transaction() as session:
        row = Retrieval(
            status=RetrievalStatus.RUNNING,
            source=name,
            method=source.retrieve,
            criteria=json.dumps(request.criteria(), sort_keys=True),
            dry_run=request.dry_run,
            actor=caller.actor,
            remote_address=caller.remote_address,
            host=host_name(),
            pid=os.getpid(),
            studies="[]",
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        session.flush()
        record(
            caller,
            session=session,
            event_id=AuditEventId.APPLICATION_ACTIVITY,
            event_type=AuditEventType.USE_OF_RESTRICTED_FUNCTION,
            detail={
                "activity": "retrieve from a PACS",
                "retrieval_id": row.id,
                "source": name,
                "method": source.retrieve,
                "criteria": query.describe(),
                "dry_run": request.dry_run,
            },
        )
        out = _out(row)
    return out


class _Progress:
    """The per-study progress of one retrieval, written to its row (at most every half second
    per study, and at each study's end)."""

    def __init__(self, database: Database, retrieval_id: int, found: list[Any]) -> None:
        self.database = database
        self.retrieval_id = retrieval_id
        self.studies: dict[str, StudyProgress] = {
            study.study_instance_uid: StudyProgress(
                study_instance_uid=study.study_instance_uid,
                accession_number=study.accession_number,
                patient_id=study.patient_id,
                study_date=study.study_date,
                modalities=list(study.modalities),
                expected=study.instances,
                state="waiting",
            )
            for study in found
        }
        self._written = 0.0
        self._lock = threading.Lock()

    def update(self, retrieval: Any, *, final: bool = False) -> None:
        from pacsai.retrieve import describe_status

        uid = retrieval.study.study_instance_uid
        if final:
            state: Literal["retrieving", "retrieved", "failed"] = (
                "retrieved" if retrieval.succeeded else "failed"
            )
        else:
            state = "retrieving"
        self.studies[uid] = self.studies[uid].model_copy(
            update={
                "state": state,
                "completed": retrieval.completed or retrieval.stored,
                "failed": retrieval.failed,
                "warning": retrieval.warning,
                "remaining": retrieval.remaining,
                "dimse_status": (
                    None
                    if not final or retrieval.status is None
                    else describe_status(retrieval.status)
                ),
                "error": None if not final or retrieval.succeeded else retrieval.status_text,
            }
        )
        now = time.monotonic()
        if final or now - self._written >= _PROGRESS_EVERY:
            self._written = now
            self.write()

    def write(self, **values: Any) -> None:
        with self._lock, self.database.transaction() as session:
            row = session.get(Retrieval, self.retrieval_id)
            assert row is not None
            row.studies = json.dumps([s.model_dump() for s in self.studies.values()])
            row.updated_at = utcnow()
            for name, value in values.items():
                setattr(row, name, value)


def run_retrieval(
    database: Database,
    settings: Settings,
    caller: Caller,
    retrieval_id: int,
    request: RetrieveRequest,
    *,
    on_found: Callable[[list[Any]], None] | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> RetrievalOut:
    """Run the retrieval ``start_retrieval`` recorded: C-FIND, then C-MOVE or C-GET of each
    study found, writing the progress of each study to its row. Never raises for the PACS: a
    failure ends the retrieval FAILED with the reason (and each study's DIMSE status).

    ``on_found`` is called with the studies found (:class:`pacsai.retrieve.FoundStudy`), and
    ``on_progress`` with each pending response (:class:`pacsai.retrieve.StudyRetrieval`), for
    a front end that shows them as they come.
    """
    from pacsai.retrieve import (
        RetrieveError,
        audit_retrieval,
        find_studies,
        retrieve_studies,
    )

    name, source, query = _plan(settings, request, any_address=True)  # checked when started
    progress = _Progress(database, retrieval_id, [])
    calling = settings.node.ae_title
    try:
        found = find_studies(source, query, calling_ae_title=calling)
    except PacsaiError as exc:
        record(
            caller,
            database=database,
            outcome=AuditOutcome.SERIOUS_FAILURE,
            detail={"what": "C-FIND of a PACS, to retrieve", "source": name, "error": str(exc)},
        )
        return _finish(database, progress, RetrievalStatus.FAILED, str(exc), found=None)
    progress = _Progress(database, retrieval_id, found)
    progress.write(found=len(found))
    if on_found is not None:
        on_found(found)
    audit = {
        "actor": caller.actor,
        "source_name": name,
        "source": source,
        "query": query,
        "found": found,
    }
    if not found:
        audit_retrieval(database, retrievals=[], **audit)
        message = f"nothing found on {name} for {query.describe()}"
        return _finish(database, progress, RetrievalStatus.FAILED, message, found=0)
    if request.dry_run:
        audit_retrieval(database, retrievals=[], **audit)
        return _finish(database, progress, RetrievalStatus.SUCCEEDED, None, found=len(found))

    def pending(retrieval: Any) -> None:
        progress.update(retrieval)
        if on_progress is not None:
            on_progress(retrieval)

    instances = None
    if source.retrieve == "get":
        from pacsai.scp import InstanceStore, Spool

        spool = Spool(
            settings.storage.spool_dir, min_free_bytes=settings.storage.min_free_mb * 2**20
        )
        instances = InstanceStore(database=database, spool=spool)
    try:
        results = retrieve_studies(
            source,
            found,
            calling_ae_title=calling,
            move_destination=request.move_to or settings.node.ae_title,
            instances=instances,
            quiet_seconds=settings.node.study_quiet_seconds,
            on_progress=pending,
        )
    except RetrieveError as exc:
        audit_retrieval(database, retrievals=[], **audit)
        return _finish(database, progress, RetrievalStatus.FAILED, str(exc), found=len(found))
    for retrieval in results:
        progress.update(retrieval, final=True)
    audit_retrieval(database, retrievals=results, **audit)
    failed = [r for r in results if not r.succeeded]
    error = f"{len(failed)} of {len(results)} studies not retrieved" if failed else None
    status = RetrievalStatus.FAILED if failed else RetrievalStatus.SUCCEEDED
    return _finish(database, progress, status, error, found=len(found))


def _finish(
    database: Database,
    progress: _Progress,
    status: RetrievalStatus,
    error: str | None,
    *,
    found: int | None,
) -> RetrievalOut:
    progress.write(status=status, error=error, found=found, finished_at=utcnow())
    with database.reading() as session:
        row = session.get(Retrieval, progress.retrieval_id)
        assert row is not None
        out = _out(row)
    log.info(
        "retrieval %d from %s: %s%s",
        out.id,
        out.source,
        status.value,
        f" ({error})" if error else "",
        extra={"action": "retrieval", "retrieval_id": out.id, "status": status.value},
    )
    return out


def abandon_retrieval(database: Database, retrieval_id: int, reason: str) -> None:
    """End a RUNNING retrieval FAILED with ``reason``: what runs it met an error it could not
    report otherwise."""
    with database.transaction() as session:
        row = session.get(Retrieval, retrieval_id)
        if row is not None and row.status is RetrievalStatus.RUNNING:
            row.status = RetrievalStatus.FAILED
            row.error = reason
            row.finished_at = row.updated_at = utcnow()


def _mark_interrupted(row: Retrieval) -> bool:
    """Mark ``row`` INTERRUPTED if the process running it is gone from this host."""
    if row.status is not RetrievalStatus.RUNNING or row.host != host_name():
        return False
    if row.pid == os.getpid() or process_alive(row.pid):
        return False
    row.status = RetrievalStatus.INTERRUPTED
    row.error = f"the process running it (pid {row.pid}) stopped before it ended; start it again"
    row.finished_at = utcnow()
    return True


def _read(database: Database, query: Any) -> list[RetrievalOut]:
    with database.transaction() as session:
        rows = list(session.scalars(query))
        for row in rows:
            _mark_interrupted(row)
        session.flush()
        return [_out(row) for row in rows]


def get_retrieval(database: Database, caller: Caller, retrieval_id: int) -> RetrievalOut:
    """One retrieval with the progress of each study; audited (110112) with the studies.

    Raises
    ------
    NotFoundError
        If there is no such retrieval.
    """
    found = _read(database, select(Retrieval).where(Retrieval.id == retrieval_id))
    if not found:
        raise NotFoundError(f"no retrieval {retrieval_id} on this node")
    out = found[0]
    _audit_read(database, caller, [out])
    return out


def list_retrievals(database: Database, caller: Caller, *, limit: int = 50) -> list[RetrievalOut]:
    """The newest retrievals; audited (110112) with the studies they name.

    Raises
    ------
    InvalidRequestError
        If ``limit`` is not valid.
    """
    size = check_limit(limit)
    outs = _read(database, select(Retrieval).order_by(Retrieval.id.desc()).limit(size))
    _audit_read(database, caller, outs)
    return outs


def _audit_read(database: Database, caller: Caller, outs: list[RetrievalOut]) -> None:
    studies = sorted({s.study_instance_uid for out in outs for s in out.studies})
    patients = {s.patient_id for out in outs for s in out.studies}
    single = len(studies) == 1
    record(
        caller,
        database=database,
        study_instance_uid=studies[0] if single else None,
        patient_id=next(iter(patients)) if single and len(patients) == 1 else None,
        detail={"retrievals": [out.id for out in outs], "studies": studies},
    )
