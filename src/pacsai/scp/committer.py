"""Group commit: instance rows from every association of a receiver, committed together.

Each C-STORE handler hands its instance (already durable in the spool) to one committer thread
and waits. The committer records whatever has queued up meanwhile in one transaction, commits
once, and only then releases each waiting handler with its own result, so every instance is
still acknowledged only after its commit. With one association a batch is one instance; with
many, one commit (one fsync) serves many instances.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pacsai.db import Database
from pacsai.db.repository import PendingInstance, RecordResult, record_instances
from pacsai.errors import DatabaseError, PacsaiError

__all__ = ["GroupCommitter"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Ticket:
    pending: PendingInstance
    done: threading.Event = field(default_factory=threading.Event)
    result: RecordResult | PacsaiError | None = None
    retried: bool = False


_STOP = object()


class GroupCommitter:
    """Commits instance rows in groups; :meth:`record` blocks until its instance's commit.

    Parameters
    ----------
    database
        Where the rows go.
    max_batch
        The most instances one transaction records.
    before_commit
        Runs with each batch before its transaction (the spool syncs the batch's directories
        there); an error it raises fails the batch.
    """

    def __init__(
        self,
        database: Database,
        *,
        max_batch: int = 64,
        before_commit: Callable[[list[PendingInstance]], None] | None = None,
    ) -> None:
        self.database = database
        self.max_batch = max_batch
        self.before_commit = before_commit
        self._queue: queue.SimpleQueue[_Ticket | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def record(self, pending: PendingInstance) -> RecordResult:
        """Record one instance; return once it is committed.

        Raises
        ------
        InvalidInstanceError
            If the database refuses it (its series belongs to another study).
        DatabaseError
            If it could not be recorded (the sender may send it again). When the commit
            itself failed, whether the row was committed is unknown.
        """
        ticket = _Ticket(pending)
        self._ensure_running()
        self._queue.put(ticket)
        ticket.done.wait()
        if isinstance(ticket.result, PacsaiError):
            raise ticket.result
        assert ticket.result is not None
        return ticket.result

    def _ensure_running(self) -> None:
        with self._lock:
            if self._stopped:
                raise DatabaseError("the receiver is stopping; send the instance again later")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pacsai-committer", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                batch.append(more)
            self._commit([t for t in batch if isinstance(t, _Ticket)])
            if stop:
                return

    def _commit(self, batch: list[_Ticket]) -> None:
        # One version of a SOP Instance UID per transaction: a later one waits for the next.
        now: list[_Ticket] = []
        seen: set[str] = set()
        later: list[_Ticket] = []
        for ticket in batch:
            uid = ticket.pending.item.sop_instance_uid
            (later if uid in seen else now).append(ticket)
            seen.add(uid)
        results: list[RecordResult | PacsaiError]
        batch_failed = True
        try:
            if self.before_commit is not None:
                self.before_commit([t.pending for t in now])
            with self.database.transaction() as session:
                results = record_instances(session=session, pending=[t.pending for t in now])
            batch_failed = False
        except PacsaiError as exc:
            results = [exc] * len(now)
            log.error("could not commit %d instance(s): %s", len(now), exc)
        except Exception as exc:  # the committer must outlive any one batch
            log.exception("unexpected error committing %d instance(s)", len(now))
            results = [DatabaseError(f"unexpected error: {type(exc).__name__}")] * len(now)
        for ticket, result in zip(now, results, strict=True):
            if isinstance(result, DatabaseError) and not batch_failed and not ticket.retried:
                ticket.retried = True  # its own statement failed (a concurrent insert): again
                later.append(ticket)
                continue
            ticket.result = result
            ticket.done.set()
        if later:
            self._commit(later)
