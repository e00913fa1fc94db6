"""The hash-chained audit trail: intact when appended to, broken wherever it is tampered with."""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select, text, update

from pacsai.db import (
    AuditAction,
    AuditEvent,
    AuditEventId,
    AuditEventType,
    AuditOutcome,
    ChainReport,
    Database,
    append_event,
    upgrade,
    utcnow,
    verify_chain,
)
from pacsai.db.audit import GENESIS_HASH, row_digest

ROWS = 12


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """A migrated database, SQLite or PostgreSQL (the latter marked ``postgres``)."""
    db = Database(database_url)
    upgrade(db)
    yield db
    db.dispose()


def _append(db: Database, n: int, *, actor: str = "STORESCU") -> None:
    with db.transaction() as session:
        append_event(
            session=session,
            event_id=AuditEventId.INSTANCES_TRANSFERRED,
            action=AuditAction.CREATE,
            outcome=AuditOutcome.SUCCESS,
            actor=actor,
            remote_address="127.0.0.1",
            study_instance_uid=f"1.2.826.0.1.{n}",
            patient_id=f"PID{n:04d}",
            detail={"n": n, "instances": n * 3},
        )


def _filled(db: Database, rows: int = ROWS) -> list[int]:
    for n in range(rows):
        _append(db, n)
    with db.reading() as session:
        return list(session.execute(select(AuditEvent.id).order_by(AuditEvent.id)).scalars())


def _verify(db: Database) -> ChainReport:
    with db.reading() as session:
        return verify_chain(session=session)


def _pick(ids: list[int], seed: int) -> int:
    """A random row that is neither the first nor the last (seeded, so a failure reproduces)."""
    return random.Random(seed).choice(ids[1:-1])


def test_an_empty_chain_is_intact(database: Database) -> None:
    report = _verify(database)

    assert report.intact
    assert report.rows_checked == 0
    assert report.problem is None


def test_appended_events_form_an_intact_chain(database: Database) -> None:
    ids = _filled(database)

    report = _verify(database)

    assert report.intact, report.problem
    assert report.rows_checked == ROWS == len(ids)
    with database.reading() as session:
        events = list(session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars())
    assert events[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(events):
        assert after.prev_hash == before.row_hash
    assert all(row_digest(event) == event.row_hash for event in events)


def test_several_events_in_one_transaction_chain_in_order(database: Database) -> None:
    with database.transaction() as session:
        for n in range(5):
            append_event(
                session=session,
                event_id=AuditEventId.SECURITY_ALERT,
                event_type=AuditEventType.NODE_AUTHENTICATION,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.MINOR_FAILURE,
                actor=f"AE{n}",
            )
    _append(database, 99)

    report = _verify(database)

    assert report.intact, report.problem
    assert report.rows_checked == 6


def test_a_rolled_back_append_leaves_no_trace(database: Database) -> None:
    _filled(database, 3)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), database.transaction() as session:
        append_event(
            session=session,
            event_id=AuditEventId.EXPORT,
            action=AuditAction.READ,
            outcome=AuditOutcome.SUCCESS,
            actor="ROLLEDBACK",
        )
        raise Boom
    _append(database, 4)

    report = _verify(database)
    assert report.intact, report.problem
    assert report.rows_checked == 4


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("actor", "'MALLORY'"),
        ("outcome", "12"),
        ("event_id", "'110100'"),
        ("action", "'R'"),
        ("remote_address", "'10.6.6.6'"),
        ("study_instance_uid", "'1.2.3.4'"),
        ("patient_id", "NULL"),
        ("model_version", "'9.9.9'"),
        ("detail", "'{\"n\": 0}'"),
        ("row_hash", "'" + "f" * 64 + "'"),
    ],
)
def test_editing_a_field_of_a_row_is_detected_and_named(
    database: Database, column: str, value: str
) -> None:
    ids = _filled(database)
    victim = _pick(ids, len(column))
    with database.transaction() as session:
        changed = session.execute(
            text(f"UPDATE audit_events SET {column} = {value} WHERE id = :id"), {"id": victim}
        )
        assert changed.rowcount == 1  # type: ignore[attr-defined]

    report = _verify(database)

    assert not report.intact
    assert report.first_bad_id == victim
    assert report.problem is not None and f"row {victim} " in report.problem
    assert report.rows_checked == ids.index(victim)


def test_editing_the_time_of_a_row_is_detected(database: Database) -> None:
    ids = _filled(database)
    victim = _pick(ids, 3)
    with database.reading() as session:
        when = session.execute(
            select(AuditEvent.occurred_at).where(AuditEvent.id == victim)
        ).scalar_one()
    with database.transaction() as session:
        session.execute(
            update(AuditEvent)
            .where(AuditEvent.id == victim)
            .values(occurred_at=when - timedelta(hours=1))
        )

    report = _verify(database)

    assert report.first_bad_id == victim
    assert report.problem is not None and str(victim) in report.problem


def test_rewriting_a_row_with_a_recomputed_hash_breaks_the_next_link(database: Database) -> None:
    """A forger who also recomputes the row's own hash is caught by the row after it."""
    ids = _filled(database)
    victim = _pick(ids, 4)
    with database.reading() as session:
        event = session.get(AuditEvent, victim)
        assert event is not None
        event.actor = "MALLORY"
        forged_hash = row_digest(event)
    with database.transaction() as session:
        session.execute(
            text("UPDATE audit_events SET actor = 'MALLORY', row_hash = :h WHERE id = :id"),
            {"h": forged_hash, "id": victim},
        )

    report = _verify(database)

    following = ids[ids.index(victim) + 1]
    assert report.first_bad_id == following
    assert report.problem is not None
    assert f"row {following} " in report.problem and f"row {victim}" in report.problem


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_deleting_a_row_is_detected_at_the_row_after_it(database: Database, seed: int) -> None:
    ids = _filled(database)
    victim = _pick(ids, seed)
    with database.transaction() as session:
        session.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": victim})

    report = _verify(database)

    before, after = ids[ids.index(victim) - 1], ids[ids.index(victim) + 1]
    assert report.first_bad_id == after
    assert report.problem is not None
    assert f"row {after} " in report.problem and f"row {before}" in report.problem
    assert "deleted" in report.problem


def test_deleting_the_first_row_is_detected(database: Database) -> None:
    ids = _filled(database)
    with database.transaction() as session:
        session.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": ids[0]})

    report = _verify(database)

    assert report.first_bad_id == ids[1]
    assert report.problem is not None and "start of the chain" in report.problem


def _forged_row(database: Database, *, prev_id: int | None, new_id: int) -> dict[str, object]:
    """A well-formed row (its own hash is right) that links to `prev_id` instead of the tail."""
    with database.reading() as session:
        prev_hash = (
            GENESIS_HASH
            if prev_id is None
            else session.execute(
                select(AuditEvent.row_hash).where(AuditEvent.id == prev_id)
            ).scalar_one()
        )
    event = AuditEvent(
        id=new_id,
        occurred_at=utcnow(),
        event_id=str(AuditEventId.IMPORT),
        event_type=None,
        action=str(AuditAction.CREATE),
        outcome=int(AuditOutcome.SUCCESS),
        actor="FORGER",
        remote_address=None,
        study_instance_uid=None,
        patient_id=None,
        model_name=None,
        model_version=None,
        detail=None,
        prev_hash=prev_hash,
    )
    event.row_hash = row_digest(event)
    return {column.key: getattr(event, column.key) for column in AuditEvent.__table__.columns}


@pytest.mark.parametrize("seed", [8, 9])
def test_a_row_inserted_out_of_order_is_detected_and_named(database: Database, seed: int) -> None:
    """A row linked to an older row (as by a writer that bypassed the chain lock) is caught."""
    ids = _filled(database)
    stale = _pick(ids, seed)
    forged_id = ids[-1] + 1000
    row = _forged_row(database, prev_id=stale, new_id=forged_id)
    with database.transaction() as session:
        session.execute(insert(AuditEvent).values(**row))

    report = _verify(database)

    assert report.first_bad_id == forged_id
    assert report.problem is not None
    assert f"row {forged_id} " in report.problem and f"row {ids[-1]}" in report.problem
    assert report.rows_checked == len(ids)


def test_a_row_inserted_before_the_first_is_detected(database: Database) -> None:
    ids = _filled(database)
    row = _forged_row(database, prev_id=None, new_id=ids[0] - 1)
    with database.transaction() as session:
        session.execute(insert(AuditEvent).values(**row))

    report = _verify(database)

    assert report.first_bad_id == ids[0]
    assert report.problem is not None and f"row {ids[0] - 1}" in report.problem


def test_appends_after_tampering_do_not_heal_the_chain(database: Database) -> None:
    ids = _filled(database)
    victim = _pick(ids, 10)
    with database.transaction() as session:
        session.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": victim})
    _filled(database, 5)

    report = _verify(database)

    assert report.first_bad_id == ids[ids.index(victim) + 1]


def test_four_threads_appending_keep_the_chain_linear(database: Database) -> None:
    threads_count, per_thread = 4, 50
    errors: list[BaseException] = []
    start = threading.Barrier(threads_count)

    def worker(index: int) -> None:
        try:
            start.wait(timeout=30)
            for n in range(per_thread):
                _append(database, n, actor=f"WRITER{index}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)

    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    report = _verify(database)
    assert report.intact, report.problem
    assert report.rows_checked == threads_count * per_thread
    with database.reading() as session:
        total = session.execute(select(func.count()).select_from(AuditEvent)).scalar_one()
        distinct_prev = session.execute(
            select(func.count(func.distinct(AuditEvent.prev_hash)))
        ).scalar_one()
        actors = session.execute(
            select(AuditEvent.actor, func.count()).group_by(AuditEvent.actor)
        ).all()
    assert total == distinct_prev == threads_count * per_thread  # no two rows share a parent
    assert dict(actors) == {f"WRITER{i}": per_thread for i in range(threads_count)}
