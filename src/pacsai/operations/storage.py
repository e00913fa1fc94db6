"""The storage lifecycle: removing the files of finished studies, by age, for space, or asked.

Three ways in, one way out (:func:`_purge_one`):

* :func:`purge_studies`: `pacsai studies purge --older-than ... [--study UID] [--dry-run]`
  (and later the console): everything of the studies asked for, audited by the person asking;
* :func:`apply_retention`: the age rules of ``storage.retention``, run by the node;
* :func:`reclaim_space`: the oldest finished studies first, until the spool's filesystem has
  ``storage.high_water_mb`` free again; run by the node in the background, and before a C-STORE
  would be refused for ``storage.min_free_mb``.

Only finished studies lose anything (:func:`pacsai.db.retention.purgeable`). Each study purged
gets one 110105 DICOM Study Deleted event (action D), naming the study and patient and what was
removed: instances per series with their size, the results and the SOP Instance UIDs of the
result objects whose files went. The rows of the study, its series, jobs, results, result
objects and deliveries stay (findings, what was sent where), marked ``purged_at``; a study sent
again is received as usual and clears its mark.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from pacsai.config import Settings
from pacsai.db import AuditAction, AuditEventId, AuditOutcome, Database, Study, utcnow
from pacsai.db.retention import (
    PurgeCandidate,
    PurgeRule,
    StudyPurge,
    purge_candidates,
    purge_study,
    why_kept,
)
from pacsai.operations._audit import record, record_list
from pacsai.operations.caller import Caller
from pacsai.operations.errors import InvalidRequestError
from pacsai.operations.result_objects import kept_beside
from pacsai.storage import SharedDirectory

__all__ = [
    "KeptStudy",
    "PurgeReport",
    "StudyRemoval",
    "apply_retention",
    "purge_studies",
    "reclaim_space",
]

log = logging.getLogger(__name__)

_BATCH = 50  # candidates read at a time
_LISTED = 200  # SOP Instance UIDs of result objects named in one audit event


class StudyRemoval(BaseModel):
    """What was removed of one study (or would be, in a dry run)."""

    model_config = ConfigDict(frozen=True)

    study_instance_uid: str
    last_received_at: datetime
    instances: int = Field(description="Received instances removed (files and rows)")
    instance_bytes: int = Field(description="Their size as received")
    results: int = Field(description="Results whose files were removed (rows kept)")
    result_bytes: int = Field(default=0, description="Size of the result files removed")


class KeptStudy(BaseModel):
    """A study that was asked for by UID and not purged, with why."""

    model_config = ConfigDict(frozen=True)

    study_instance_uid: str
    reason: str


class PurgeReport(BaseModel):
    """What one purge did (or, with ``dry_run``, would do)."""

    reason: str = Field(description="The rule that chose the studies")
    dry_run: bool = False
    removed: list[StudyRemoval] = Field(default_factory=list)
    kept: list[KeptStudy] = Field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Bytes removed (or that would be), instances and results together."""
        return sum(s.instance_bytes + s.result_bytes for s in self.removed)


def _days(value: float) -> timedelta:
    return timedelta(days=value)


def _describe(age: timedelta) -> str:
    if age % timedelta(days=1) == timedelta(0):
        return f"{age.days} days"
    if age % timedelta(hours=1) == timedelta(0):
        return f"{int(age.total_seconds() // 3600)} hours"
    return str(age)


def _removal(candidate: PurgeCandidate) -> StudyRemoval:
    return StudyRemoval(
        study_instance_uid=candidate.study_instance_uid,
        last_received_at=candidate.last_received_at,
        instances=candidate.instances,
        instance_bytes=candidate.instance_bytes,
        results=candidate.results,
    )


def _detail(purge: StudyPurge, *, reason: str, result_bytes: int, failed: list[str]) -> Any:
    detail: dict[str, Any] = {"what": "study files removed from this node", "reason": reason}
    if purge.instance_paths:
        detail["instances"] = {
            "count": len(purge.instance_paths),
            "bytes": purge.instance_bytes,
            "series": [
                {"series_instance_uid": uid, "modality": modality, "instances": count}
                for uid, modality, count in purge.series
            ],
        }
    if purge.result_ids:
        detail["results"] = {
            "job_ids": purge.job_ids,
            "result_ids": purge.result_ids,
            "bytes": result_bytes,
            "objects": [
                {"kind": o.kind, "sop_instance_uid": o.sop_instance_uid}
                for o in purge.objects[:_LISTED]
            ],
        }
    if failed:
        detail["not_removed"] = failed[:_LISTED]
    detail["kept"] = "rows of the study, its series, jobs, results and deliveries"
    return detail


def _purge_one(
    database: Database,
    settings: Settings,
    caller: Caller,
    candidate: PurgeCandidate,
    rule: PurgeRule,
    reason: str,
) -> StudyRemoval | None:
    """Purge one study under ``rule``: rows and result files in one transaction with its audit
    event, then the spool files; ``None`` if it was busy or nothing was due any more."""
    results_dir = Path(settings.storage.results_dir)
    results = SharedDirectory(results_dir)
    with database.transaction() as session:
        purge = purge_study(session=session, study_id=candidate.study_id, rule=rule)
        if purge is None:
            return None
        keys = list(purge.result_paths) + [o.path for o in purge.objects]
        for obj in purge.objects:
            keys += kept_beside(results_dir, obj.object_id)
        # Before the commit, under the study's lock: a re-run of the job cannot write these
        # names meanwhile. A crash leaves the results unmarked: the next purge removes them.
        removed = results.remove(keys)
        record(
            caller,
            session=session,
            event_id=AuditEventId.STUDY_DELETED,
            action=AuditAction.DELETE,
            outcome=AuditOutcome.MINOR_FAILURE if removed.failed else AuditOutcome.SUCCESS,
            study_instance_uid=purge.study_instance_uid,
            patient_id=purge.patient_id,
            detail=_detail(purge, reason=reason, result_bytes=removed.bytes, failed=removed.failed),
        )
    # After the commit: no committed row points at these any more. What cannot be removed now
    # (or after a crash) is removed by the spool sweep.
    spool = SharedDirectory(Path(settings.storage.spool_dir)).remove(purge.instance_paths)
    if spool.failed:
        log.error(
            "purge of study %s: %d spool files could not be removed (the sweep tries again)",
            purge.study_instance_uid,
            len(spool.failed),
        )
    return StudyRemoval(
        study_instance_uid=purge.study_instance_uid,
        last_received_at=candidate.last_received_at,
        instances=len(purge.instance_paths),
        instance_bytes=purge.instance_bytes,
        results=len(purge.result_ids),
        result_bytes=removed.bytes,
    )


def _purge_all(
    database: Database,
    settings: Settings,
    caller: Caller,
    rule: PurgeRule,
    reason: str,
    *,
    study_uids: Sequence[str] | None = None,
    enough: Callable[[], bool] = lambda: False,
) -> list[StudyRemoval]:
    """Purge candidates under ``rule``, oldest first, until none is left or ``enough()``."""
    removed: list[StudyRemoval] = []
    busy: set[int] = set()
    while not enough():
        with database.reading() as session:
            batch = [
                c
                for c in purge_candidates(
                    session=session, rule=rule, study_uids=study_uids, limit=_BATCH + len(busy)
                )
                if c.study_id not in busy
            ]
        if not batch:
            break
        for candidate in batch:
            one = _purge_one(database, settings, caller, candidate, rule, reason)
            if one is None:
                busy.add(candidate.study_id)
            else:
                removed.append(one)
            if enough():
                break
    return removed


def purge_studies(
    database: Database,
    settings: Settings,
    caller: Caller,
    *,
    older_than: timedelta | None = None,
    study_uids: Sequence[str] = (),
    dry_run: bool = False,
    now: datetime | None = None,
) -> PurgeReport:
    """Remove the instances and result files of finished studies whose last activity (last
    instance received, last job finished) is older than ``older_than``, or of the studies
    ``study_uids`` (both given: both must hold).

    Studies that are not finished are never touched; FAILED jobs and deliveries do not protect
    a study here (an administrator asked). Each study purged is audited (110105); a dry run
    changes nothing and is audited as a query (110112) naming the studies it would purge.

    Raises
    ------
    InvalidRequestError
        If neither ``older_than`` nor ``study_uids`` is given, or ``older_than`` is negative.
    """
    if older_than is None and not study_uids:
        raise InvalidRequestError("say which studies: an age (--older-than) or --study UIDs")
    if older_than is not None and older_than < timedelta(0):
        raise InvalidRequestError("the age must not be negative")
    now = now or utcnow()
    before = now - older_than if older_than is not None else now
    rule = PurgeRule(now=now, instances_before=before, results_before=before)
    named = list(dict.fromkeys(study_uids)) or None
    reason = (
        f"purge of studies older than {_describe(older_than)}"
        if older_than is not None
        else "purge of named studies"
    )
    if dry_run:
        with database.reading() as session:
            candidates = purge_candidates(session=session, rule=rule, study_uids=named)
        report = PurgeReport(reason=reason, dry_run=True, removed=[_removal(c) for c in candidates])
    else:
        report = PurgeReport(
            reason=reason,
            removed=_purge_all(database, settings, caller, rule, reason, study_uids=named),
        )
    if named:
        report.kept.extend(_kept(database, named, report, rule))
    if dry_run:
        record_list(
            database,
            caller,
            {"older_than": str(older_than) if older_than else None, "dry_run": True},
            [(s.study_instance_uid, None) for s in report.removed],
        )
    return report


def _kept(
    database: Database, named: list[str], report: PurgeReport, rule: PurgeRule
) -> list[KeptStudy]:
    done = {s.study_instance_uid for s in report.removed}
    kept = []
    with database.reading() as session:
        ids = dict(
            session.execute(
                select(Study.study_instance_uid, Study.id).where(
                    Study.study_instance_uid.in_(named)
                )
            ).all()
        )
        for uid in named:
            if uid in done:
                continue
            reason = (
                why_kept(session=session, study_id=ids[uid], rule=rule)
                if uid in ids
                else "it is not on this node"
            )
            kept.append(KeptStudy(study_instance_uid=uid, reason=reason or "it was busy"))
    return kept


def apply_retention(
    database: Database,
    settings: Settings,
    *,
    now: datetime | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> PurgeReport:
    """Apply the age rules of ``storage.retention`` once (nothing when it is disabled or keeps
    both instances and results); audited (110105) by the node's AE title. Stops after the study
    being purged once ``stopping()`` (the rest is due at the next pass)."""
    retention = settings.storage.retention
    now = now or utcnow()
    rule = PurgeRule(
        now=now,
        instances_before=(
            now - _days(retention.instances_days) if retention.instances_days else None
        ),
        results_before=now - _days(retention.results_days) if retention.results_days else None,
        failed_since=now - _days(retention.failed_hold_days),
    )
    reason = (
        f"storage.retention: instances after {retention.instances_days} days, results after "
        f"{retention.results_days} days"
    )
    if not retention.enabled or (rule.instances_before is None and rule.results_before is None):
        return PurgeReport(reason=reason)
    caller = Caller(settings.node.ae_title, None, {"by": "storage.retention"})
    return PurgeReport(
        reason=reason,
        removed=_purge_all(database, settings, caller, rule, reason, enough=stopping),
    )


def reclaim_space(
    database: Database,
    settings: Settings,
    *,
    free_bytes: Callable[[], int],
    target_bytes: int,
    seconds: float,
    results_count: bool = True,
    now: datetime | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> PurgeReport:
    """Remove the oldest finished studies until ``free_bytes()`` reaches ``target_bytes`` or
    ``seconds`` have passed: their instances first, then (``results_count``: the results share
    the filesystem) their result files. FAILED jobs and deliveries within
    ``storage.retention.failed_hold_days`` keep their studies. Audited (110105) by the node's
    AE title."""
    now = now or utcnow()
    deadline = time.monotonic() + seconds
    failed_since = now - _days(settings.storage.retention.failed_hold_days)
    reason = (
        f"free space below storage.high_water_mb ({target_bytes // 2**20} MiB wanted): "
        "oldest finished studies first"
    )
    caller = Caller(settings.node.ae_title, None, {"by": "storage.high_water_mb"})

    def enough() -> bool:
        return stopping() or free_bytes() >= target_bytes or time.monotonic() >= deadline

    removed = _purge_all(
        database,
        settings,
        caller,
        PurgeRule(now=now, instances_before=now, failed_since=failed_since),
        reason,
        enough=enough,
    )
    if results_count and not enough():
        removed += _purge_all(
            database,
            settings,
            caller,
            PurgeRule(now=now, results_before=now, failed_since=failed_since),
            reason,
            enough=enough,
        )
    return PurgeReport(reason=reason, removed=removed)
