"""The one seam between "a job is QUEUED" and "a worker runs it": :class:`JobQueue`.

The database stays the truth of every job; a queue only carries job ids to workers. Two
backends implement it: ``local`` (workers poll the job table; :mod:`pacsai.jobs.local`) and
``celery`` (job ids are published to RabbitMQ; :mod:`pacsai.jobs.broker`). Whichever it is, a
reconciler runs every ``queue.reconcile_seconds`` in every receiver and worker: it takes back
jobs whose worker's lease ran out (:mod:`pacsai.jobs.recovery`) and hands the queue what it may
have missed (a broker that was down when a study completed).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from pacsai._periodic import Periodic
from pacsai.config import Settings
from pacsai.db import Database, JobStatus
from pacsai.db.jobs import LostJob
from pacsai.jobs.recovery import recover_lost_work

__all__ = ["JobQueue", "QueueHealth", "make_queue"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueHealth:
    """Whether the queue's transport can carry jobs now, and why not."""

    ok: bool
    detail: str


class JobQueue(ABC):
    """Hands QUEUED jobs (by id) to workers; reconciles what was lost on the way."""

    backend: ClassVar[str]

    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.database = database
        self._thread = Periodic(
            "pacsai-reconciler",
            self.recover,
            interval=settings.queue.reconcile_seconds,
            what="queue reconciliation",
        )

    @abstractmethod
    def submit(self, job_ids: Sequence[int]) -> None:
        """These jobs were committed QUEUED: get them to a worker.

        Never raises for a transport that is down: the job stays QUEUED in the database and the
        reconciler hands it over once the transport is back.
        """

    def notify(self) -> None:  # noqa: B027 - only the local backend has workers to wake
        """Something was queued or made due by hand (a retry): wake local workers now."""

    @abstractmethod
    def health(self) -> QueueHealth:
        """Whether jobs can reach workers now (the broker answers, ...)."""

    def reconcile(self) -> None:  # noqa: B027 - only a broker can lose what it was given
        """Hand over QUEUED jobs the transport may have lost (the celery backend)."""

    def recover(self) -> list[LostJob]:
        """Take back jobs whose worker's lease ran out, submit those QUEUED again, then
        reconcile; the jobs taken back."""
        lost = recover_lost_work(self.database, self.settings)
        again = [job.job_id for job in lost if job.status is JobStatus.QUEUED]
        if again:
            self.submit(again)
        self.reconcile()
        return lost

    def start(self) -> None:
        """Run the reconciler every ``queue.reconcile_seconds`` until :meth:`stop`."""
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()


def make_queue(
    settings: Settings, database: Database, *, wake: Callable[[], None] | None = None
) -> JobQueue:
    """The queue of ``queue.backend``; ``wake`` tells local workers that work was queued."""
    if settings.queue.backend == "celery":
        from pacsai.jobs.broker import CeleryQueue

        return CeleryQueue(settings, database)
    from pacsai.jobs.local import LocalQueue

    return LocalQueue(settings, database, wake=wake)
