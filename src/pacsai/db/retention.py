"""Repository functions of the storage lifecycle: which studies may lose their files, and
removing their rows under a lock that receiving, retries and new deliveries also take.

A study may be purged only when it is finished (:func:`purgeable`): not RECEIVING, no job
QUEUED or RUNNING, no delivery of its results PENDING, RETRYING or leased, and (unless asked to
ignore them) no job or delivery that FAILED recently, whose retry would need the files. What
is removed, and what stays:

* **instances**: every instance row of the study, in the transaction that marks it purged
  (``studies.purged_at``) and sets its and its series' instance counts to 0. The spool files
  are removed by the caller *after* the commit, so that no committed row ever points at a
  removed file; a crash in between leaves files that the spool sweep removes.
* **results**: the files of its finished jobs' results (label maps, DICOM objects), removed by
  the caller *before* the commit that marks them purged (``results.purged_at``), while the study
  row is locked: a re-run of the job cannot write the same names meanwhile. The result, object
  and delivery rows stay, so that findings and what was sent where remain known.

The study, series, job, result, result object and delivery rows are never deleted: with the
audit trail they record what the node did with the study.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import ColumnElement, and_, delete, func, not_, or_, select, update
from sqlalchemy.orm import Session

from pacsai.db.models import (
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    Result,
    ResultObject,
    Series,
    Study,
    StudyStatus,
)

__all__ = [
    "PurgeCandidate",
    "PurgeRule",
    "RemovedObject",
    "StudyPurge",
    "purge_candidates",
    "purge_study",
    "purgeable",
    "why_kept",
]

_BUSY_JOBS = (JobStatus.QUEUED, JobStatus.RUNNING)
_BUSY_DELIVERIES = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)


@dataclass(frozen=True)
class PurgeRule:
    """What to remove of the studies a purge looks at.

    Attributes
    ----------
    now
        The time the purge runs at.
    instances_before
        Remove the received instances of studies whose last activity (last instance received,
        last job finished) is before this; ``None``: keep instances.
    results_before
        Remove the files of results whose job finished before this; ``None``: keep results.
    failed_since
        A job that FAILED, or a delivery whose last attempt was due, at or after this time, and
        that is still FAILED, keeps its study's files; ``None``: FAILED does not protect.
    """

    now: datetime
    instances_before: datetime | None = None
    results_before: datetime | None = None
    failed_since: datetime | None = None


def _deliveries_of_study() -> Sequence[ColumnElement[bool]]:
    return (
        Delivery.result_id == Result.id,
        Result.job_id == Job.id,
        Job.study_id == Study.id,
    )


def purgeable(rule: PurgeRule) -> ColumnElement[bool]:
    """The condition on :class:`Study` rows that may lose files under ``rule``."""
    busy_job = select(Job.id).where(Job.study_id == Study.id, Job.status.in_(_BUSY_JOBS)).exists()
    busy_delivery = (
        select(Delivery.id)
        .where(
            *_deliveries_of_study(),
            or_(Delivery.status.in_(_BUSY_DELIVERIES), Delivery.claimed_until > rule.now),
        )
        .exists()
    )
    conditions = [Study.status == StudyStatus.COMPLETE, not_(busy_job), not_(busy_delivery)]
    if rule.failed_since is not None:
        failed_job = (
            select(Job.id)
            .where(
                Job.study_id == Study.id,
                Job.status == JobStatus.FAILED,
                Job.finished_at >= rule.failed_since,
            )
            .exists()
        )
        failed_delivery = (
            select(Delivery.id)
            .where(
                *_deliveries_of_study(),
                Delivery.status == DeliveryStatus.FAILED,
                Delivery.next_attempt_at >= rule.failed_since,
            )
            .exists()
        )
        conditions += [not_(failed_job), not_(failed_delivery)]
    return and_(*conditions)


def _instances_due(before: datetime) -> ColumnElement[bool]:
    """Studies holding instances whose last activity is before ``before``."""
    recent_job = select(Job.id).where(Job.study_id == Study.id, Job.finished_at >= before).exists()
    return and_(
        Study.purged_at.is_(None),
        Study.instance_count > 0,
        Study.last_received_at < before,
        not_(recent_job),
    )


def _results_due(before: datetime) -> ColumnElement[bool]:
    """Results still on disk whose job finished before ``before`` (correlated to the study)."""
    return and_(
        Result.job_id == Job.id,
        Job.study_id == Study.id,
        Result.purged_at.is_(None),
        Job.finished_at < before,
    )


def _due(rule: PurgeRule) -> ColumnElement[bool] | None:
    wanted = []
    if rule.instances_before is not None:
        wanted.append(_instances_due(rule.instances_before))
    if rule.results_before is not None:
        wanted.append(select(Result.id).where(_results_due(rule.results_before)).exists())
    return or_(*wanted) if wanted else None


@dataclass(frozen=True)
class PurgeCandidate:
    """A study with something to remove under a rule, and how much it holds."""

    study_id: int
    study_instance_uid: str
    patient_id: str | None
    last_received_at: datetime
    instances: int  # instance rows it holds (removed with the instances)
    instance_bytes: int
    results: int  # results whose files are still here


def purge_candidates(
    *,
    session: Session,
    rule: PurgeRule,
    study_uids: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[PurgeCandidate]:
    """The purgeable studies with something due under ``rule`` (only those of ``study_uids``
    if given), oldest last instance first."""
    due = _due(rule)
    if due is None:
        return []
    query = select(Study.id, Study.study_instance_uid, Study.patient_id, Study.last_received_at)
    query = query.where(due, purgeable(rule))
    if study_uids is not None:
        query = query.where(Study.study_instance_uid.in_(list(study_uids)))
    rows = session.execute(query.order_by(Study.last_received_at, Study.id).limit(limit)).all()
    ids = [row.id for row in rows]
    if not ids:
        return []
    held = {
        study_id: (int(count), int(size or 0))
        for study_id, count, size in session.execute(
            select(Instance.study_id, func.count(), func.sum(Instance.size_bytes))
            .where(Instance.study_id.in_(ids))
            .group_by(Instance.study_id)
        )
    }
    results: dict[int, int] = {}
    if rule.results_before is not None:
        results = {
            study_id: int(count)
            for study_id, count in session.execute(
                select(Job.study_id, func.count())
                .join(Result, Result.job_id == Job.id)
                .where(
                    Job.study_id.in_(ids),
                    Result.purged_at.is_(None),
                    Job.finished_at < rule.results_before,
                )
                .group_by(Job.study_id)
            )
        }
    instances_wanted = rule.instances_before is not None
    candidates = []
    for row in rows:
        count, size = held.get(row.id, (0, 0))
        if not instances_wanted or not _still_due(session, row.id, rule):
            count, size = 0, 0
        candidates.append(
            PurgeCandidate(
                study_id=row.id,
                study_instance_uid=row.study_instance_uid,
                patient_id=row.patient_id,
                last_received_at=row.last_received_at,
                instances=count,
                instance_bytes=size,
                results=results.get(row.id, 0),
            )
        )
    return candidates


def _still_due(session: Session, study_id: int, rule: PurgeRule) -> bool:
    assert rule.instances_before is not None
    return (
        session.scalar(
            select(Study.id).where(Study.id == study_id, _instances_due(rule.instances_before))
        )
        is not None
    )


@dataclass(frozen=True)
class RemovedObject:
    """A result object whose file is removed."""

    object_id: int
    kind: str
    sop_instance_uid: str
    path: str  # relative to storage.results_dir


@dataclass
class StudyPurge:
    """What :func:`purge_study` removed from the database, and which files go with it."""

    study_instance_uid: str
    patient_id: str | None
    instance_paths: list[str] = field(default_factory=list)  # relative to storage.spool_dir
    instance_bytes: int = 0
    series: list[tuple[str, str | None, int]] = field(default_factory=list)  # uid, modality, n
    job_ids: list[int] = field(default_factory=list)
    result_ids: list[int] = field(default_factory=list)
    result_paths: list[str] = field(default_factory=list)  # outputs, relative to results_dir
    objects: list[RemovedObject] = field(default_factory=list)
    instances_removed: bool = False  # the study is marked purged (even if no row was left)

    @property
    def empty(self) -> bool:
        """Whether nothing was removed."""
        return not self.instances_removed and not self.result_ids


def purge_study(*, session: Session, study_id: int, rule: PurgeRule) -> StudyPurge | None:
    """Lock the study, check again that it may be purged, and remove what ``rule`` says is due:
    instance rows (their files go after the commit) and the purge marks of results (their files
    go before it). ``None`` when the study is busy (locked by a receive, a retry or another
    purge; no longer purgeable) or nothing is due any more.

    The caller removes the files and records the audit event in the same transaction.
    """
    due = _due(rule)
    if due is None:
        return None
    study = session.scalars(
        select(Study)
        .where(Study.id == study_id, due, purgeable(rule))
        .with_for_update(skip_locked=True)
    ).one_or_none()
    if study is None:
        return None
    purge = StudyPurge(study.study_instance_uid, study.patient_id)
    instances_due = rule.instances_before is not None and _still_due(session, study_id, rule)
    if instances_due and not _remove_instances(session, study, purge, rule.now):
        return None  # a receive holds one of its instances: next time
    if rule.results_before is not None:
        _mark_results(session, study_id, purge, rule)
    return None if purge.empty else purge


def _remove_instances(session: Session, study: Study, purge: StudyPurge, now: datetime) -> bool:
    rows = session.execute(
        select(Instance.id, Instance.path, Instance.size_bytes, Instance.series_id)
        .where(Instance.study_id == study.id)
        .with_for_update(skip_locked=True)
    ).all()
    total = session.scalar(select(func.count()).where(Instance.study_id == study.id))
    if len(rows) != total:
        return False
    counts: dict[int, int] = {}
    for row in rows:
        counts[row.series_id] = counts.get(row.series_id, 0) + 1
    series = session.execute(
        select(Series.id, Series.series_instance_uid, Series.modality)
        .where(Series.study_id == study.id)
        .order_by(Series.id)
    ).all()
    session.execute(delete(Instance).where(Instance.study_id == study.id))
    session.execute(
        update(Series)
        .where(Series.study_id == study.id)
        .values(instance_count=0, routing_attributes=None)  # the next first image sets them
    )
    study.instance_count = 0
    study.purged_at = now
    purge.instances_removed = True
    purge.instance_paths = [row.path for row in rows]
    purge.instance_bytes = sum(int(row.size_bytes) for row in rows)
    purge.series = [(s.series_instance_uid, s.modality, counts.get(s.id, 0)) for s in series]
    return True


def _mark_results(session: Session, study_id: int, purge: StudyPurge, rule: PurgeRule) -> None:
    assert rule.results_before is not None
    results = session.scalars(
        select(Result)
        .join(Job, Job.id == Result.job_id)
        .where(
            Job.study_id == study_id,
            Result.purged_at.is_(None),
            Job.finished_at < rule.results_before,
        )
        .order_by(Result.id)
    ).all()
    if not results:
        return
    for result in results:
        result.purged_at = rule.now
    purge.result_ids = [result.id for result in results]
    purge.job_ids = sorted({result.job_id for result in results})
    purge.result_paths = sorted({result.output_path for result in results})
    purge.objects = [
        RemovedObject(obj.id, obj.kind, obj.sop_instance_uid, obj.path)
        for obj in session.scalars(
            select(ResultObject)
            .where(ResultObject.result_id.in_(purge.result_ids))
            .order_by(ResultObject.id)
        )
    ]


def why_kept(*, session: Session, study_id: int, rule: PurgeRule) -> str | None:
    """Why a study may not be purged under ``rule`` now, in words; ``None`` if it may."""
    study = session.get(Study, study_id)
    if study is None:
        return "it is not on this node"
    if study.status is StudyStatus.RECEIVING:
        return "it is still RECEIVING (instances may arrive)"
    busy = session.execute(
        select(Job.id, Job.status)
        .where(Job.study_id == study_id, Job.status.in_(_BUSY_JOBS))
        .order_by(Job.id)
    ).first()
    if busy is not None:
        return f"job {busy.id} is {busy.status.value}"
    delivery = session.execute(
        select(Delivery.id, Delivery.status, Delivery.destination)
        .join(Result, Result.id == Delivery.result_id)
        .join(Job, Job.id == Result.job_id)
        .where(
            Job.study_id == study_id,
            or_(Delivery.status.in_(_BUSY_DELIVERIES), Delivery.claimed_until > rule.now),
        )
        .order_by(Delivery.id)
    ).first()
    if delivery is not None:
        return (
            f"delivery {delivery.id} to {delivery.destination} is {delivery.status.value} "
            "(being sent)"
        )
    if rule.failed_since is not None and (
        session.scalar(select(Study.id).where(Study.id == study_id, purgeable(rule))) is None
    ):
        return "a job or delivery of it FAILED recently (storage.retention.failed_hold_days)"
    due = _due(rule)
    if due is None or session.scalar(select(Study.id).where(Study.id == study_id, due)) is None:
        return "nothing of it is due (already purged, or newer than asked)"
    return None
