"""The job: route -> volume -> model -> result (-> report -> deliver), its queue backends, and the
worker processes that run jobs and deliveries under leases."""

from __future__ import annotations

from pacsai.jobs.deliveries import DeliveryWorkers
from pacsai.jobs.local import LocalQueue, LocalWorkers
from pacsai.jobs.queue import JobQueue, QueueHealth, make_queue
from pacsai.jobs.runner import JobOutcome, JobRunner
from pacsai.jobs.worker import Worker, WorkerOptions, warm_models

__all__ = [
    "DeliveryWorkers",
    "JobOutcome",
    "JobQueue",
    "JobRunner",
    "LocalQueue",
    "LocalWorkers",
    "QueueHealth",
    "Worker",
    "WorkerOptions",
    "make_queue",
    "warm_models",
]
