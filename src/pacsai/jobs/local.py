"""The local queue backend: worker threads in the `pacsai serve` process poll the job table.

Jobs are claimed with a guarded update, so any number of threads (and nodes sharing a database)
run each job once. Workers wake up as soon as the study completion monitor queues a job, and
otherwise poll every ``queue.poll_seconds``.
"""

from __future__ import annotations

import logging

from pacsai.db import Database, utcnow
from pacsai.db.jobs import claim_job, requeue_interrupted
from pacsai.jobs._polling import PollingWorkers
from pacsai.jobs.runner import JobRunner

__all__ = ["LocalWorkers"]

log = logging.getLogger(__name__)


class LocalWorkers(PollingWorkers):
    """``count`` threads running QUEUED jobs until :meth:`stop`."""

    kind = "worker"

    def __init__(
        self,
        runner: JobRunner,
        database: Database,
        *,
        count: int = 1,
        poll_seconds: float = 1.0,
        max_attempts: int = 3,
    ) -> None:
        super().__init__(count=count, poll_seconds=poll_seconds)
        self.runner = runner
        self.database = database
        self.max_attempts = max_attempts

    def recover(self) -> None:
        """Requeue jobs a stopped node left RUNNING (only safe while no worker runs)."""
        with self.database.transaction() as session:
            requeued, failed = requeue_interrupted(
                session=session, now=utcnow(), max_attempts=self.max_attempts
            )
        if requeued or failed:
            log.warning("interrupted jobs: %d queued again, %d failed", requeued, failed)

    def drain(self) -> int:
        """Run QUEUED jobs in this thread until none is left; the number run."""
        ran = 0
        while not self.stopping:
            with self.database.transaction() as session:
                job_id = claim_job(session=session, now=utcnow())
            if job_id is None:
                return ran
            self.runner.run(job_id)
            ran += 1
        return ran
