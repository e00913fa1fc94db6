"""The local queue backend: worker threads in the `pacsai serve` process poll the job table.

Jobs are claimed with a guarded update, so any number of threads (and nodes sharing a database)
run each job once. Workers wake up as soon as the study completion monitor queues a job, and
otherwise poll every ``queue.poll_seconds``.
"""

from __future__ import annotations

import logging
import threading

from pacsai.db import Database, utcnow
from pacsai.db.jobs import claim_job, requeue_interrupted
from pacsai.errors import PacsaiError
from pacsai.jobs.runner import JobRunner

__all__ = ["LocalWorkers"]

log = logging.getLogger(__name__)


class LocalWorkers:
    """``count`` threads running QUEUED jobs until :meth:`stop`."""

    def __init__(
        self,
        runner: JobRunner,
        database: Database,
        *,
        count: int = 1,
        poll_seconds: float = 1.0,
        max_attempts: int = 3,
    ) -> None:
        self.runner = runner
        self.database = database
        self.count = count
        self.poll_seconds = poll_seconds
        self.max_attempts = max_attempts
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def recover(self) -> None:
        """Requeue jobs a stopped node left RUNNING (only safe while no worker runs)."""
        with self.database.transaction() as session:
            requeued, failed = requeue_interrupted(
                session=session, now=utcnow(), max_attempts=self.max_attempts
            )
        if requeued or failed:
            log.warning("interrupted jobs: %d queued again, %d failed", requeued, failed)

    def notify(self) -> None:
        """A job was queued: wake a worker now."""
        self._wake.set()

    def run_pending(self) -> int:
        """Run QUEUED jobs in this thread until none is left; the number run."""
        ran = 0
        while not self._stop.is_set():
            with self.database.transaction() as session:
                job_id = claim_job(session=session, now=utcnow())
            if job_id is None:
                return ran
            self.runner.run(job_id)
            ran += 1
        return ran

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pending()
            except PacsaiError as exc:
                log.error("job worker: %s; retrying", exc)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def start(self) -> None:
        """Start the worker threads."""
        for index in range(self.count):
            thread = threading.Thread(
                target=self._loop, name=f"pacsai-worker-{index + 1}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking jobs; a job in progress finishes (or is requeued at the next start)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
