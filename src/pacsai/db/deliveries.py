"""Repository functions for result objects and their deliveries (durable, retried, leased).

States (DESIGN.md): PENDING -> SENT, or RETRYING with backoff -> FAILED after the last attempt.
A DICOM delivery sends the objects of one result (:func:`queue_deliveries`); a delivery of
another kind (HL7, FHIR, webhook, e-mail) sends one message about a whole job, built from the
study result stored with it when the job finished (:func:`queue_job_messages`).
A worker leases a due delivery (``lease_owner``, ``claimed_until``) while it sends and renews
the lease, so that workers in several threads or processes never send it twice. Each object the
destination acknowledges is committed at once (:func:`acknowledge_objects`), so that after a
lost worker only the objects not acknowledged go again. A lost worker's lease runs out, or its
own node takes it back at start-up; the owner stays recorded, which tells the next attempt that
one object may have reached the destination unacknowledged (:attr:`DeliveryClaim.interrupted`).
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from pacsai.db.models import (
    DeliveredObject,
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    Result,
    ResultObject,
    Study,
)
from pacsai.errors import LeaseLostError

__all__ = [
    "DeliveryClaim",
    "DeliveryContext",
    "DeliveryObject",
    "acknowledge_objects",
    "add_objects",
    "backoff_seconds",
    "claim_delivery",
    "delivery_context",
    "queue_deliveries",
    "queue_job_messages",
    "record_attempt",
    "release_lost_deliveries",
    "renew_delivery_leases",
    "retry_failed_deliveries",
]


def add_objects(
    *,
    session: Session,
    result_id: int,
    objects: Iterable[tuple[str, str, str, str, str]],
    now: datetime,
) -> None:
    """Record written objects: (kind, SOP class, SOP instance, series UID, relative path)."""
    for kind, sop_class, sop_instance, series, path in objects:
        session.add(
            ResultObject(
                result_id=result_id,
                kind=kind,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                series_instance_uid=series,
                path=path,
                created_at=now,
            )
        )
    session.flush()


def queue_deliveries(
    *,
    session: Session,
    result_id: int,
    targets: Sequence[tuple[str, Sequence[str]]],
    now: datetime,
    resend: bool = False,
) -> list[int]:
    """Create one PENDING delivery per (destination, object kinds) for ``result_id``.

    Unless ``resend``, a destination that already received exactly these objects (the same SOP
    Instance UIDs, from an earlier run of the same job), or has a delivery of them pending, gets
    no new delivery: a re-run, or a run after a lost worker, never sends the same result twice.
    """
    ids = []
    job_id = session.scalar(select(Result.job_id).where(Result.id == result_id))
    if job_id is None:
        raise LookupError(f"result {result_id} does not exist")
    for destination, kinds in targets:
        uids = set(
            session.scalars(
                select(ResultObject.sop_instance_uid).where(
                    ResultObject.result_id == result_id, ResultObject.kind.in_(kinds)
                )
            )
        )
        if not uids:
            continue
        if not resend and _already_covered(session, destination, uids, result_id):
            continue
        delivery = Delivery(
            job_id=job_id,
            result_id=result_id,
            kind="dicom",
            destination=destination,
            kinds=",".join(kinds),
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        session.add(delivery)
        session.flush()
        ids.append(delivery.id)
    return ids


def _already_covered(session: Session, destination: str, uids: set[str], result_id: int) -> bool:
    """Whether another delivery to ``destination``, sent or still to be sent, carries ``uids``."""
    sent = session.execute(
        select(Delivery.id, ResultObject.sop_instance_uid)
        .join(ResultObject, ResultObject.result_id == Delivery.result_id)
        .where(
            Delivery.destination == destination,
            Delivery.status != DeliveryStatus.FAILED,
            Delivery.result_id != result_id,
            ResultObject.sop_instance_uid.in_(uids),
        )
    ).all()
    by_delivery: dict[int, set[str]] = {}
    for delivery_id, uid in sent:
        by_delivery.setdefault(delivery_id, set()).add(uid)
    return any(found == uids for found in by_delivery.values())


def queue_job_messages(
    *,
    session: Session,
    job_id: int,
    targets: Sequence[tuple[str, str]],
    payload: str,
    now: datetime,
    resend: bool = False,
) -> list[int]:
    """Create one PENDING delivery per (destination, kind) carrying ``payload`` about ``job_id``
    (a study result as JSON, the same on every attempt), each with its own message key.

    Unless ``resend``, a destination that already has this very payload about the same study
    (sent, or still to be sent: a re-run that found the same) gets no new delivery.
    """
    study_id = session.scalar(select(Job.study_id).where(Job.id == job_id))
    if study_id is None:
        raise LookupError(f"job {job_id} does not exist")
    ids = []
    for destination, kind in targets:
        if not resend and _message_covered(session, study_id, destination, kind, payload):
            continue
        delivery = Delivery(
            job_id=job_id,
            result_id=None,
            kind=kind,
            destination=destination,
            kinds="",
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            payload=payload,
            created_at=now,
        )
        session.add(delivery)
        session.flush()
        # The key receivers see: unique per delivery (and, by its random part, across nodes
        # whose ids collide), the same on every attempt.
        delivery.message_key = f"D{delivery.id}-{secrets.token_hex(4)}"[:20]
        ids.append(delivery.id)
    session.flush()
    return ids


def _message_covered(
    session: Session, study_id: int, destination: str, kind: str, payload: str
) -> bool:
    """Whether ``destination`` has (or will get) ``payload`` about the study already."""
    found = session.scalar(
        select(Delivery.id)
        .join(Job, Job.id == Delivery.job_id)
        .where(
            Job.study_id == study_id,
            Delivery.destination == destination,
            Delivery.kind == kind,
            Delivery.status != DeliveryStatus.FAILED,
            Delivery.payload == payload,
        )
        .limit(1)
    )
    return found is not None


@dataclass(frozen=True)
class DeliveryClaim:
    """A delivery leased to a worker.

    ``interrupted``: the previous attempt's worker was lost while sending, so an object may
    have reached the destination without its acknowledgement being recorded.
    """

    delivery_id: int
    owner: str
    interrupted: bool


def claim_delivery(
    *, session: Session, now: datetime, lease_seconds: float, owner: str = "anonymous"
) -> DeliveryClaim | None:
    """Lease the most overdue delivery that is due to ``owner``; ``None`` if none is due."""
    due = and_(
        Delivery.status.in_((DeliveryStatus.PENDING, DeliveryStatus.RETRYING)),
        Delivery.next_attempt_at <= now,
        or_(Delivery.claimed_until.is_(None), Delivery.claimed_until < now),
    )
    for candidate, previous in session.execute(
        select(Delivery.id, Delivery.lease_owner)
        .where(due)
        .order_by(Delivery.next_attempt_at)
        .limit(5)
    ).all():
        claimed = session.execute(
            update(Delivery)
            .where(Delivery.id == candidate, due)
            .values(claimed_until=now + timedelta(seconds=lease_seconds), lease_owner=owner)
        )
        if claimed.rowcount == 1:  # type: ignore[attr-defined]
            return DeliveryClaim(int(candidate), owner, interrupted=previous is not None)
    return None


def renew_delivery_leases(
    *,
    session: Session,
    owner: str,
    delivery_ids: Sequence[int],
    now: datetime,
    lease_seconds: float,
) -> int:
    """Extend the leases ``owner`` holds on these deliveries; how many it still held."""
    if not delivery_ids:
        return 0
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.id.in_(list(delivery_ids)),
            Delivery.lease_owner == owner,
            Delivery.claimed_until.is_not(None),
        )
        .values(claimed_until=now + timedelta(seconds=lease_seconds))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def release_lost_deliveries(
    *, session: Session, owners: Sequence[str], delivery_id: int | None = None
) -> int:
    """End the leases of workers known to be gone (or one lease a worker gives up), so that
    their deliveries are due at once.

    The owner is kept: the next attempt then knows it was interrupted.
    """
    query = update(Delivery).where(
        Delivery.lease_owner.in_(list(owners)), Delivery.claimed_until.is_not(None)
    )
    if delivery_id is not None:
        query = query.where(Delivery.id == delivery_id)
    result = session.execute(query.values(claimed_until=None))
    return int(result.rowcount)  # type: ignore[attr-defined]


def _hold_delivery(session: Session, delivery_id: int, owner: str) -> Delivery:
    delivery = session.get(Delivery, delivery_id, with_for_update=True)
    if delivery is None or delivery.lease_owner != owner or delivery.claimed_until is None:
        raise LeaseLostError(
            f"delivery {delivery_id}: {owner} lost its lease (another worker may be sending it)"
        )
    return delivery


def acknowledge_objects(
    *,
    session: Session,
    delivery_id: int,
    owner: str,
    objects: Sequence[tuple[int, str]],
    confirmed_by: str,
    now: datetime,
) -> None:
    """Record that the destination has these objects: (result object id, SOP Instance UID).

    Raises
    ------
    LeaseLostError
        If ``owner`` no longer holds the delivery (nothing is recorded).
    """
    _hold_delivery(session, delivery_id, owner)
    known = set(
        session.scalars(
            select(DeliveredObject.result_object_id).where(
                DeliveredObject.delivery_id == delivery_id
            )
        )
    )
    for object_id, uid in objects:
        if object_id in known:
            continue
        session.add(
            DeliveredObject(
                delivery_id=delivery_id,
                result_object_id=object_id,
                sop_instance_uid=uid,
                confirmed_by=confirmed_by,
                acknowledged_at=now,
            )
        )
        known.add(object_id)
    session.flush()


@dataclass(frozen=True)
class DeliveryObject:
    """One object of a delivery, and whether the destination has acknowledged it already."""

    result_object_id: int
    path: Path  # relative to storage.results_dir
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    acknowledged: bool


@dataclass(frozen=True)
class DeliveryContext:
    """What sending one delivery needs.

    A DICOM delivery has ``result_id`` and ``objects``; a delivery of another kind has
    ``message_key`` and ``payload`` (the study result, JSON) instead.
    """

    delivery_id: int
    destination: str
    files: tuple[Path, ...]  # relative to storage.results_dir
    attempts: int
    job_id: int
    study_instance_uid: str
    patient_id: str | None
    sender_ae_title: str
    sender_host: str | None
    model_name: str
    model_version: str  # bundle version + the first 12 hex digits of the weights' SHA-256
    objects: tuple[DeliveryObject, ...] = ()
    kind: str = "dicom"
    result_id: int | None = None
    message_key: str | None = None
    payload: str | None = None
    created_at: datetime | None = None

    @property
    def pending(self) -> tuple[DeliveryObject, ...]:
        """The objects the destination has not acknowledged yet."""
        return tuple(o for o in self.objects if not o.acknowledged)


def delivery_context(*, session: Session, delivery_id: int) -> DeliveryContext:
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        raise LookupError(f"delivery {delivery_id} does not exist")
    job = session.get(Job, delivery.job_id)
    assert job is not None
    study = session.get(Study, job.study_id)
    assert study is not None
    sender_host = session.scalars(
        select(Instance.remote_address)
        .where(Instance.study_id == study.id)
        .order_by(Instance.received_at.desc())
        .limit(1)
    ).first()
    if delivery.result_id is None:
        models = json.loads(delivery.payload or "{}").get("models", [])
        return DeliveryContext(
            delivery_id=delivery.id,
            destination=delivery.destination,
            files=(),
            attempts=delivery.attempts,
            job_id=job.id,
            study_instance_uid=study.study_instance_uid,
            patient_id=study.patient_id,
            sender_ae_title=study.calling_ae_title,
            sender_host=sender_host,
            model_name=", ".join(str(m["name"]) for m in models)[:128],
            model_version=", ".join(str(m["version"]) for m in models)[:128],
            kind=delivery.kind,
            message_key=delivery.message_key,
            payload=delivery.payload,
            created_at=delivery.created_at,
        )
    result = session.get(Result, delivery.result_id)
    assert result is not None
    kinds = delivery.kinds.split(",")
    rows = session.scalars(
        select(ResultObject)
        .where(ResultObject.result_id == result.id, ResultObject.kind.in_(kinds))
        .order_by(ResultObject.id)
    ).all()
    acknowledged = set(
        session.scalars(
            select(DeliveredObject.result_object_id).where(
                DeliveredObject.delivery_id == delivery.id
            )
        )
    )
    objects = tuple(
        DeliveryObject(
            result_object_id=row.id,
            path=Path(row.path),
            sop_class_uid=row.sop_class_uid,
            sop_instance_uid=row.sop_instance_uid,
            series_instance_uid=row.series_instance_uid,
            acknowledged=row.id in acknowledged,
        )
        for row in rows
    )
    return DeliveryContext(
        delivery_id=delivery.id,
        destination=delivery.destination,
        files=tuple(o.path for o in objects),
        attempts=delivery.attempts,
        job_id=job.id,
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
        sender_ae_title=study.calling_ae_title,
        sender_host=sender_host,
        model_name=result.model_name,
        model_version=f"{result.model_version}+{result.weights_sha256[:12]}",
        objects=objects,
        kind=delivery.kind,
        result_id=result.id,
        created_at=delivery.created_at,
    )


def backoff_seconds(attempt: int, *, first: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0.5, 1.5] x first x 2^(attempt-1)."""
    return float(min(cap, first * 2 ** max(0, attempt - 1)) * rng.uniform(0.5, 1.5))


def record_attempt(
    *,
    session: Session,
    delivery_id: int,
    now: datetime,
    error: str | None,
    permanent: bool = False,
    max_attempts: int,
    backoff: float = 0.0,
    seconds: float | None = None,
    seg_type: str | None = None,
    owner: str | None = None,
) -> DeliveryStatus:
    """Record one attempt's outcome and release the lease; the new status.

    ``seg_type``: of a successful attempt, the SEG type the destination received.

    Raises
    ------
    LeaseLostError
        If ``owner`` is given and no longer holds the delivery (nothing is recorded).
    """
    if owner is not None:
        delivery = _hold_delivery(session, delivery_id, owner)
    else:
        found = session.get(Delivery, delivery_id)
        assert found is not None
        delivery = found
    delivery.attempts += 1
    delivery.claimed_until = None
    delivery.lease_owner = None
    if error is None:
        delivery.status = DeliveryStatus.SENT
        delivery.sent_at = now
        delivery.last_error = None
        delivery.seconds = seconds
        delivery.seg_type = seg_type
    elif permanent or delivery.attempts >= max_attempts:
        delivery.status = DeliveryStatus.FAILED
        delivery.last_error = error
    else:
        delivery.status = DeliveryStatus.RETRYING
        delivery.last_error = error
        delivery.next_attempt_at = now + timedelta(seconds=backoff)
    return delivery.status


def retry_failed_deliveries(
    *, session: Session, now: datetime, job_ids: Sequence[int] | None = None
) -> int:
    """Put FAILED deliveries (of ``job_ids``, or all) back to PENDING with a fresh attempt count."""
    query = update(Delivery).where(Delivery.status == DeliveryStatus.FAILED)
    if job_ids is not None:
        query = query.where(Delivery.job_id.in_(list(job_ids)))
    result = session.execute(
        query.values(
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            claimed_until=None,
            lease_owner=None,
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
