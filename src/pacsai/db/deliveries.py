"""Repository functions for result objects and their deliveries (durable, retried, leased).

States (DESIGN.md): PENDING -> SENT, or RETRYING with backoff -> FAILED after the last attempt.
A worker leases a due delivery (``claimed_until``) while it sends, so that workers in several
threads or processes never send it twice, and a crashed worker's lease simply runs out.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from pacsai.db.models import Delivery, DeliveryStatus, Instance, Job, Result, ResultObject, Study

__all__ = [
    "DeliveryContext",
    "add_objects",
    "backoff_seconds",
    "claim_delivery",
    "delivery_context",
    "queue_deliveries",
    "record_attempt",
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
    Instance UIDs, from an earlier run of the same job) gets no new delivery: a re-run never sends
    the same result twice.
    """
    ids = []
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
        if not resend and _already_sent(session, destination, uids, result_id):
            continue
        delivery = Delivery(
            result_id=result_id,
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


def _already_sent(session: Session, destination: str, uids: set[str], result_id: int) -> bool:
    sent = session.execute(
        select(Delivery.id, ResultObject.sop_instance_uid)
        .join(ResultObject, ResultObject.result_id == Delivery.result_id)
        .where(
            Delivery.destination == destination,
            Delivery.status == DeliveryStatus.SENT,
            Delivery.result_id != result_id,
            ResultObject.sop_instance_uid.in_(uids),
        )
    ).all()
    by_delivery: dict[int, set[str]] = {}
    for delivery_id, uid in sent:
        by_delivery.setdefault(delivery_id, set()).add(uid)
    return any(found == uids for found in by_delivery.values())


def claim_delivery(*, session: Session, now: datetime, lease_seconds: float) -> int | None:
    """Lease the most overdue delivery that is due; its id, or ``None``."""
    due = and_(
        Delivery.status.in_((DeliveryStatus.PENDING, DeliveryStatus.RETRYING)),
        Delivery.next_attempt_at <= now,
        or_(Delivery.claimed_until.is_(None), Delivery.claimed_until < now),
    )
    for (candidate,) in session.execute(
        select(Delivery.id).where(due).order_by(Delivery.next_attempt_at).limit(5)
    ).all():
        claimed = session.execute(
            update(Delivery)
            .where(Delivery.id == candidate, due)
            .values(claimed_until=now + timedelta(seconds=lease_seconds))
        )
        if claimed.rowcount == 1:  # type: ignore[attr-defined]
            return int(candidate)
    return None


@dataclass(frozen=True)
class DeliveryContext:
    """What sending one delivery needs."""

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


def delivery_context(*, session: Session, delivery_id: int) -> DeliveryContext:
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        raise LookupError(f"delivery {delivery_id} does not exist")
    result = session.get(Result, delivery.result_id)
    assert result is not None
    job = session.get(Job, result.job_id)
    assert job is not None
    study = session.get(Study, job.study_id)
    assert study is not None
    kinds = delivery.kinds.split(",")
    files = session.scalars(
        select(ResultObject.path)
        .where(ResultObject.result_id == result.id, ResultObject.kind.in_(kinds))
        .order_by(ResultObject.id)
    ).all()
    sender_host = session.scalars(
        select(Instance.remote_address)
        .where(Instance.study_id == study.id)
        .order_by(Instance.received_at.desc())
        .limit(1)
    ).first()
    return DeliveryContext(
        delivery_id=delivery.id,
        destination=delivery.destination,
        files=tuple(Path(f) for f in files),
        attempts=delivery.attempts,
        job_id=job.id,
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
        sender_ae_title=study.calling_ae_title,
        sender_host=sender_host,
        model_name=result.model_name,
        model_version=f"{result.model_version}+{result.weights_sha256[:12]}",
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
) -> DeliveryStatus:
    """Record one attempt's outcome and release the lease; the new status.

    ``seg_type``: of a successful attempt, the SEG type the destination received.
    """
    delivery = session.get(Delivery, delivery_id)
    assert delivery is not None
    delivery.attempts += 1
    delivery.claimed_until = None
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
        query = query.where(
            Delivery.result_id.in_(select(Result.id).where(Result.job_id.in_(job_ids)))
        )
    result = session.execute(
        query.values(status=DeliveryStatus.PENDING, attempts=0, next_attempt_at=now)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
