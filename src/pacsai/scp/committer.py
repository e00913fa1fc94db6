"""Group commit: instance rows from every association of a receiver, committed together.

Each C-STORE handler, its instance written to the spool, queues it and waits. One of the
waiting handlers leads: it records everything queued up meanwhile in one transaction, makes
their files durable (their writeback started when they were written), commits once, and
releases each handler with its own result; then another waiting handler whose instance is not
yet committed leads the next group. Every instance is still
acknowledged only after its own commit. With one association a group is one instance,
committed by its own handler thread (no hand-over to another thread); with many, one commit
(one fsync) serves many instances.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pacsai.db import Database
from pacsai.db.repository import (
    InstanceRefused,
    PendingInstance,
    RecordResult,
    record_instances,
)
from pacsai.errors import DatabaseError, PacsaiError

__all__ = ["GroupCommitter"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Ticket:
    pending: PendingInstance
    result: RecordResult | PacsaiError | None = None
    retried: bool = False


class GroupCommitter:
    """Commits instance rows in groups; :meth:`record` returns once its instance is committed.

    Parameters
    ----------
    database
        Where the rows go.
    max_batch
        The most instances one transaction records.
    before_commit
        Runs with each group after its statements, before its commit (the spool makes the
        group's files durable there, their writeback having proceeded meanwhile); an error it
        raises fails the group.
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
        self._queue: list[_Ticket] = []
        self._condition = threading.Condition()
        self._leading = False
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
        with self._condition:
            if self._stopped:
                raise DatabaseError("the receiver is stopping; send the instance again later")
            self._queue.append(ticket)
            while ticket.result is None:
                if self._leading:
                    self._condition.wait()
                    continue
                self._lead()
        if isinstance(ticket.result, PacsaiError):
            raise ticket.result
        return ticket.result

    def _lead(self) -> None:
        """Commit the next group, with the condition's lock released meanwhile."""
        self._leading = True
        group, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        self._condition.release()
        try:
            self._commit(group)
        finally:
            self._condition.acquire()
            self._leading = False
            self._condition.notify_all()

    def stop(self) -> None:
        """Refuse new instances (those being committed finish)."""
        with self._condition:
            self._stopped = True

    def _commit(self, batch: list[_Ticket]) -> None:
        if not batch:
            return
        # One version of a SOP Instance UID per transaction: a later one waits for the next.
        now: list[_Ticket] = []
        seen: set[str] = set()
        later: list[_Ticket] = []
        for ticket in batch:
            uid = ticket.pending.item.sop_instance_uid
            (later if uid in seen else now).append(ticket)
            seen.add(uid)
        results: Sequence[RecordResult | PacsaiError]
        try:
            with self.database.transaction() as session:
                results = record_instances(session=session, pending=[t.pending for t in now])
                if self.before_commit is not None:
                    self.before_commit([t.pending for t in now])
        except InstanceRefused as exc:
            # Rolled back: the refused instance is answered (or, if its statement failed
            # because another process inserted it meanwhile, tried once more), the rest of
            # the group is recorded again.
            refused = now[exc.index]
            if isinstance(exc.error, DatabaseError) and not refused.retried:
                refused.retried = True
                later.append(refused)
            else:
                refused.result = exc.error
            self._commit(now[: exc.index] + now[exc.index + 1 :] + later)
            return
        except PacsaiError as exc:
            results = [exc] * len(now)
            log.error("could not commit %d instance(s): %s", len(now), exc)
        except Exception as exc:  # the leader must answer every instance of its group
            log.exception("unexpected error committing %d instance(s)", len(now))
            results = [DatabaseError(f"unexpected error: {type(exc).__name__}")] * len(now)
        for ticket, result in zip(now, results, strict=True):
            ticket.result = result
        if later:
            self._commit(later)
