"""The node: database, spool, receiver, study assembly, the job queue, the worker process and the
HTTP API, started and stopped together (or some of them, by role)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Literal

import pydicom.config
from pynetdicom import _config as pynetdicom_config

from pacsai import __version__
from pacsai.audit_syslog import SyslogForwarder, start_forwarding
from pacsai.config import Settings
from pacsai.db import (
    AuditAction,
    AuditEventId,
    AuditEventType,
    AuditOutcome,
    Database,
    append_event,
    current_revision,
    head_revision,
    upgrade,
    utcnow,
)
from pacsai.db.repository import interrupt_open_associations
from pacsai.errors import ConfigError, PacsaiError
from pacsai.jobs.identity import node_id
from pacsai.jobs.queue import JobQueue, make_queue
from pacsai.scp import InstanceStore, Receiver, Spool, SpoolSweep, StudyCompletionMonitor
from pacsai.scp.counts import NodeCounts
from pacsai.scp.orders import OrderListener
from pacsai.scp.retention import RetentionMonitor

if TYPE_CHECKING:
    from pacsai.api import ApiServer
    from pacsai.inference import ModelRegistry
    from pacsai.jobs.supervisor import WorkerSupervisor

__all__ = ["Node", "Role", "configure_libraries", "prepare_database", "run_receiver_process"]

log = logging.getLogger(__name__)


def configure_libraries() -> None:
    """Set the libraries' process-wide flags, once, at start-up."""
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    # Tolerant when reading: a value pydicom cannot convert is kept as it arrived.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def prepare_database(settings: Settings, *, pool_size: int | None = None) -> Database:
    """Open the database and bring its schema to this version's (or insist that it is)."""
    database = Database(
        settings.database.url, pool_size=pool_size or settings.node.max_associations + 4
    )
    if settings.database.auto_upgrade:
        upgrade(database)
    elif current_revision(database) != head_revision():
        raise ConfigError(
            f"the database schema is at {current_revision(database)}, this pacsai needs "
            f"{head_revision()}: run `pacsai db upgrade` (database.auto_upgrade is false)"
        )
    return database


Role = Literal["all", "receiver", "api"]


class Node:
    """What one `pacsai serve` process runs, by ``role``.

    - ``all`` (the default): receiver, study completion, the HTTP API (``api.enabled``), and
      with the local backend a supervised worker child process running jobs and deliveries;
    - ``receiver``: receiver and study completion only, submitting jobs to the queue;
    - ``api``: the HTTP API only.

    Every role but ``api`` runs the queue's reconciler (expired leases, lost messages).
    """

    def __init__(self, settings: Settings, *, role: Role = "all") -> None:
        self.settings = settings
        self.role = role
        self.database = prepare_database(settings)
        # The identity its associations, leases and temporary spool files carry.
        self.node_id = node_id(settings.node) if role != "api" else None
        self.spool = _spool(settings, self.node_id)
        self.instances = InstanceStore(
            database=self.database, spool=self.spool, node_id=self.node_id
        )
        processes = settings.receiver_process_count()
        # the node's connections and associations, counted across its receiver processes
        self.counts = NodeCounts(processes)
        self.receiver = Receiver(  # started unless the role is api
            settings.node,
            instances=self.instances,
            reuse_port=processes > 1,
            counts=self.counts,
            max_instance_bytes=settings.storage.max_instance_mb * 2**20,
        )
        self.sweep = SpoolSweep(
            self.database,
            self.spool,
            actor=settings.node.ae_title,
            in_flight=self.instances.in_flight,
        )
        # Retention runs where the spool is written and 0xA700 is decided (scp.retention).
        self.retention = RetentionMonitor(self.database, settings, self.spool)
        if role != "api":
            self.spool.space_keeper = self.retention
        self._children: list[BaseProcess] = []
        self.registry: ModelRegistry | None = None
        self.api: ApiServer | None = None
        self.supervisor: WorkerSupervisor | None = None
        if role == "all" and settings.queue.backend == "local" and settings.queue.local_workers:
            from pacsai.jobs.supervisor import WorkerSupervisor

            self.supervisor = WorkerSupervisor(settings, self.database)
        self.queue: JobQueue = make_queue(
            settings,
            self.database,
            wake=self.supervisor.wake if self.supervisor is not None else None,
        )
        # `notify()` wakes the worker process; None when this process runs no worker.
        self.workers: JobQueue | None = self.queue if self.supervisor is not None else None
        self.deliveries: JobQueue | None = self.workers
        self.completion = StudyCompletionMonitor(
            self.database,
            interval=min(1.0, settings.node.study_quiet_seconds / 4),
            on_queued=self.queue.submit,
        )
        self.orders = (
            OrderListener(settings.orders, self.database, application=settings.node.ae_title)
            if settings.orders.enabled and role != "api"
            else None
        )
        self._stopped = threading.Event()
        self.audit_forwarder: SyslogForwarder | None = None

    def _audit_activity(self, event_type: AuditEventType) -> None:
        with self.database.transaction() as session:
            append_event(
                session=session,
                event_id=AuditEventId.APPLICATION_ACTIVITY,
                event_type=event_type,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.SUCCESS,
                actor=self.settings.node.ae_title,
                detail={"version": __version__, "role": self.role},
            )

    def start(self) -> None:
        """Recover what a previous run left, then receive, assemble studies and serve."""
        self.audit_forwarder = start_forwarding(self.settings, self.database.engine)
        if self.role != "api":
            leftovers = self.spool.clean_incoming()
            assert self.node_id is not None
            with self.database.transaction() as session:
                interrupted = interrupt_open_associations(
                    session=session, now=utcnow(), node_id=self.node_id
                )
            if leftovers or interrupted:
                log.warning(
                    "recovered from an unclean stop: %d unacknowledged partial files removed, "
                    "%d open associations closed as INTERRUPTED",
                    leftovers,
                    interrupted,
                )
        self._audit_activity(AuditEventType.APPLICATION_START)
        if self.role != "api":
            self.receiver.start()
            self.sweep.start()  # at start-up, then hourly
            self.retention.start()  # age rules at start-up, then every interval; free space
            self._start_children()
        if self.orders is not None:
            self.orders.start()
        if self.supervisor is not None:
            self.supervisor.start()
        if self.role != "api":
            self.queue.recover()  # expired leases, and jobs a broker never got
            self.queue.start()
            self.completion.run_once()  # studies that went quiet while the node was down
            self.completion.start()
        if (self.role == "all" and self.settings.api.enabled) or self.role == "api":
            try:
                self._start_api()
            except PacsaiError:
                self.stop()
                raise
        node = self.settings.node
        if self.role != "api":
            log.info(
                "pacsai %s listening as AE %s on %s:%d%s; database %s; spool %s; queue %s%s",
                __version__,
                node.ae_title,
                node.host,
                self.receiver.port,
                " (TLS)" if node.tls.enabled else "",
                self.database.display_url,
                self.spool.root,
                self.settings.queue.backend,
                "" if self.role == "all" else f"; role {self.role}",
            )

    @property
    def api_port(self) -> int | None:
        """The port the HTTP API listens on (``None`` when it is not enabled)."""
        return self.api.port if self.api is not None else None

    def _start_api(self) -> None:
        """Serve the HTTP API from a thread of this process."""
        from pacsai.api import ApiServer, create_app

        app = create_app(
            self.settings,
            self.database,
            registry=self.registry,
            queue=self.queue,
            queue_probe=self._worker_process if self.supervisor is not None else None,
            on_retry=self.queue.notify,
        )
        server = ApiServer(app, host=self.settings.api.host, port=self.settings.api.port)
        server.start()
        self.api = server

    def _worker_process(self) -> tuple[bool, str]:
        """Whether this node's worker process runs, for the API's readiness check."""
        assert self.supervisor is not None
        expected = self.settings.queue.local_workers
        if self.supervisor.alive():
            return True, f"{expected}/{expected} local workers alive (worker process running)"
        last = f", the last one {self.supervisor.last_exit}" if self.supervisor.last_exit else ""
        return False, f"0/{expected} local workers alive (worker process restarting{last})"

    def stop(self) -> None:
        """Finish in-flight instances and jobs, stop, and record the stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.api is not None:
            self.api.stop()
        grace = self.settings.node.shutdown_grace_seconds
        deadline = time.monotonic() + grace + 4.5  # SIGTERM ends within grace + 5 s
        log.info("stopping: no new associations; waiting for open ones to finish")
        if self.supervisor is not None:
            self.supervisor.begin_stop()  # the running job finishes while associations do
        for child in self._children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)
        if self.role != "api":
            self.retention.stop()  # at most one study's purge: within the grace
            self.receiver.stop(grace)
            self.sweep.stop()
        if self.orders is not None:
            self.orders.stop()
        for child in self._children:  # they stop as this process does: within grace + 4.5 s
            child.join(max(0.1, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
        if self.role != "api":
            self.completion.stop()
            self.queue.stop()
        if self.supervisor is not None:
            # The worker process was told to stop first; what it has not finished by now is
            # taken back (its leases) at the next start.
            self.supervisor.stop(max(0.1, deadline - time.monotonic()))
        self._audit_activity(AuditEventType.APPLICATION_STOP)
        if self.audit_forwarder is not None:
            self.audit_forwarder.stop()
        self.database.dispose()
        log.info("stopped")

    def _start_children(self) -> None:
        """Extra receiver processes on the same port (SO_REUSEPORT), one per further core."""
        extra = self.settings.receiver_process_count() - 1
        if extra <= 0:
            return
        context = multiprocessing.get_context("spawn")
        data = self.settings.model_dump(mode="json")
        data["node"]["port"] = self.receiver.port  # the port actually bound, if 0 was asked
        for index in range(extra):
            child = context.Process(
                target=run_receiver_process,
                args=(data, self.counts, index + 1, os.getpid()),
                name=f"pacsai-receiver-{index + 1}",
                daemon=False,
            )
            child.start()
            self._children.append(child)


def _spool(settings: Settings, node: str | None) -> Spool:
    storage = settings.storage
    return Spool(
        storage.spool_dir,
        min_free_bytes=storage.min_free_mb * 2**20,
        node_id=node or "local",
        high_water_bytes=storage.high_water_bytes,
    )


def run_receiver_process(
    data: dict[str, Any], counts: NodeCounts, slot: int, parent_pid: int
) -> None:
    """Entry point of an extra receiver process (`slot` of the node's `counts`): receive until
    SIGTERM or the parent is gone.

    Study completion, recovery and the audit of start and stop stay with the parent.
    """
    from pacsai.logs import setup_logging

    settings = Settings(**data)
    setup_logging(settings.logging)
    configure_libraries()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    database = Database(settings.database.url, pool_size=settings.node.max_associations + 2)
    node = node_id(settings.node)
    spool = _spool(settings, node)
    # Space is reclaimed here too before a refusal; the age rules run in the parent only.
    spool.space_keeper = RetentionMonitor(database, settings, spool)
    counts.claim(slot)
    receiver = Receiver(
        settings.node,
        instances=InstanceStore(database=database, spool=spool, node_id=node),
        reuse_port=True,
        counts=counts,
        max_instance_bytes=settings.storage.max_instance_mb * 2**20,
    )
    receiver.start()
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:  # the parent was killed: stop receiving, cleanly
            log.warning("the main pacsai process is gone; this receiver stops")
            break
    receiver.stop(settings.node.shutdown_grace_seconds)
    database.dispose()
