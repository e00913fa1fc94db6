"""The celery backend: a job's id travels through RabbitMQ to `pacsai worker` processes.

- Each job queue (``default``, or a route's ``queue:``) is a durable RabbitMQ queue named
  ``<queue.broker_queue_prefix>.<queue>``; messages are persistent and published with publisher
  confirms, so a message the broker took survives its restart.
- A worker takes one message at a time (prefetch 1) and acknowledges it only when the job has
  run (late acknowledgement): a worker that dies leaves its message to be delivered again.
- The message is only a job id. The worker claims the job in the database under a lease; a
  second delivery of the same message finds the job taken or done and does nothing, so a
  re-delivery never runs a job twice, and a job's results are never sent twice.
- A study completed while the broker is down stays QUEUED in the database. The reconciler
  compares, per queue, the QUEUED jobs with the messages waiting in the broker and publishes the
  ones missing (oldest first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import amqp.exceptions
import kombu.exceptions
from celery import Celery
from sqlalchemy import func, select, update

from pacsai.config import Settings
from pacsai.db import Database, Job, JobStatus, utcnow
from pacsai.errors import PacsaiError
from pacsai.jobs.queue import JobQueue, QueueHealth

__all__ = [
    "TASK",
    "CeleryQueue",
    "broker_queue",
    "celery_app",
    "run_celery_worker",
    "stop_celery_worker",
]

log = logging.getLogger(__name__)

TASK = "pacsai.run_job"
#: What a broker that is down or unreachable raises, from kombu, py-amqp or the socket.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.OperationalError,
    amqp.exceptions.AMQPError,
    OSError,
)


def broker_queue(settings: Settings, queue: str) -> str:
    """The RabbitMQ queue of a job queue."""
    return f"{settings.queue.broker_queue_prefix}.{queue}"


def celery_app(settings: Settings) -> Celery:
    """The Celery application of these settings (one per process)."""
    assert settings.queue.broker_url is not None
    app = Celery("pacsai", broker=settings.queue.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=broker_queue(settings, "default"),
        task_create_missing_queues=True,
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for the broker to come back
        broker_connection_timeout=4.0,
        # A job keeps running when the connection drops; its lease, not the broker, says who
        # holds it, and the message delivered again meanwhile finds it taken.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        # The workers table is the registry of workers: no pidbox, mingle or gossip traffic.
        worker_enable_remote_control=False,
    )
    return app


class CeleryQueue(JobQueue):
    """Publishes job ids to RabbitMQ; reconciles QUEUED jobs missing from it."""

    backend = "celery"

    def __init__(self, settings: Settings, database: Database) -> None:
        super().__init__(settings, database)
        self.app = celery_app(settings)

    def submit(self, job_ids: Sequence[int]) -> None:
        if not job_ids:
            return
        with self.database.reading() as session:
            queues = dict(
                session.execute(
                    select(Job.id, Job.queue).where(
                        Job.id.in_(list(job_ids)), Job.status == JobStatus.QUEUED
                    )
                ).all()
            )
        published = []
        for job_id, queue in queues.items():
            try:
                self.app.send_task(
                    TASK, args=[job_id], queue=broker_queue(self.settings, queue), retry=False
                )
            except BROKER_ERRORS as exc:
                log.warning(
                    "job %d stays QUEUED: the broker is unreachable (%s); it is published once "
                    "the broker is back",
                    job_id,
                    _describe(exc),
                    extra={"action": "publish_failed", "job_id": job_id},
                )
                break
            published.append(job_id)
        if published:
            with self.database.transaction() as session:
                session.execute(
                    update(Job).where(Job.id.in_(published)).values(published_at=utcnow())
                )

    def notify(self) -> None:
        """A retry made jobs QUEUED: publish them now rather than at the next reconciliation."""
        try:
            self.reconcile()
        except PacsaiError as exc:
            log.warning(
                "could not publish the jobs queued again now (%s); the reconciler will", exc
            )

    def health(self) -> QueueHealth:
        where = self._broker_display()
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=3)
        except BROKER_ERRORS as exc:
            return QueueHealth(False, f"broker {where} unreachable: {_describe(exc)}")
        return QueueHealth(True, f"broker {where} reachable")

    def reconcile(self) -> None:
        """Publish QUEUED jobs missing from their broker queue (oldest first)."""
        now = utcnow()
        fresh = now - timedelta(seconds=self.settings.queue.reconcile_seconds)
        with self.database.reading() as session:
            counts = dict(
                session.execute(
                    select(Job.queue, func.count(Job.id))
                    .where(Job.status == JobStatus.QUEUED)
                    .group_by(Job.queue)
                ).all()
            )
        if not counts:
            return
        try:
            waiting = self._waiting(list(counts))
        except BROKER_ERRORS as exc:
            log.warning("cannot reach the broker to reconcile: %s", _describe(exc))
            return
        for queue, queued in counts.items():
            missing = queued - waiting.get(queue, 0)
            if missing <= 0:
                continue
            with self.database.reading() as session:
                stale = (
                    session.scalars(
                        select(Job.id)
                        .where(
                            Job.status == JobStatus.QUEUED,
                            Job.queue == queue,
                            (Job.published_at.is_(None)) | (Job.published_at < fresh),
                        )
                        .order_by(Job.published_at.is_not(None), Job.published_at, Job.id)
                        .limit(missing)
                    )
                ).all()
            if stale:
                log.info(
                    "queue %s: %d QUEUED jobs, %d messages waiting: publishing %d again",
                    queue,
                    queued,
                    waiting.get(queue, 0),
                    len(stale),
                )
                self.submit(list(stale))

    def _waiting(self, queues: list[str]) -> dict[str, int]:
        """Messages ready in each queue's broker queue (0 when it does not exist yet)."""
        waiting = {}
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
            for queue in queues:
                waiting[queue] = _ready(connection, broker_queue(self.settings, queue))
        return waiting

    def _broker_display(self) -> str:
        with self.app.connection_for_write() as connection:
            return str(connection.as_uri())


def _ready(connection: Any, name: str) -> int:
    channel = connection.channel()
    try:
        return int(channel.queue_declare(queue=name, passive=True).message_count)
    except amqp.exceptions.NotFound:
        return 0
    finally:
        # A channel the broker closed (NOT_FOUND) has nothing left to close.
        with contextlib.suppress(*BROKER_ERRORS):
            channel.close()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def run_celery_worker(
    settings: Settings,
    *,
    worker_id: str,
    queues: Sequence[str],
    concurrency: int,
    run_job: Callable[[int], None],
) -> int:
    """Consume ``queues`` in this thread (the process's main thread) until SIGTERM or
    :func:`stop_celery_worker`; each message runs ``run_job(job_id)`` in one of
    ``concurrency`` threads sharing the process's warmed models. Returns Celery's exit code."""
    app = celery_app(settings)

    @app.task(name=TASK, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def run_job_task(job_id: int) -> None:
        try:
            run_job(int(job_id))
        except PacsaiError as exc:  # the job stays in the database; the reconciler retries it
            log.error("job %s could not be run here: %s", job_id, exc)

    worker: Any = app.Worker(
        hostname=f"{worker_id}@{socket.gethostname()}",
        queues=[broker_queue(settings, queue) for queue in queues],
        pool="threads",
        concurrency=concurrency,
        without_mingle=True,
        without_gossip=True,
        loglevel=settings.logging.level,
        quiet=True,
        optimization="fair",
    )
    worker.start()
    return int(worker.exitcode or 0)


def stop_celery_worker() -> None:
    """Ask the Celery worker of this process for a warm shutdown (the running jobs finish)."""
    os.kill(os.getpid(), signal.SIGTERM)
