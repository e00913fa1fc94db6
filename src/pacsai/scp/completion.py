"""Study assembly: a study is complete once no instance arrived for its quiet period, or
sooner when an MPPS step or an HL7 order said what it holds and all of that has arrived.

The timer is derived from ``studies.last_received_at`` in the database, not from memory, so
studies still receiving when the node stopped resume their timers after a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from pacsai._periodic import Periodic
from pacsai.db import Database, Job, utcnow
from pacsai.db.repository import complete_expected_studies, complete_quiet_studies

__all__ = ["StudyCompletionMonitor"]

log = logging.getLogger(__name__)


class StudyCompletionMonitor:
    """Checks every `interval` seconds for studies whose expected content has arrived and for
    quiet studies, and queues one job for each.

    Safe to run in several processes against one database: completion is a guarded update, so a
    study completes once. ``on_queued`` gets the ids of the jobs queued, once committed (the job
    queue submits them).
    """

    def __init__(
        self,
        database: Database,
        *,
        interval: float = 1.0,
        on_queued: Callable[[Sequence[int]], None] | None = None,
    ) -> None:
        self.database = database
        self.interval = interval
        self.on_queued = on_queued
        self._thread = Periodic(
            "pacsai-completion", self.run_once, interval=interval, what="study completion check"
        )

    def run_once(self) -> list[Job]:
        """Complete every study that has what was expected of it, or is quiet, now; return the
        jobs queued."""
        with self.database.transaction() as session:
            now = utcnow()
            jobs = complete_expected_studies(session=session, now=now)
            jobs += complete_quiet_studies(session=session, now=now)
        for job in jobs:
            log.info(
                "study complete, job %d queued (%d instances)",
                job.id,
                job.instance_count,
                extra={"action": "job_queued", "job_id": job.id, "study_id": job.study_id},
            )
        if jobs and self.on_queued is not None:
            self.on_queued([job.id for job in jobs])
        return jobs

    def start(self) -> None:
        """Run in a background thread until :meth:`stop`."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (a check in progress finishes first)."""
        self._thread.stop()
