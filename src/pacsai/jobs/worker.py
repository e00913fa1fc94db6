"""A worker process: what `pacsai worker` runs, and what `pacsai serve` runs as its child.

At start a worker checks that it can see its device (or refuses to start, saying why), records
itself in the workers table under its node's identity, takes back what this node's dead workers
held (their job leases end: QUEUED again, or FAILED after ``queue.max_attempts``; their
deliveries are due again and check what already arrived), and loads and warms its models. Then
it runs jobs (polling the database, or consuming RabbitMQ with the celery backend) and
deliveries, renewing its leases and its heartbeat, until it is stopped.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pacsai import __version__
from pacsai.config import Settings
from pacsai.db import (
    AuditAction,
    AuditEventId,
    AuditEventType,
    AuditOutcome,
    Database,
    JobStatus,
    append_event,
    utcnow,
)
from pacsai.db.workers import register_worker, stop_worker
from pacsai.errors import ConfigError, DatabaseError, ModelError
from pacsai.jobs.deliveries import DeliveryWorkers
from pacsai.jobs.heartbeat import Heartbeat, HeldLeases
from pacsai.jobs.identity import host_name, node_id, process_alive
from pacsai.jobs.local import LocalWorkers
from pacsai.jobs.queue import JobQueue, make_queue
from pacsai.jobs.recovery import recover_lost_work
from pacsai.jobs.runner import JobRunner

if TYPE_CHECKING:
    from pacsai.inference import ModelRegistry

__all__ = ["ALL_QUEUES", "Worker", "WorkerOptions", "warm_models"]

log = logging.getLogger(__name__)

ALL_QUEUES = ("*",)


@dataclass(frozen=True)
class WorkerOptions:
    """How one worker process runs.

    Attributes
    ----------
    name:
        Its name within the node (the worker id is ``<node id>/<name>``, ``-2``... when taken).
    device:
        The inference device (``cuda:N``, ``cpu``); ``None``: ``inference.device``.
    queues:
        The job queues it takes; ``("*",)`` takes every queue (the local backend only).
    concurrency:
        Jobs run at once (threads sharing the warmed models).
    audit_activity:
        Audit its start and stop (110100); `pacsai serve`'s own worker leaves that to the node.
    """

    name: str = "worker"
    device: str | None = None
    queues: tuple[str, ...] = ("default",)
    concurrency: int = 1
    audit_activity: bool = True


def warm_models(registry: ModelRegistry, *, run: bool = True) -> dict[str, str]:
    """Make every ready bundle ready for the first job now; each model's state (``warm``, or
    why it is not).

    With ``run`` (``inference.warm_up``), each model is loaded onto the registry's device and
    run once on a synthetic volume of its declared input (CUDA context, cuDNN autotuning), so
    that the first study is as fast as the second and a bundle that cannot run is refused now,
    with its cause; then the reporting path runs once for them
    (:func:`pacsai.reporting.warm.warm_up`: highdicom's imports and tables, each bundle's
    segment codes, the BINARY form).
    Without it, models are only loaded.
    """
    states: dict[str, str] = {}
    if run:
        for result in registry.warm_up():
            states[result.name] = (
                "warm" if result.status == "ready" else f"refused: {result.reason or 'unknown'}"
            )
        from pacsai.reporting.warm import warm_up as warm_reporting

        ready = [registry.get(name) for name, state in states.items() if state == "warm"]
        if ready:
            seconds = warm_reporting(ready)
            log.info(
                "reporting warmed up for %s in %.1f s",
                ", ".join(bundle.name for bundle in ready),
                seconds,
                extra={"action": "reporting_warm"},
            )
        return states
    for name, entry in sorted(registry.entries.items()):
        if entry.bundle is None:
            states[name] = "refused: " + "; ".join(entry.problems)
            continue
        try:
            registry.load(name)
        except ModelError as exc:
            states[name] = f"failed: {exc}"
            log.error("model %s could not be loaded: %s", name, exc)
        else:
            states[name] = "loaded"
    return states


class Worker:
    """One worker process's jobs, deliveries, heartbeat and reconciler."""

    def __init__(self, settings: Settings, options: WorkerOptions) -> None:
        queue = settings.queue
        if options.queues == ALL_QUEUES and queue.backend == "celery":
            raise ConfigError("a celery worker consumes named queues: pass --queues")
        self.settings = settings
        self.options = options
        self.device = options.device or settings.inference.device
        self.stopped = threading.Event()
        self._finished = False
        self.held = HeldLeases()
        self.models: dict[str, str] = {}
        self.worker_id = ""
        from pacsai.service import prepare_database

        self.database: Database = prepare_database(
            settings, pool_size=options.concurrency + queue.delivery_workers + 4
        )
        self.queue: JobQueue = make_queue(settings, self.database, wake=self.wake)
        self.jobs: LocalWorkers | None = None
        self.deliveries: DeliveryWorkers | None = None
        self.heartbeat: Heartbeat | None = None
        self.runner: JobRunner | None = None

    # --- start ----------------------------------------------------------------------------

    def start(self) -> None:
        """Check the device, register, take back what dead workers of this node held, warm the
        models and start the threads.

        Raises
        ------
        ConfigError
            If this worker cannot see its device.
        """
        registry = self._registry()
        settings = self.settings
        with self.database.transaction() as session:
            registration = register_worker(
                session=session,
                node_id=node_id(settings.node),
                name=self.options.name,
                host=host_name(),
                pid=os.getpid(),
                backend=settings.queue.backend,
                device=self.device,
                queues=self.options.queues,
                concurrency=self.options.concurrency,
                version=__version__,
                now=utcnow(),
                is_alive=process_alive,
            )
        self.worker_id = registration.worker_id
        if registration.gone:
            lost = recover_lost_work(
                self.database,
                settings,
                owners=registration.gone,
                why=f"worker {', '.join(registration.gone)} of this node stopped running",
            )
            self.queue.submit([job.job_id for job in lost if job.status is JobStatus.QUEUED])
        self.models = {name: "loading" for name in registry.entries}
        self.heartbeat = Heartbeat(
            self.database,
            held=self.held,
            worker_id=self.worker_id,
            pid=os.getpid(),
            lease_seconds=settings.queue.lease_seconds,
            models=lambda: dict(self.models),
            on_lost=self.request_stop,
        )
        self.heartbeat.beat()  # its models are "loading" while they warm
        self.heartbeat.start()
        self.models = warm_models(registry, run=settings.inference.warm_up)
        self.heartbeat.beat()
        self.runner = JobRunner(
            settings, self.database, registry, owner=self.worker_id, serves=self.serves
        )
        self.runner.on_jobs_queued = self.queue.submit
        self.deliveries = DeliveryWorkers(
            settings,
            self.database,
            owner=self.worker_id,
            held=self.held,
            count=settings.queue.delivery_workers,
            poll_seconds=settings.queue.poll_seconds,
        )
        self.runner.on_delivery_queued = self.deliveries.notify
        self.deliveries.start()
        self.queue.start()
        if settings.queue.backend == "local":
            self.jobs = LocalWorkers(
                self.runner,
                held=self.held,
                count=self.options.concurrency,
                poll_seconds=settings.queue.poll_seconds,
                queues=None if self.options.queues == ALL_QUEUES else self.options.queues,
            )
            self.jobs.start()
        if self.options.audit_activity:
            self._audit(AuditEventType.APPLICATION_START)
        log.info(
            "worker %s ready: %s backend, queues %s, device %s, %d job thread(s), models %s",
            self.worker_id,
            settings.queue.backend,
            ",".join(self.options.queues),
            self.device,
            self.options.concurrency,
            ", ".join(f"{name} {state}" for name, state in self.models.items()) or "none",
            extra={"action": "worker_ready", "worker": self.worker_id},
        )

    def _registry(self) -> ModelRegistry:
        from pacsai.inference import ModelRegistry
        from pacsai.inference.model import resolve_device

        try:
            resolve_device(self.device)
        except ModelError as exc:
            raise ConfigError(f"this worker cannot use device {self.device!r}: {exc}") from exc
        inference = self.settings.inference
        return ModelRegistry(inference.models_dir, device=self.device, amp=inference.amp)

    def serves(self, queue: str) -> bool:
        """Whether this worker takes jobs of ``queue``."""
        return self.options.queues == ALL_QUEUES or queue in self.options.queues

    # --- run and stop ---------------------------------------------------------------------

    def run(self) -> None:
        """Run until :meth:`request_stop` (or, with celery, SIGTERM), then stop cleanly."""
        try:
            if self.settings.queue.backend == "celery":
                from pacsai.jobs.broker import run_celery_worker

                run_celery_worker(
                    self.settings,
                    worker_id=self.worker_id,
                    queues=self.options.queues,
                    concurrency=self.options.concurrency,
                    run_job=self.run_job,
                )
            else:
                while not self.stopped.wait(0.5):
                    pass
        finally:
            self.stop()

    def run_job(self, job_id: int) -> None:
        """Run one job named by a message, if it is still QUEUED (or its lease ran out)."""
        assert self.runner is not None
        lease = self.runner.claim(job_id=job_id)
        if lease is None:
            lost = recover_lost_work(self.database, self.settings, job_id=job_id)
            if any(job.status is JobStatus.QUEUED for job in lost):
                lease = self.runner.claim(job_id=job_id)
        if lease is None:
            log.info("job %d is taken or finished: nothing to do for this message", job_id)
            return
        with self.held.job(lease.job_id):
            self.runner.run(lease)

    def request_stop(self) -> None:
        """Stop taking work (what runs finishes first)."""
        self.stopped.set()
        if self.settings.queue.backend == "celery":
            from pacsai.jobs.broker import stop_celery_worker

            stop_celery_worker()

    def wake(self) -> None:
        """Work was queued on this node: look for it now."""
        if self.jobs is not None:
            self.jobs.notify()
        if self.deliveries is not None:
            self.deliveries.notify()

    def stop(self) -> None:
        """Let running jobs and deliveries finish, then record the stop (once)."""
        if self._finished:
            return
        self._finished = True
        self.stopped.set()
        if self.jobs is not None:
            self.jobs.stop()
        if self.deliveries is not None:
            self.deliveries.stop()
        self.queue.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.worker_id:
            try:
                with self.database.transaction() as session:
                    stop_worker(
                        session=session, worker_id=self.worker_id, pid=os.getpid(), now=utcnow()
                    )
                if self.options.audit_activity:
                    self._audit(AuditEventType.APPLICATION_STOP)
            except DatabaseError as exc:
                log.error("worker %s: its stop could not be recorded: %s", self.worker_id, exc)
        self.database.dispose()
        log.info("worker %s stopped", self.worker_id or self.options.name)

    def _audit(self, event_type: AuditEventType) -> None:
        with self.database.transaction() as session:
            append_event(
                session=session,
                event_id=AuditEventId.APPLICATION_ACTIVITY,
                event_type=event_type,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.SUCCESS,
                actor=self.settings.node.ae_title,
                detail={
                    "version": __version__,
                    "component": "worker",
                    "worker": self.worker_id,
                    "device": self.device,
                    "queues": list(self.options.queues),
                },
            )
