"""`pacsai serve`'s worker process: jobs and deliveries run in a child process, supervised.

A job may need many gigabytes; if the kernel's out-of-memory killer (or a crash in native code)
ends the process running it, only the worker goes, never the receiver: the worker raises its own
``oom_score_adj`` so that the killer picks it first. The supervisor sees the
child end, takes back what it held at once (its jobs QUEUED again, or FAILED with the cause after
``queue.max_attempts``; its deliveries due again), and starts a new child after a backoff that
doubles up to a minute while children keep dying young. The child is the same code as
`pacsai worker` (:class:`pacsai.jobs.worker.Worker`), and it dies with its parent. Its log
records come back through a pipe and go through the node's own logging set-up, so that the
node's log is one stream (text or JSON) whichever process wrote a line.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import logging.handlers
import multiprocessing
import os
import pickle
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pacsai.config import Settings
from pacsai.db import Database, Worker, utcnow
from pacsai.db.workers import stop_worker
from pacsai.errors import PacsaiError
from pacsai.jobs.identity import host_name
from pacsai.jobs.recovery import recover_lost_work

__all__ = ["WorkerSupervisor", "describe_exit", "run_worker_process"]

log = logging.getLogger(__name__)

_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 60.0
_HEALTHY_AFTER = 60.0  # a child that ran this long resets the backoff


def describe_exit(exitcode: int | None) -> str:
    """How a child process ended, in words an operator can act on."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return f"was killed by {name} (the kernel's out-of-memory killer sends it)"
        return f"was killed by {name}"
    return f"exited with status {exitcode}"


class WorkerSupervisor:
    """Runs one worker child process and restarts it whenever it ends unasked."""

    def __init__(self, settings: Settings, database: Database, *, name: str = "serve") -> None:
        self.settings = settings
        self.database = database
        self.name = name
        self._context = multiprocessing.get_context("spawn")
        # A pipe per child, not a multiprocessing.Event: setting an Event whose waiter was killed
        # blocks forever (its condition waits for the dead waiter to wake).
        self._wake: Connection | None = None
        self._stop = threading.Event()
        self._child: BaseProcess | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.restarts = 0
        self.last_exit: str | None = None

    def wake(self) -> None:
        """Tell the child that work was queued (never blocks: a full or broken pipe means the
        child has wake-ups pending, or is gone)."""
        writer = self._wake
        if writer is None:
            return
        with contextlib.suppress(OSError):
            writer.send_bytes(b"w")

    def alive(self) -> bool:
        """Whether the child process runs now."""
        child = self._child
        return child is not None and child.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._supervise, name="pacsai-supervisor", daemon=True
        )
        self._thread.start()

    def begin_stop(self) -> None:
        """Ask the child to stop: it takes no new work, and its running job finishes."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._lock:
            child = self._child
        if child is not None and child.pid is not None and child.is_alive():
            os.kill(child.pid, signal.SIGTERM)

    def stop(self, timeout: float) -> None:
        """Ask the child to stop (unless :meth:`begin_stop` did) and wait up to ``timeout``
        seconds; then kill it (its leases are taken back at the next start)."""
        self.begin_stop()
        with self._lock:
            child = self._child
        if child is not None and child.pid is not None and child.is_alive():
            child.join(timeout)
            if child.is_alive():
                log.warning("the worker process did not stop within %.0f s: killing it", timeout)
                child.kill()
                child.join(10)
        if self._thread is not None:
            self._thread.join(15)

    def _spawn(self) -> BaseProcess:
        reader, writer = self._context.Pipe(duplex=False)
        os.set_blocking(writer.fileno(), False)
        log_reader, log_writer = self._context.Pipe(duplex=False)
        child = self._context.Process(
            target=run_worker_process,
            args=(
                self.settings.model_dump(mode="json"),
                self.name,
                reader,
                os.getpid(),
                log_writer,
                logging.getLogger().getEffectiveLevel(),
            ),
            name=f"pacsai-{self.name}-worker",
            daemon=False,
        )
        child.start()
        reader.close()  # the child's ends: a dead child then breaks the pipes
        log_writer.close()
        threading.Thread(
            target=_relay_logs, args=(log_reader,), name="pacsai-worker-log", daemon=True
        ).start()
        previous, self._wake = self._wake, writer
        if previous is not None:
            previous.close()
        return child

    def _supervise(self) -> None:
        backoff = _FIRST_BACKOFF
        while not self._stop.is_set():
            with self._lock:
                if self._stop.is_set():
                    return
                child = self._child = self._spawn()
            started = time.monotonic()
            child.join()
            if self._stop.is_set():
                return
            ran = time.monotonic() - started
            self.last_exit = describe_exit(child.exitcode)
            self.restarts += 1
            backoff = _FIRST_BACKOFF if ran >= _HEALTHY_AFTER else min(backoff * 2, _MAX_BACKOFF)
            log.error(
                "the worker process (pid %s) %s after %.0f s; reception goes on, the worker "
                "restarts in %.0f s",
                child.pid,
                self.last_exit,
                ran,
                backoff,
                extra={"action": "worker_died", "exitcode": child.exitcode},
            )
            self._take_back(child)
            if self._stop.wait(backoff):
                return

    def _take_back(self, child: BaseProcess) -> None:
        """End the leases of the dead child's worker at once, naming what happened to it."""
        try:
            with self.database.reading() as session:
                ids = list(
                    session.scalars(
                        select(Worker.id).where(
                            Worker.pid == child.pid,
                            Worker.host == host_name(),
                            Worker.stopped_at.is_(None),
                        )
                    )
                )
            if not ids:
                return
            why = f"its worker process {self.last_exit}"
            recover_lost_work(self.database, self.settings, owners=ids, why=why)
            with self.database.transaction() as session:
                for worker_id in ids:
                    stop_worker(
                        session=session, worker_id=worker_id, pid=child.pid or 0, now=utcnow()
                    )
        except PacsaiError as exc:
            log.error("could not take back the dead worker's jobs (they run out): %s", exc)


def _relay_logs(reader: Connection) -> None:
    """Hand the worker process's log records to this process's handlers, until it ends."""
    with reader:
        while True:
            try:
                fields = reader.recv()
            except (EOFError, OSError, pickle.UnpicklingError):  # the child is gone
                return
            record = logging.makeLogRecord(fields)
            logging.getLogger(record.name).handle(record)


class _PipeHandler(logging.handlers.QueueHandler):
    """Sends each record (message formatted, exception as text) to the parent process."""

    def __init__(self, writer: Connection) -> None:
        super().__init__(queue=None)  # type: ignore[arg-type]
        self.writer = writer

    def enqueue(self, record: logging.LogRecord) -> None:
        fields = {
            key: value if isinstance(value, str | int | float | bool | type(None)) else str(value)
            for key, value in record.__dict__.items()
        }
        with contextlib.suppress(OSError):  # the parent is gone; this process follows it
            self.writer.send(fields)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel kill this process when its parent dies (a killed node takes its
    worker with it); elsewhere the worker notices within a second."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


#: /proc/self/oom_score_adj of the worker process: when memory runs out, the kernel's
#: out-of-memory killer picks it before the receiver, the database or anything else on the host.
OOM_SCORE_ADJ = 500


def _first_for_the_oom_killer() -> None:
    """Linux: offer this process first to the out-of-memory killer (raising one's own score
    needs no privilege); elsewhere nothing."""
    try:
        Path("/proc/self/oom_score_adj").write_text(str(OOM_SCORE_ADJ), encoding="ascii")
    except OSError as exc:
        log.debug("oom_score_adj not set: %s", exc)


def run_worker_process(
    data: dict[str, Any],
    name: str,
    wake: Connection,
    parent_pid: int,
    log_writer: Connection,
    log_level: int,
) -> None:
    """Entry point of `pacsai serve`'s worker process: a :class:`Worker` of every queue."""
    _die_with_parent(parent_pid)
    _first_for_the_oom_killer()
    from pacsai.jobs.worker import ALL_QUEUES, Worker, WorkerOptions
    from pacsai.service import configure_libraries

    settings = Settings(**data)
    root = logging.getLogger()
    for handler in list(root.handlers):  # every record goes to the parent's handlers instead
        root.removeHandler(handler)
    root.addHandler(_PipeHandler(log_writer))
    root.setLevel(min(log_level, logging.getLevelName(settings.logging.level)))
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # as pacsai.logs does
    configure_libraries()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    worker = Worker(
        settings,
        WorkerOptions(
            name=name,
            queues=ALL_QUEUES,
            concurrency=settings.queue.local_workers,
            audit_activity=False,
        ),
    )
    signal.signal(signal.SIGTERM, lambda _signum, _frame: worker.request_stop())
    try:
        worker.start()
    except PacsaiError as exc:
        log.error("the worker process cannot start: %s", exc)
        worker.stop()
        raise SystemExit(3) from exc

    def relay() -> None:
        while not worker.stopped.is_set():
            try:
                if wake.poll(0.5):
                    while wake.poll(0):
                        wake.recv_bytes()
                    worker.wake()
            except (EOFError, OSError):  # the parent is gone
                worker.request_stop()
                return
            if os.getppid() != parent_pid:
                log.warning("the pacsai serve process is gone; this worker stops")
                worker.request_stop()

    threading.Thread(target=relay, name="pacsai-wake", daemon=True).start()
    worker.run()
