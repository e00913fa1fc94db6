"""Listeners told about audit events once they are committed (forwarding to syslog, for one).

:func:`~pacsai.db.audit.append_event` calls :func:`note_appended` for each row it adds; the rows
are kept on the session and handed to the listeners of that database's engine right after the
transaction commits, as immutable :class:`~pacsai.db.audit_query.AuditRecord` values. A rolled
back transaction tells nobody anything. Listeners run in the committing thread, so they must be
quick (put the records on a queue) and should not raise; one that does is logged and skipped, and
never fails the commit, which has already happened.

Listeners are registered per engine, so two nodes (or a node and a CLI command) in one process do
not see each other's events.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, SessionTransaction

from pacsai.db._audit_record import AuditRecord
from pacsai.db.models import AuditEvent

__all__ = ["AuditListener", "add_listener", "listeners", "note_appended", "remove_listener"]

log = logging.getLogger(__name__)

#: Called with the audit rows one transaction committed, in chain order.
AuditListener = Callable[[Sequence[AuditRecord]], None]

_PENDING = "pacsai.audit.pending"
_lock = threading.Lock()
_listeners: weakref.WeakKeyDictionary[Engine, tuple[AuditListener, ...]] = (
    weakref.WeakKeyDictionary()
)


def add_listener(engine: Engine, listener: AuditListener) -> None:
    """Call `listener` with the audit rows of every transaction committed on `engine`."""
    with _lock:
        _listeners[engine] = (*_listeners.get(engine, ()), listener)


def remove_listener(engine: Engine, listener: AuditListener) -> None:
    """Stop calling `listener`; removing one that is not registered does nothing."""
    with _lock:
        remaining = tuple(item for item in _listeners.get(engine, ()) if item != listener)
        if remaining:
            _listeners[engine] = remaining
        else:
            _listeners.pop(engine, None)


def listeners(engine: Engine) -> tuple[AuditListener, ...]:
    """The listeners registered on `engine`."""
    with _lock:
        return _listeners.get(engine, ())


def note_appended(session: Session, row: AuditEvent) -> None:
    """Remember a flushed audit row, to be handed to the engine's listeners at commit."""
    engine = session.get_bind().engine
    if not listeners(engine):
        return  # nobody listens: no copy, no bookkeeping
    pending: tuple[Engine, list[AuditRecord]] = session.info.setdefault(_PENDING, (engine, []))
    pending[1].append(AuditRecord.from_row(row))


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    pending: tuple[Engine, list[AuditRecord]] | None = session.info.pop(_PENDING, None)
    if not pending:
        return
    engine, records = pending
    batch = tuple(records)
    for listener in listeners(engine):
        try:
            listener(batch)
        except Exception:  # the commit is done: a failing listener must not fail the caller
            log.exception("an audit listener failed; the events are in the database regardless")


@event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    # after_commit has taken what was committed; whatever is left was rolled back.
    if transaction.parent is None:
        session.info.pop(_PENDING, None)
