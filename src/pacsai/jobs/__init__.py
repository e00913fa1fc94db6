"""The job: route -> volume -> model -> result (-> report -> deliver), and its queue backends."""

from __future__ import annotations

from pacsai.jobs.deliveries import DeliveryWorkers
from pacsai.jobs.local import LocalWorkers
from pacsai.jobs.runner import JobOutcome, JobRunner

__all__ = ["DeliveryWorkers", "JobOutcome", "JobRunner", "LocalWorkers"]
