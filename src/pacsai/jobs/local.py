"""The local queue backend: the job table is the queue, and workers poll it.

Submitting wakes the workers of this node (`pacsai serve`'s worker process); workers elsewhere
(`pacsai worker` on other hosts sharing the database) find the job at their next poll, every
``queue.poll_seconds``. Jobs are claimed with a guarded update under a lease, so any number of
threads, processes and nodes run each job once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from pacsai.config import Settings
from pacsai.db import Database
from pacsai.jobs._polling import PollingWorkers
from pacsai.jobs.heartbeat import HeldLeases
from pacsai.jobs.queue import JobQueue, QueueHealth
from pacsai.jobs.runner import JobRunner

__all__ = ["LocalQueue", "LocalWorkers"]

log = logging.getLogger(__name__)


class LocalQueue(JobQueue):
    """Submitting is waking the node's workers; the database does the rest."""

    backend = "local"

    def __init__(
        self, settings: Settings, database: Database, *, wake: Callable[[], None] | None = None
    ) -> None:
        super().__init__(settings, database)
        self._wake = wake

    def submit(self, job_ids: Sequence[int]) -> None:
        self.notify()

    def notify(self) -> None:
        if self._wake is not None:
            self._wake()

    def health(self) -> QueueHealth:
        return QueueHealth(True, "workers poll the database")


class LocalWorkers(PollingWorkers):
    """``count`` threads running QUEUED jobs of ``queues`` (``None``: every queue) until
    :meth:`stop`."""

    kind = "worker"

    def __init__(
        self,
        runner: JobRunner,
        *,
        held: HeldLeases,
        count: int = 1,
        poll_seconds: float = 1.0,
        queues: Sequence[str] | None = None,
    ) -> None:
        super().__init__(count=count, poll_seconds=poll_seconds)
        self.runner = runner
        self.held = held
        self.queues = queues

    def drain(self) -> int:
        """Run QUEUED jobs in this thread until none is left; the number run."""
        ran = 0
        while not self.stopping:
            lease = self.runner.claim(queues=self.queues)
            if lease is None:
                return ran
            with self.held.job(lease.job_id):
                self.runner.run(lease)
            ran += 1
        return ran
