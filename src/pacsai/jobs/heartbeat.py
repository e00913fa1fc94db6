"""A worker's heartbeat: one thread that renews the leases of the work in progress in this
process and its row in the workers table, every third of ``queue.lease_seconds``.

Only work a thread of this process is actually doing is renewed (:class:`HeldLeases`): a lease
left behind by a failure runs out like a lost worker's. One statement per table renews all the
threads' leases at once. If the worker's row was taken over (another process judged it gone),
the worker is told to stop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pacsai._periodic import Periodic
from pacsai.db import Database, utcnow
from pacsai.db.deliveries import renew_delivery_leases
from pacsai.db.jobs import renew_job_leases
from pacsai.db.workers import heartbeat_worker

__all__ = ["Heartbeat", "HeldLeases"]

log = logging.getLogger(__name__)


class HeldLeases:
    """The jobs and deliveries the threads of this process are working on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: set[int] = set()
        self._deliveries: set[int] = set()

    @contextmanager
    def job(self, job_id: int) -> Iterator[None]:
        """While the block runs, the heartbeat renews the lease of ``job_id``."""
        with self._lock:
            self._jobs.add(job_id)
        try:
            yield
        finally:
            with self._lock:
                self._jobs.discard(job_id)

    @contextmanager
    def delivery(self, delivery_id: int) -> Iterator[None]:
        """While the block runs, the heartbeat renews the lease of ``delivery_id``."""
        with self._lock:
            self._deliveries.add(delivery_id)
        try:
            yield
        finally:
            with self._lock:
                self._deliveries.discard(delivery_id)

    def snapshot(self) -> tuple[list[int], list[int]]:
        """(job ids, delivery ids) held now."""
        with self._lock:
            return sorted(self._jobs), sorted(self._deliveries)


class Heartbeat:
    """Renews ``worker_id``'s leases and heartbeat until :meth:`stop`.

    Parameters
    ----------
    models
        Returns the state of the worker's models (name -> "warm", "loading" or an error),
        recorded with each beat.
    on_lost
        Called (once) when the worker's row was taken over by another process.
    """

    def __init__(
        self,
        database: Database,
        *,
        held: HeldLeases,
        worker_id: str,
        pid: int,
        lease_seconds: float,
        models: Callable[[], dict[str, str]],
        on_lost: Callable[[], None],
    ) -> None:
        self.database = database
        self.held = held
        self.worker_id = worker_id
        self.pid = pid
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / 3
        self.models = models
        self.on_lost = on_lost
        self._thread = Periodic(
            "pacsai-heartbeat",
            self._beat_or_stop,
            interval=self.interval,
            what=f"worker {worker_id}: heartbeat",
        )

    def beat(self) -> bool:
        """Renew once; ``False`` if the worker's row is no longer its own."""
        now = utcnow()
        jobs, deliveries = self.held.snapshot()
        with self.database.transaction() as session:
            renew_job_leases(
                session=session,
                owner=self.worker_id,
                job_ids=jobs,
                now=now,
                lease_seconds=self.lease_seconds,
            )
            renew_delivery_leases(
                session=session,
                owner=self.worker_id,
                delivery_ids=deliveries,
                now=now,
                lease_seconds=self.lease_seconds,
            )
            return heartbeat_worker(
                session=session,
                worker_id=self.worker_id,
                pid=self.pid,
                now=now,
                models=self.models(),
            )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()

    def _beat_or_stop(self) -> bool:
        """One beat; ``False`` (the thread ends) once the worker's row is another's."""
        if self.beat():
            return True
        log.error(
            "worker %s was taken for gone by another process: stopping",
            self.worker_id,
            extra={"action": "worker_lost", "worker": self.worker_id},
        )
        self.on_lost()
        return False
