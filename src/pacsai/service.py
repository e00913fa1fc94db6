"""The node: database, spool, receiver, study assembly, workers and the HTTP API, started and
stopped together."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

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
from pacsai.scp import InstanceStore, Receiver, Spool, SpoolSweep, StudyCompletionMonitor

if TYPE_CHECKING:
    from pacsai.api import ApiServer
    from pacsai.inference import ModelRegistry
    from pacsai.jobs import DeliveryWorkers, LocalWorkers

__all__ = ["Node", "configure_libraries", "prepare_database", "run_receiver_process"]

log = logging.getLogger(__name__)


def configure_libraries() -> None:
    """Set the libraries' process-wide flags, once, at start-up."""
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    # Tolerant when reading: a value pydicom cannot convert is kept as it arrived.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def prepare_database(settings: Settings) -> Database:
    """Open the database and bring its schema to this version's (or insist that it is)."""
    database = Database(settings.database.url, pool_size=settings.node.max_associations + 4)
    if settings.database.auto_upgrade:
        upgrade(database)
    elif current_revision(database) != head_revision():
        raise ConfigError(
            f"the database schema is at {current_revision(database)}, this pacsai needs "
            f"{head_revision()}: run `pacsai db upgrade` (database.auto_upgrade is false)"
        )
    return database


class Node:
    """Everything `pacsai serve` runs in one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database = prepare_database(settings)
        self.spool = Spool(
            settings.storage.spool_dir, min_free_bytes=settings.storage.min_free_mb * 2**20
        )
        self.instances = InstanceStore(database=self.database, spool=self.spool)
        processes = settings.receiver_process_count()
        self.receiver = Receiver(
            settings.node,
            instances=self.instances,
            reuse_port=processes > 1,
            share=processes,
            max_instance_bytes=settings.storage.max_instance_mb * 2**20,
        )
        self.sweep = SpoolSweep(
            self.database,
            self.spool,
            actor=settings.node.ae_title,
            in_flight=self.instances.in_flight,
        )
        self._children: list[BaseProcess] = []
        self.deliveries: DeliveryWorkers | None = None
        self.registry: ModelRegistry | None = None
        self.api: ApiServer | None = None
        self.workers = self._local_workers(settings)
        self.completion = StudyCompletionMonitor(
            self.database,
            interval=min(1.0, settings.node.study_quiet_seconds / 4),
            on_queued=self.workers.notify if self.workers else None,
        )
        self._stopped = threading.Event()
        self.audit_forwarder: SyslogForwarder | None = None

    def _local_workers(self, settings: Settings) -> LocalWorkers | None:
        """Job threads of the local queue backend (none with ``queue.local_workers: 0``)."""
        if settings.queue.backend != "local" or settings.queue.local_workers == 0:
            return None
        from pacsai.inference import ModelRegistry
        from pacsai.jobs import DeliveryWorkers, JobRunner, LocalWorkers

        registry = ModelRegistry.from_settings(settings.inference)
        self.registry = registry
        for entry in registry.entries.values():
            if entry.bundle is not None:
                log.info("model %s %s ready", entry.name, entry.bundle.display_version)
        runner = JobRunner(settings, self.database, registry)
        self.deliveries = DeliveryWorkers(
            settings,
            self.database,
            count=settings.queue.delivery_workers,
            poll_seconds=settings.queue.poll_seconds,
        )
        runner.on_delivery_queued = self.deliveries.notify
        return LocalWorkers(
            runner,
            self.database,
            count=settings.queue.local_workers,
            poll_seconds=settings.queue.poll_seconds,
            max_attempts=settings.queue.max_attempts,
        )

    def _audit_activity(self, event_type: AuditEventType) -> None:
        with self.database.transaction() as session:
            append_event(
                session=session,
                event_id=AuditEventId.APPLICATION_ACTIVITY,
                event_type=event_type,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.SUCCESS,
                actor=self.settings.node.ae_title,
                detail={"version": __version__},
            )

    def start(self) -> None:
        """Recover what a previous run left, then receive and assemble studies."""
        leftovers = self.spool.clean_incoming()
        with self.database.transaction() as session:
            interrupted = interrupt_open_associations(session=session, now=utcnow())
        if leftovers or interrupted:
            log.warning(
                "recovered from an unclean stop: %d unacknowledged partial files removed, "
                "%d open associations closed as INTERRUPTED",
                leftovers,
                interrupted,
            )
        self.audit_forwarder = start_forwarding(self.settings, self.database.engine)
        self._audit_activity(AuditEventType.APPLICATION_START)
        self.receiver.start()
        self.sweep.start()  # at start-up, then hourly
        self._start_children()
        if self.workers is not None:
            self.workers.recover()
            self.workers.start()
        if self.deliveries is not None:
            self.deliveries.start()
        self.completion.run_once()  # studies that went quiet while the node was down
        self.completion.start()
        if self.settings.api.enabled:
            try:
                self._start_api()
            except PacsaiError:
                self.stop()
                raise
        node = self.settings.node
        log.info(
            "pacsai %s listening as AE %s on %s:%d%s; database %s; spool %s",
            __version__,
            node.ae_title,
            node.host,
            self.receiver.port,
            " (TLS)" if node.tls.enabled else "",
            self.database.display_url,
            self.spool.root,
        )

    @property
    def api_port(self) -> int | None:
        """The port the HTTP API listens on (``None`` when it is not enabled)."""
        return self.api.port if self.api is not None else None

    def _start_api(self) -> None:
        """Serve the HTTP API from a thread of this process (``api.enabled``)."""
        from pacsai.api import ApiServer, create_app

        app = create_app(
            self.settings,
            self.database,
            registry=self.registry,
            queue_probe=self._workers_alive if self.workers is not None else None,
            on_retry=self._wake_workers,
        )
        server = ApiServer(app, host=self.settings.api.host, port=self.settings.api.port)
        server.start()
        self.api = server

    def _workers_alive(self) -> tuple[int, int]:
        """(alive, expected) local job worker threads, for the API's readiness check."""
        assert self.workers is not None
        return self.workers.alive, self.workers.count

    def _wake_workers(self) -> None:
        """A retry through the API queued a job or deliveries: run them now, not at the next
        poll."""
        if self.workers is not None:
            self.workers.notify()
        if self.deliveries is not None:
            self.deliveries.notify()

    def stop(self) -> None:
        """Finish in-flight instances, stop, and record the stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.api is not None:
            self.api.stop()
        log.info("stopping: no new associations; waiting for open ones to finish")
        for child in self._children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)
        stopping = time.monotonic()
        self.receiver.stop(self.settings.node.shutdown_grace_seconds)
        self.sweep.stop()
        for child in self._children:  # they stop as this process does: within grace + 4 s
            child.join(
                max(
                    0.1,
                    stopping + self.settings.node.shutdown_grace_seconds + 4.5 - time.monotonic(),
                )
            )
            if child.is_alive():
                child.kill()
        self.completion.stop()
        if self.workers is not None:
            self.workers.stop()
        if self.deliveries is not None:
            self.deliveries.stop()
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
                args=(data, extra + 1, os.getpid()),
                name=f"pacsai-receiver-{index + 1}",
                daemon=False,
            )
            child.start()
            self._children.append(child)


def run_receiver_process(data: dict[str, Any], processes: int, parent_pid: int) -> None:
    """Entry point of an extra receiver process: receive until SIGTERM or the parent is gone.

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
    spool = Spool(settings.storage.spool_dir, min_free_bytes=settings.storage.min_free_mb * 2**20)
    receiver = Receiver(
        settings.node,
        instances=InstanceStore(database=database, spool=spool),
        reuse_port=True,
        share=processes,
        max_instance_bytes=settings.storage.max_instance_mb * 2**20,
    )
    receiver.start()
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:  # the parent was killed: stop receiving, cleanly
            log.warning("the main pacsai process is gone; this receiver stops")
            break
    receiver.stop(settings.node.shutdown_grace_seconds)
    database.dispose()
