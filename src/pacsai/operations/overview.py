"""The node at a glance, for the console's overview: what arrived, what runs, what failed.

Nothing here names a patient or a study (job ids, counts, reasons, destinations), so reading it
is not a read of patient data and the overview can refresh itself without filling the audit
trail; the pages it links to are audited.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from pacsai.config import Settings
from pacsai.db import Database, Delivery, DeliveryStatus, Job, JobStatus, Study, utcnow
from pacsai.operations.audit import LastVerification, last_verification
from pacsai.operations.models import ModelStatus, model_statuses

if TYPE_CHECKING:
    from pacsai.inference import ModelRegistry

__all__ = [
    "DiskSpace",
    "FinishedJob",
    "Overview",
    "RunningJob",
    "TroubledDelivery",
    "node_overview",
]

_SHOWN = 20  # rows per list; the counts say how many there are in all


@dataclass(frozen=True)
class RunningJob:
    """A job being run: since when, its attempt, and the last stage it reported."""

    job_id: int
    started_at: datetime | None
    attempts: int
    stage: str | None


@dataclass(frozen=True)
class FinishedJob:
    """A job that ended FAILED or SKIPPED, with why."""

    job_id: int
    status: JobStatus
    finished_at: datetime | None
    reason: str | None


@dataclass(frozen=True)
class TroubledDelivery:
    """A delivery being retried or given up on."""

    delivery_id: int
    job_id: int
    destination: str
    status: DeliveryStatus
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    kind: str = "dicom"  # of its destination: dicom, hl7, fhir, webhook, email


@dataclass(frozen=True)
class DiskSpace:
    """Free space of the spool's file system against ``storage.min_free_mb``."""

    free_mb: int | None  # None: the spool directory cannot be read
    min_free_mb: int
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.free_mb is not None and self.free_mb >= self.min_free_mb


@dataclass(frozen=True)
class Overview:
    """What the overview shows, as of ``now``."""

    now: datetime
    since_midnight: datetime
    studies_today: int
    studies_last_hour: int
    queued: int
    running: tuple[RunningJob, ...]
    failed_24h: int
    skipped_24h: int
    finished_badly: tuple[FinishedJob, ...]
    deliveries_retrying: int
    deliveries_failed: int
    troubled_deliveries: tuple[TroubledDelivery, ...]
    models: tuple[ModelStatus, ...]
    disk: DiskSpace
    verification: LastVerification | None


def _stage(timings: str | None) -> str | None:
    """The last stage a running job recorded, if its runner records stages as it goes."""
    if not timings:
        return None
    try:
        stages = json.loads(timings)
    except ValueError:
        return None
    return str(list(stages)[-1]) if isinstance(stages, dict) and stages else None


def _disk(settings: Settings) -> DiskSpace:
    minimum = settings.storage.min_free_mb
    try:
        free = shutil.disk_usage(settings.storage.spool_dir).free // 2**20
    except OSError as exc:
        return DiskSpace(None, minimum, f"{settings.storage.spool_dir}: {exc.strerror}")
    return DiskSpace(int(free), minimum)


def node_overview(
    database: Database,
    settings: Settings,
    registry: ModelRegistry | None,
    *,
    now: datetime | None = None,
) -> Overview:
    """Studies received today (since local midnight of the node) and in the last hour, the
    queue, running jobs, failures and skips of the last 24 hours, deliveries retrying or failed,
    models, spool space and the audit chain's last verification."""
    now = now or utcnow()
    midnight = now.astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    day_ago = now - timedelta(hours=24)
    bad = (JobStatus.FAILED, JobStatus.SKIPPED)
    troubled = (DeliveryStatus.RETRYING, DeliveryStatus.FAILED)
    with database.reading() as session:

        def count(*where: object) -> int:
            return int(session.scalar(select(func.count()).where(*where)) or 0)  # type: ignore[arg-type]

        studies_today = count(Study.first_received_at >= midnight)
        studies_last_hour = count(Study.first_received_at >= now - timedelta(hours=1))
        queued = count(Job.status == JobStatus.QUEUED)
        running = tuple(
            RunningJob(job.id, job.started_at, job.attempts, _stage(job.timings))
            for job in session.scalars(
                select(Job).where(Job.status == JobStatus.RUNNING).order_by(Job.id)
            )
        )
        per_status = dict(
            session.execute(
                select(Job.status, func.count())
                .where(Job.status.in_(bad), Job.finished_at >= day_ago)
                .group_by(Job.status)
            ).all()
        )
        finished_badly = tuple(
            FinishedJob(job.id, job.status, job.finished_at, job.reason)
            for job in session.scalars(
                select(Job)
                .where(Job.status.in_(bad), Job.finished_at >= day_ago)
                .order_by(Job.id.desc())
                .limit(_SHOWN)
            )
        )
        deliveries = dict(
            session.execute(
                select(Delivery.status, func.count())
                .where(Delivery.status.in_(troubled))
                .group_by(Delivery.status)
            ).all()
        )
        troubled_deliveries = tuple(
            TroubledDelivery(
                delivery.id,
                job_id,
                delivery.destination,
                delivery.status,
                delivery.attempts,
                delivery.last_error,
                delivery.next_attempt_at if delivery.status == DeliveryStatus.RETRYING else None,
                delivery.kind,
            )
            for delivery, job_id in session.execute(
                select(Delivery, Delivery.job_id)
                .where(Delivery.status.in_(troubled))
                .order_by(Delivery.id.desc())
                .limit(_SHOWN)
            )
        )
    return Overview(
        now=now,
        since_midnight=midnight,
        studies_today=studies_today,
        studies_last_hour=studies_last_hour,
        queued=queued,
        running=running,
        failed_24h=int(per_status.get(JobStatus.FAILED, 0)),
        skipped_24h=int(per_status.get(JobStatus.SKIPPED, 0)),
        finished_badly=finished_badly,
        deliveries_retrying=int(deliveries.get(DeliveryStatus.RETRYING, 0)),
        deliveries_failed=int(deliveries.get(DeliveryStatus.FAILED, 0)),
        troubled_deliveries=troubled_deliveries,
        models=tuple(model_statuses(settings, registry)),
        disk=_disk(settings),
        verification=last_verification(database),
    )
