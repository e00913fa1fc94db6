"""Database functions of the receive path: keyword-only arguments and an explicit session.

Each function runs inside the caller's transaction (``Database.transaction()``) and never
commits on its own, so that an instance row, its study and series, and its audit event are
committed together or not at all.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Text, bindparam, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacsai.db.audit import AuditAction, AuditEventId, AuditOutcome, append_event
from pacsai.db.models import (
    Association,
    AssociationOutcome,
    ExpectationState,
    Instance,
    Job,
    JobStatus,
    Series,
    Study,
    StudyExpectation,
    StudyStatus,
)
from pacsai.errors import DatabaseError, InvalidInstanceError, PacsaiError

__all__ = [
    "EXPECTATION_LIFETIME",
    "InstanceRefused",
    "PendingInstance",
    "ReceivedInstance",
    "RecordResult",
    "StoreOutcome",
    "close_association",
    "complete_expected_studies",
    "complete_quiet_studies",
    "find_instance",
    "interrupt_open_associations",
    "open_association",
    "record_instance",
    "record_instances",
]


@dataclass(frozen=True, slots=True)
class ReceivedInstance:
    """What the receiver parsed from an instance's header, and where its bytes now are.

    ``frames`` and ``routing_attributes`` (:class:`RoutingAttributes` as JSON, for an image)
    are what routing reads; without them the study is routed from its files.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    sha256: str
    modality: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    instance_number: int | None = None
    frames: int | None = None
    routing_attributes: str | None = None

    def __post_init__(self) -> None:
        if self.frames and self.routing_attributes is None:
            raise ValueError("an image (frames > 0) needs its routing attributes")


class StoreOutcome(enum.StrEnum):
    """What recording an instance did."""

    STORED = "STORED"  # a new SOP instance
    DUPLICATE = "DUPLICATE"  # the same bytes were already stored: nothing changed
    REPLACED = "REPLACED"  # the same SOP Instance UID with other bytes: the new ones win


@dataclass(frozen=True, slots=True)
class RecordResult:
    """The outcome of :func:`record_instance`.

    ``old_path`` is the file a replacement superseded: once the transaction has committed, no
    row points at it any more. For a duplicate it is ``None``: the row still points at the file
    recorded first, and the file just written is nobody's.
    """

    outcome: StoreOutcome
    old_path: str | None = None


@dataclass(frozen=True, slots=True)
class PendingInstance:
    """One instance for :func:`record_instances`: what was received, from whom, and when."""

    item: ReceivedInstance
    association_id: str | None
    calling_ae_title: str
    remote_address: str
    quiet_seconds: float
    received_at: datetime


def _insert_ignoring_conflict(
    connection: Connection, model: Any, key: str, values: dict[str, Any]
) -> None:
    insert = pg_insert if connection.dialect.name == "postgresql" else sqlite_insert
    connection.execute(insert(model).values(**values).on_conflict_do_nothing(index_elements=[key]))


def find_instance(*, session: Session, sop_instance_uid: str) -> Instance | None:
    """The stored instance with this SOP Instance UID, if any."""
    return session.execute(
        select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
    ).scalar_one_or_none()


# The statements of the receive path, built once: building them per instance cost more than
# running them. They run on the session's connection (Core), not through the ORM.
_EXISTING_INSTANCE = (
    select(
        Instance.id,
        Instance.sha256,
        Instance.path,
        Instance.study_id,
        Instance.series_id,
        Instance.frames,
    )
    .where(Instance.sop_instance_uid == bindparam("b_sop_instance_uid"))
    .with_for_update()
)
_COUNT_INTO_STUDY = (
    update(Study)
    .where(Study.study_instance_uid == bindparam("b_study_instance_uid"))
    .values(
        status=StudyStatus.RECEIVING,
        last_received_at=bindparam("b_now"),
        quiet_seconds=bindparam("b_quiet_seconds"),
        instance_count=Study.instance_count + 1,
        purged_at=None,  # a purged study sent again holds instances again
    )
    .returning(Study.id)
)
_COUNT_INTO_SERIES = (
    update(Series)
    .where(Series.series_instance_uid == bindparam("b_series_instance_uid"))
    .values(
        instance_count=Series.instance_count + 1,
        # the first image's attributes stay: the series row is locked from here to the commit,
        # so that image also has the lowest instance id of the series' images
        routing_attributes=func.coalesce(
            Series.routing_attributes, bindparam("b_routing_attributes", type_=Text())
        ),
    )
    .returning(Series.id, Series.study_id, Series.routing_attributes)
)
_INSERT_INSTANCE = insert(Instance)


def _touch_study(
    connection: Connection,
    item: ReceivedInstance,
    *,
    calling_ae_title: str,
    quiet_seconds: float,
    now: datetime,
) -> int:
    """Count an instance into its study, creating the study on its first instance.

    Re-opens a COMPLETE study: it completes again, with a new job, once quiet.
    """
    params = {
        "b_study_instance_uid": item.study_instance_uid,
        "b_now": now,
        "b_quiet_seconds": quiet_seconds,
    }
    study_id = connection.execute(_COUNT_INTO_STUDY, params).scalar_one_or_none()
    if study_id is None:
        _insert_ignoring_conflict(
            connection,
            Study,
            "study_instance_uid",
            {
                "study_instance_uid": item.study_instance_uid,
                "patient_id": item.patient_id,
                "patient_name": item.patient_name,
                "accession_number": item.accession_number,
                "study_date": item.study_date,
                "study_description": item.study_description,
                "status": StudyStatus.RECEIVING,
                "quiet_seconds": quiet_seconds,
                "calling_ae_title": calling_ae_title,
                "instance_count": 0,
                "first_received_at": now,
                "last_received_at": now,
            },
        )
        study_id = connection.execute(_COUNT_INTO_STUDY, params).scalar_one()
    return int(study_id)


def _touch_series(
    connection: Connection, item: ReceivedInstance, *, study_id: int
) -> tuple[int, str | None]:
    """Count an instance into its series, creating the series on its first instance; the
    series' id and its routing attributes as now recorded (the first image's)."""
    params = {
        "b_series_instance_uid": item.series_instance_uid,
        "b_routing_attributes": item.routing_attributes if item.frames else None,
    }
    row = connection.execute(_COUNT_INTO_SERIES, params).one_or_none()
    if row is None:
        _insert_ignoring_conflict(
            connection,
            Series,
            "series_instance_uid",
            {
                "study_id": study_id,
                "series_instance_uid": item.series_instance_uid,
                "modality": item.modality,
                "series_number": item.series_number,
                "series_description": item.series_description,
                "body_part_examined": item.body_part_examined,
                "instance_count": 0,
            },
        )
        row = connection.execute(_COUNT_INTO_SERIES, params).one()
    if row.study_id != study_id:
        raise InvalidInstanceError(
            f"Series Instance UID {item.series_instance_uid} already belongs to another study; "
            "the sender reuses UIDs across studies"
        )
    return int(row.id), row.routing_attributes


def record_instance(
    *,
    session: Session,
    item: ReceivedInstance,
    association_id: str | None,
    calling_ae_title: str,
    remote_address: str,
    quiet_seconds: float,
    now: datetime,
) -> RecordResult:
    """Record a spooled instance, its study and its series; audit a replacement.

    A new instance costs four statements: look it up, count it into its study and its series,
    insert it. The instance's row is locked while this transaction decides (PostgreSQL; SQLite
    serialises writers anyway), so that concurrent versions of one SOP Instance UID replace
    each other in turn and each learns exactly which file it superseded. When another process
    inserts the same new SOP Instance UID at the same moment, the unique constraint fails the
    statement (:func:`record_instances` tries such an instance again).

    Raises
    ------
    InvalidInstanceError
        If the instance's series is already recorded under another study.
    """
    connection = session.connection()
    existing = connection.execute(
        _EXISTING_INSTANCE, {"b_sop_instance_uid": item.sop_instance_uid}
    ).one_or_none()
    if existing is not None and existing.sha256 == item.sha256:
        return RecordResult(StoreOutcome.DUPLICATE)

    # Counts go to the new study and series; a replacement takes them back from the old ones.
    study_id = _touch_study(
        connection, item, calling_ae_title=calling_ae_title, quiet_seconds=quiet_seconds, now=now
    )
    series_id, routing_attributes = _touch_series(connection, item, study_id=study_id)
    columns: dict[str, Any] = {
        "study_id": study_id,
        "series_id": series_id,
        "association_id": association_id,
        "sop_class_uid": item.sop_class_uid,
        "transfer_syntax_uid": item.transfer_syntax_uid,
        "instance_number": item.instance_number,
        "frames": item.frames,
        "path": item.path,
        "size_bytes": item.size_bytes,
        "sha256": item.sha256,
        "calling_ae_title": calling_ae_title,
        "remote_address": remote_address,
        "received_at": now,
    }
    if existing is None:
        connection.execute(
            _INSERT_INSTANCE,
            {"sop_instance_uid": item.sop_instance_uid, "replaced_count": 0, **columns},
        )
        return RecordResult(StoreOutcome.STORED)

    session.execute(
        update(Study)
        .where(Study.id == existing.study_id)
        .values(instance_count=Study.instance_count - 1)
    )
    session.execute(
        update(Series)
        .where(Series.id == existing.series_id)
        .values(instance_count=Series.instance_count - 1)
    )
    session.execute(
        update(Instance)
        .where(Instance.id == existing.id)
        .values(replaced_count=Instance.replaced_count + 1, **columns)
    )
    if not _keeps_first_image(existing, item, series_id, routing_attributes):
        # The row keeps its place (id) among the images: it may now be, or no longer be, the
        # first image of a series. Both series are routed from their files from now on.
        session.execute(
            update(Series)
            .where(Series.id.in_({existing.series_id, series_id}))
            .values(routing_attributes="")
        )
    append_event(
        session=session,
        event_id=AuditEventId.INSTANCES_TRANSFERRED,
        action=AuditAction.UPDATE,
        outcome=AuditOutcome.SUCCESS,
        actor=calling_ae_title,
        remote_address=remote_address,
        study_instance_uid=item.study_instance_uid,
        patient_id=item.patient_id,
        occurred_at=now,
        detail={
            "what": "instance replaced: same SOP Instance UID, different bytes",
            "sop_instance_uid": item.sop_instance_uid,
            "sop_class_uid": item.sop_class_uid,
            "old_sha256": existing.sha256,
            "new_sha256": item.sha256,
            "association_id": association_id,
        },
    )
    return RecordResult(StoreOutcome.REPLACED, old_path=existing.path)


def _keeps_first_image(
    existing: Any, item: ReceivedInstance, series_id: int, routing_attributes: str | None
) -> bool:
    """Whether replacing ``existing`` by ``item`` leaves the routing attributes recorded for
    its series true: the same series, an image before and after (or neither), with the same
    attributes as the series' first image (this one, or an earlier one)."""
    if existing.frames is None or item.frames is None or existing.series_id != series_id:
        return False
    if bool(existing.frames) != bool(item.frames):
        return False
    return not item.frames or item.routing_attributes == routing_attributes


class InstanceRefused(Exception):
    """One instance of a group was refused: the caller's transaction must roll back, and the
    group, without it, be recorded again. `index` is its place in the group, `error` its
    result."""

    def __init__(self, index: int, error: PacsaiError) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


def record_instances(*, session: Session, pending: list[PendingInstance]) -> list[RecordResult]:
    """Record several instances in the caller's transaction (a group commit).

    No savepoints (two statements more for each instance): a refusal, which is rare, ends the
    group instead.

    Raises
    ------
    InstanceRefused
        If an instance is refused: :class:`InvalidInstanceError` (its series belongs to another
        study), or :class:`DatabaseError` for a statement that failed (a concurrent insert of
        the same new SOP Instance UID by another process; it may be tried again). The caller
        rolls back and records the others again.
    """
    results: list[RecordResult] = []
    for index, one in enumerate(pending):
        try:
            results.append(_record_one(session, one))
        except PacsaiError as exc:
            raise InstanceRefused(index, exc) from exc
    return results


def _record_one(session: Session, one: PendingInstance) -> RecordResult:
    """:func:`record_instance` for one pending instance; a concurrent insert of its SOP
    Instance UID (the statement failed) raised as :class:`DatabaseError`."""
    try:
        return record_instance(
            session=session,
            item=one.item,
            association_id=one.association_id,
            calling_ae_title=one.calling_ae_title,
            remote_address=one.remote_address,
            quiet_seconds=one.quiet_seconds,
            now=one.received_at,
        )
    except IntegrityError as exc:
        raise DatabaseError(
            f"instance {one.item.sop_instance_uid} was recorded concurrently by another "
            f"process; send it again ({type(exc.orig).__name__})"
        ) from exc


def open_association(
    *,
    session: Session,
    association_id: str,
    calling_ae_title: str,
    called_ae_title: str,
    remote_host: str,
    remote_port: int,
    tls: bool,
    now: datetime,
    node_id: str | None = None,
) -> None:
    """Record an accepted association, by the node (``node.id``) whose receiver accepted it."""
    session.add(
        Association(
            id=association_id,
            node_id=node_id,
            calling_ae_title=calling_ae_title,
            called_ae_title=called_ae_title,
            remote_host=remote_host,
            remote_port=remote_port,
            tls=tls,
            outcome=AssociationOutcome.ACTIVE,
            started_at=now,
            instances_stored=0,
            instances_failed=0,
        )
    )


def _audit_transfers(session: Session, association: Association, now: datetime) -> None:
    """One 110104 Instances Transferred event per study the association brought instances of."""
    rows = session.execute(
        select(Instance.study_id, Study.study_instance_uid, Study.patient_id, func.count())
        .join(Study, Study.id == Instance.study_id)
        .where(Instance.association_id == association.id)
        .group_by(Instance.study_id, Study.study_instance_uid, Study.patient_id)
    ).all()
    for _study_id, study_uid, patient_id, count in rows:
        append_event(
            session=session,
            event_id=AuditEventId.INSTANCES_TRANSFERRED,
            action=AuditAction.CREATE,
            outcome=AuditOutcome.SUCCESS,
            actor=association.calling_ae_title,
            remote_address=association.remote_host,
            study_instance_uid=study_uid,
            patient_id=patient_id,
            occurred_at=now,
            detail={
                "association_id": association.id,
                "instances": count,
                "association_outcome": str(association.outcome),
            },
        )


def close_association(
    *,
    session: Session,
    association_id: str,
    outcome: AssociationOutcome,
    instances_stored: int,
    instances_failed: int,
    now: datetime,
) -> None:
    """Record how an association ended and audit what it transferred."""
    association = session.get(Association, association_id)
    if association is None or association.ended_at is not None:
        return
    association.outcome = outcome
    association.ended_at = now
    association.instances_stored = instances_stored
    association.instances_failed = instances_failed
    _audit_transfers(session, association, now)


def interrupt_open_associations(*, session: Session, now: datetime, node_id: str) -> int:
    """At start-up: close the associations this node (``node_id``) left open when it stopped or
    was killed, and audit them; return how many.

    Other nodes' open associations (a shared database) are theirs to close. Rows recorded
    before associations carried a node (``node_id`` null) are closed by any node.
    """
    open_ones = (
        session.execute(
            select(Association).where(
                Association.ended_at.is_(None),
                or_(Association.node_id == node_id, Association.node_id.is_(None)),
            )
        )
        .scalars()
        .all()
    )
    for association in open_ones:
        association.outcome = AssociationOutcome.INTERRUPTED
        association.ended_at = now
        association.instances_stored = session.execute(
            select(func.count()).where(Instance.association_id == association.id)
        ).scalar_one()
        _audit_transfers(session, association, now)
    return len(open_ones)


def complete_quiet_studies(*, session: Session, now: datetime) -> list[Job]:
    """Mark studies quiet for their ``quiet_seconds`` as COMPLETE and queue one job for each.

    The update is guarded by the ``last_received_at`` that was read, so an instance that arrives
    meanwhile keeps the study open instead of being lost between two jobs.
    """
    candidates = session.execute(
        select(Study.id, Study.last_received_at, Study.quiet_seconds, Study.instance_count).where(
            Study.status == StudyStatus.RECEIVING
        )
    ).all()
    jobs: list[Job] = []
    for study_id, last_received_at, quiet_seconds, instance_count in candidates:
        if last_received_at + timedelta(seconds=quiet_seconds) > now:
            continue
        result = session.execute(
            update(Study)
            .where(
                Study.id == study_id,
                Study.status == StudyStatus.RECEIVING,
                Study.last_received_at == last_received_at,
            )
            .values(status=StudyStatus.COMPLETE, completed_at=now)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            continue
        job = Job(
            study_id=study_id,
            status=JobStatus.QUEUED,
            instance_count=instance_count,
            attempts=0,
            created_at=now,
        )
        session.add(job)
        jobs.append(job)
    session.flush()
    return jobs


#: An expectation whose study has not got what was expected after this long is dropped.
EXPECTATION_LIFETIME = timedelta(days=2)


def _expected_arrived(session: Session, expectation: StudyExpectation, study: Study) -> bool:
    """Whether ``study`` holds everything ``expectation`` names (always, for complete_now)."""
    if expectation.complete_now:
        return True
    if expectation.expected_instances and study.instance_count < expectation.expected_instances:
        return False
    wanted: dict[str, int | None] = json.loads(expectation.expected_series or "{}")
    if not wanted:
        return bool(expectation.expected_instances)
    held = dict(
        session.execute(
            select(Series.series_instance_uid, Series.instance_count).where(
                Series.study_id == study.id, Series.series_instance_uid.in_(wanted)
            )
        ).all()
    )
    return all(uid in held and held[uid] >= (count or 1) for uid, count in wanted.items())


def complete_expected_studies(*, session: Session, now: datetime) -> list[Job]:
    """Complete, before their quiet window, the studies whose expected content has arrived.

    An expectation (a WAITING row of ``study_expectations``: an MPPS step COMPLETED, an HL7
    order) names its study by Study Instance UID, else by accession number. When every series
    it names holds its instances (and the study the instances it expects), or it says the study
    is complete, the study is marked COMPLETE and one job is queued, guarded as in
    :func:`complete_quiet_studies`; the expectation is MET. One whose study completed on its
    quiet window with everything there is SUPERSEDED; one still unmet after
    :data:`EXPECTATION_LIFETIME` is EXPIRED. Studies nobody announced keep the quiet window.
    """
    waiting = session.scalars(
        select(StudyExpectation).where(StudyExpectation.state == ExpectationState.WAITING)
    ).all()
    jobs: list[Job] = []
    for expectation in waiting:
        if expectation.study_instance_uid:
            match = Study.study_instance_uid == expectation.study_instance_uid
        elif expectation.accession_number:
            match = Study.accession_number == expectation.accession_number
        else:
            continue
        studies = session.scalars(select(Study).where(match).order_by(Study.id)).all()
        for study in studies:
            if not _expected_arrived(session, expectation, study):
                continue
            if study.status is StudyStatus.COMPLETE:
                expectation.state = ExpectationState.SUPERSEDED
            else:
                job = _complete_now(session, study, now)
                if job is None:
                    continue  # an instance arrived meanwhile: look again at the next check
                jobs.append(job)
                expectation.state = ExpectationState.MET
                expectation.met_at = now
            expectation.study_id = study.id
            expectation.updated_at = now
            break
        else:
            if expectation.updated_at + EXPECTATION_LIFETIME <= now:
                expectation.state = ExpectationState.EXPIRED
                expectation.updated_at = now
    session.flush()
    return jobs


def _complete_now(session: Session, study: Study, now: datetime) -> Job | None:
    """Mark a RECEIVING study COMPLETE and queue its job, unless an instance arrived since it
    was read (then ``None``)."""
    result = session.execute(
        update(Study)
        .where(
            Study.id == study.id,
            Study.status == StudyStatus.RECEIVING,
            Study.last_received_at == study.last_received_at,
        )
        .values(status=StudyStatus.COMPLETE, completed_at=now)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    job = Job(
        study_id=study.id,
        status=JobStatus.QUEUED,
        instance_count=study.instance_count,
        attempts=0,
        created_at=now,
    )
    session.add(job)
    return job
