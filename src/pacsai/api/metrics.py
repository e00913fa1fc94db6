"""``GET /metrics``: Prometheus text, read from the database at scrape time.

The numbers are the database's, not this process's: they are right whichever process received
or ran what (several receiver processes, Celery workers, a restart), and cost one small set of
aggregate queries per scrape. Open when ``api.open_metrics`` is true, otherwise admin only.

- ``pacsai_instances_received_total``, ``pacsai_received_bytes_total``: instances stored;
- ``pacsai_associations_total{outcome}``: accepted associations by outcome;
- ``pacsai_studies_completed_total``: studies gone quiet (COMPLETE);
- ``pacsai_jobs{status}``, ``pacsai_queue_depth``: jobs by state, QUEUED jobs;
- ``pacsai_job_stage_seconds{stage}`` (histogram): finished jobs' per-stage timings;
- ``pacsai_job_duration_seconds`` (histogram): finished jobs, start to finish;
- ``pacsai_deliveries{status}``: deliveries by state;
- ``pacsai_worker_heartbeat_age_seconds{worker,device}``, ``pacsai_worker_models_warm{worker}``:
  each running worker (workers table): seconds since its last heartbeat (alert when it exceeds
  ``queue.lease_seconds``: its jobs are then taken back), and how many models it has warm;
- ``pacsai_gpu_memory_allocated_bytes{device}``, ``pacsai_gpu_memory_reserved_bytes{device}``:
  this process's GPU memory, when PyTorch is imported and has CUDA in use;
- ``pacsai_database_up``: 1 when the queries answered; ``pacsai_info{version}``.
"""

from __future__ import annotations

import bisect
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacsai import __version__
from pacsai.api._context import ApiContext, api_context
from pacsai.api.auth import require_role
from pacsai.api.problems import problem_responses
from pacsai.db import (
    Association,
    AssociationOutcome,
    Database,
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    Study,
    StudyStatus,
    utcnow,
)
from pacsai.db.workers import list_workers
from pacsai.errors import DatabaseError

__all__ = ["BUCKETS", "DatabaseCollector", "metrics_router", "new_registry"]

log = logging.getLogger("pacsai.api")

BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _Histogram:
    """Cumulative bucket counts and a sum, built from observations."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative, out = 0, []
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            cumulative += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
        return out


class DatabaseCollector(Collector):
    """A Prometheus collector whose values are queried from the database at each scrape."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def describe(self) -> Iterable[Metric]:
        return []  # no query at registration; the metrics are known at scrape time

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily("pacsai_info", "pacsai version", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info
        try:
            with self.database.reading() as session:
                families = list(self._from_database(session))
        except DatabaseError as exc:
            log.warning("metrics: database not answering (%s)", type(exc.__cause__).__name__)
            families = []
        yield GaugeMetricFamily(
            "pacsai_database_up", "1 when the database answered", value=1.0 if families else 0.0
        )
        yield from families
        yield from _gpu_memory()

    def _from_database(self, session: Session) -> Iterator[Metric]:
        count, size = session.execute(
            select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
        ).one()
        yield CounterMetricFamily(
            "pacsai_instances_received", "DICOM instances stored", value=float(count)
        )
        yield CounterMetricFamily(
            "pacsai_received_bytes", "Bytes of the DICOM instances stored", value=float(size)
        )
        yield _by_label(
            CounterMetricFamily(
                "pacsai_associations", "Accepted associations by outcome", labels=["outcome"]
            ),
            session.execute(
                select(Association.outcome, func.count(Association.id)).group_by(
                    Association.outcome
                )
            ),
            [o.value for o in AssociationOutcome],
        )
        completed = session.scalar(
            select(func.count(Study.id)).where(Study.status == StudyStatus.COMPLETE)
        )
        yield CounterMetricFamily(
            "pacsai_studies_completed", "Studies complete (quiet)", value=float(completed or 0)
        )
        jobs: dict[JobStatus, int] = {
            status: count
            for status, count in session.execute(
                select(Job.status, func.count(Job.id)).group_by(Job.status)
            )
        }
        yield _by_label(
            GaugeMetricFamily("pacsai_jobs", "Jobs by state", labels=["status"]),
            jobs.items(),
            [s.value for s in JobStatus],
        )
        yield GaugeMetricFamily(
            "pacsai_queue_depth",
            "Jobs waiting for a worker",
            value=float(jobs.get(JobStatus.QUEUED, 0)),
        )
        yield from _job_histograms(session)
        yield _by_label(
            GaugeMetricFamily("pacsai_deliveries", "Deliveries by state", labels=["status"]),
            session.execute(
                select(Delivery.status, func.count(Delivery.id)).group_by(Delivery.status)
            ),
            [s.value for s in DeliveryStatus],
        )
        yield from _workers(session)


def _workers(session: Session) -> Iterator[Metric]:
    now = utcnow()
    age = GaugeMetricFamily(
        "pacsai_worker_heartbeat_age_seconds",
        "Seconds since each running worker's last heartbeat",
        labels=["worker", "device"],
    )
    warm = GaugeMetricFamily(
        "pacsai_worker_models_warm",
        "Models loaded and warm on each running worker",
        labels=["worker"],
    )
    for worker in list_workers(session=session):
        age.add_metric([worker.id, worker.device], (now - worker.heartbeat_at).total_seconds())
        warm.add_metric([worker.id], float(sum(s == "warm" for s in worker.models.values())))
    yield age
    yield warm


def _by_label(family: Any, rows: Iterable[Any], known: list[str]) -> Any:
    """``family`` with one sample per known label value (0 when absent) plus any other."""
    counts = {str(getattr(key, "value", key)): float(value) for key, value in rows}
    for name in dict.fromkeys([*known, *counts]):
        family.add_metric([name], counts.get(name, 0.0))
    return family


def _job_histograms(session: Session) -> Iterator[Metric]:
    stages: dict[str, _Histogram] = {}
    duration = _Histogram()
    rows = session.execute(
        select(Job.timings, Job.started_at, Job.finished_at).where(
            Job.status.in_(JobStatus.finished())
        )
    )
    for timings, started, finished in rows:
        if started is not None and finished is not None:
            duration.observe(max(0.0, (finished - started).total_seconds()))
        for stage, seconds in (json.loads(timings) if timings else {}).items():
            stages.setdefault(str(stage), _Histogram()).observe(float(seconds))
    by_stage = HistogramMetricFamily(
        "pacsai_job_stage_seconds", "Seconds per stage of finished jobs", labels=["stage"]
    )
    for stage, histogram in sorted(stages.items()):
        by_stage.add_metric([stage], histogram.buckets(), histogram.total)
    yield by_stage
    whole = HistogramMetricFamily(
        "pacsai_job_duration_seconds", "Seconds from start to finish of finished jobs"
    )
    whole.add_metric([], duration.buckets(), duration.total)
    yield whole


def _gpu_memory() -> Iterator[Metric]:
    """GPU memory of this process, only where PyTorch is already imported and using CUDA."""
    torch: Any = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    allocated = GaugeMetricFamily(
        "pacsai_gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=["device"]
    )
    reserved = GaugeMetricFamily(
        "pacsai_gpu_memory_reserved_bytes", "GPU memory reserved by PyTorch", labels=["device"]
    )
    for index in range(torch.cuda.device_count()):
        allocated.add_metric([f"cuda:{index}"], float(torch.cuda.memory_allocated(index)))
        reserved.add_metric([f"cuda:{index}"], float(torch.cuda.memory_reserved(index)))
    yield allocated
    yield reserved


def new_registry(database: Database) -> CollectorRegistry:
    """A registry of this application only (not the process-wide default)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(database))
    return registry


def metrics_router(open_metrics: bool) -> APIRouter:
    """The route, open or behind an admin token."""
    dependencies = [] if open_metrics else [Depends(require_role("admin"))]
    router = APIRouter(tags=["health"], dependencies=dependencies)

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
            **(problem_responses() if open_metrics else problem_responses(401, 403)),
        },
    )
    def metrics(context: Annotated[ApiContext, Depends(api_context)]) -> Response:
        """Counts of what was received, run and delivered, queue depth, timings, GPU memory."""
        registry = context.metrics
        assert registry is not None  # set by create_app
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
