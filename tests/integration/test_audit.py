"""The audit trail you can prove, on SQLite and PostgreSQL: tampering of every kind is named by
verify, concurrent writers (threads and processes) keep one chain, queries filter and page stably,
and every way of reading it (CLI, HTTP API) is itself audited. Also: committed events reach
listeners and a syslog collector (RFC 5424 over TLS or TCP) without ever holding up an append.

tests/unit/test_audit_chain.py covers the basic tamper cases on a uniform chain; here the chain is
realistic (every column filled somewhere) and the cases are the ones it leaves out.
"""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import json
import multiprocessing
import random
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, insert, select, text, update

from pacsai.audit_syslog import SyslogForwarder, start_forwarding
from pacsai.cli import main
from pacsai.config import SyslogSettings
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
from pacsai.db.audit import _HASHED_FIELDS, row_digest
from pacsai.db.audit_hooks import add_listener, remove_listener
from pacsai.db.audit_query import (
    AuditFilter,
    AuditQueryError,
    AuditRecord,
    iter_records,
    query_events,
)
from tests.support import free_port, make_settings, wait_for

T0 = dt.datetime(2026, 2, 1, 6, 0, tzinfo=dt.UTC)
ACTORS = ("CT_SCANNER", "ORTHANC", "PACSAI", "api:alice", "cli:root")
PATIENTS = ("PAT-1", "PAT-2", "PAT-3", "PAT-4")


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    upgrade(db)
    yield db
    db.dispose()


def _event(n: int) -> dict[str, Any]:
    """The n-th event of a realistic mix: transfers, inference with models, exports, reads."""
    kind = n % 6
    patient = PATIENTS[n % len(PATIENTS)]
    study = f"1.2.826.0.1.3680043.9.{n // 3}"
    base: dict[str, Any] = {
        "occurred_at": T0 + dt.timedelta(hours=n, microseconds=n),
        "actor": ACTORS[n % len(ACTORS)],
        "study_instance_uid": study,
        "patient_id": patient,
    }
    if kind == 0:
        return base | {
            "event_id": AuditEventId.INSTANCES_TRANSFERRED,
            "action": AuditAction.CREATE,
            "outcome": AuditOutcome.SUCCESS,
            "remote_address": f"10.0.0.{n % 250}",
            "detail": {"instances": n, "association_id": f"a{n}"},
        }
    if kind == 1:
        return base | {
            "event_id": AuditEventId.INSTANCES_ACCESSED,
            "action": AuditAction.READ,
            "outcome": AuditOutcome.SUCCESS,
            "model_name": "ct_abdomen_demo",
            "model_version": f"0.1.{n}+abcdef",
            "detail": {"job_id": n},
        }
    if kind == 2:
        return base | {
            "event_id": AuditEventId.EXPORT,
            "action": AuditAction.READ,
            "outcome": AuditOutcome.SERIOUS_FAILURE if n % 4 == 0 else AuditOutcome.SUCCESS,
            "model_name": "cr_chest_demo",
            "model_version": "0.2.0",
            "detail": {"destination": "pacs"},
        }
    if kind == 3:
        return {
            "occurred_at": base["occurred_at"],
            "event_id": AuditEventId.APPLICATION_ACTIVITY,
            "event_type": AuditEventType.APPLICATION_START,
            "action": AuditAction.EXECUTE,
            "outcome": AuditOutcome.SUCCESS,
            "actor": "PACSAI",
            "detail": {"version": "1.0"},
        }
    if kind == 4:
        return base | {
            "event_id": AuditEventId.QUERY,
            "action": AuditAction.EXECUTE,
            "outcome": AuditOutcome.SUCCESS,
            "remote_address": "192.0.2.1",
        }
    return {
        "occurred_at": base["occurred_at"],
        "event_id": AuditEventId.SECURITY_ALERT,
        "event_type": AuditEventType.NODE_AUTHENTICATION,
        "action": AuditAction.EXECUTE,
        "outcome": AuditOutcome.MINOR_FAILURE,
        "actor": "INTRUDER",
        "remote_address": "203.0.113.5",
        "detail": {"reason": "not allowed"},
    }


def _fill(db: Database, count: int, start: int = 0) -> list[int]:
    ids = []
    for n in range(start, start + count):
        with db.transaction() as session:
            ids.append(append_event(session=session, **_event(n)).id)
    return ids


def _verify(db: Database) -> ChainReport:
    with db.reading() as session:
        return verify_chain(session=session)


def _records(db: Database) -> list[AuditRecord]:
    with db.reading() as session:
        return list(iter_records(session=session))


# --- tampering ------------------------------------------------------------------------------------


def _changed(column: str, value: Any) -> Any:
    """A different value of the same kind, as small a change as possible."""
    if column == "occurred_at":
        return value + dt.timedelta(microseconds=1)
    if column == "outcome":
        return 0 if value else 4
    if column in ("prev_hash", "row_hash"):
        return value[:-1] + ("0" if value[-1] != "0" else "1")
    if column == "detail":
        return None if value is None else value.replace("}", ', "x": 1}')
    return "X" if value is None else value[:-1] + ("Y" if value[-1] != "Y" else "Z")


TAMPERED_COLUMNS = (*_HASHED_FIELDS, "prev_hash", "row_hash")


def test_the_tamper_cases_cover_every_hashed_column() -> None:
    hashed = set(_HASHED_FIELDS) | {"prev_hash"}
    assert hashed <= set(TAMPERED_COLUMNS)
    assert {c.key for c in AuditEvent.__table__.columns} - hashed == {"id", "row_hash"}


@pytest.mark.parametrize("column", TAMPERED_COLUMNS)
def test_editing_any_column_of_a_random_row_is_named(database: Database, column: str) -> None:
    ids = _fill(database, 18)
    rows = {record.id: record for record in _records(database)}
    candidates = [i for i in ids[1:-1] if getattr(rows[i], column) is not None]
    victim = random.Random(zlib.crc32(column.encode())).choice(candidates)
    with database.transaction() as session:
        session.execute(
            update(AuditEvent)
            .where(AuditEvent.id == victim)
            .values({column: _changed(column, getattr(rows[victim], column))})
        )

    report = _verify(database)

    assert report.first_bad_id == victim, report
    assert report.problem is not None and f"row {victim} " in report.problem
    assert report.rows_checked == ids.index(victim)


def test_swapping_the_contents_of_two_rows_is_detected(database: Database) -> None:
    ids = _fill(database, 10)
    first, second = ids[3], ids[6]
    with database.reading() as session:
        a, b = (session.get(AuditEvent, i) for i in (first, second))
        assert a is not None and b is not None
        columns = [c.key for c in AuditEvent.__table__.columns if c.key != "id"]
        values_a = {c: getattr(a, c) for c in columns}
        values_b = {c: getattr(b, c) for c in columns}
    with database.transaction() as session:
        # through a free hash first: row_hash is unique
        session.execute(
            update(AuditEvent).where(AuditEvent.id == first).values(row_hash="swap-in-progress")
        )
        session.execute(update(AuditEvent).where(AuditEvent.id == second).values(**values_a))
        session.execute(update(AuditEvent).where(AuditEvent.id == first).values(**values_b))

    report = _verify(database)

    assert report.first_bad_id == first


def _spread_ids(database: Database, factor: int) -> None:
    """Renumber rows (id * factor, order kept) to open gaps; the chain does not hash ids."""
    with database.transaction() as session:
        session.execute(text("UPDATE audit_events SET id = -id"))
        session.execute(text(f"UPDATE audit_events SET id = -id * {factor}"))


def test_renumbering_rows_in_order_leaves_the_chain_intact(database: Database) -> None:
    _fill(database, 6)
    _spread_ids(database, 10)
    report = _verify(database)
    assert report.intact, report.problem
    assert report.rows_checked == 6


def test_a_well_formed_row_slipped_into_a_gap_is_named(database: Database) -> None:
    """A forger who links a new row to its predecessor and hashes it correctly still breaks
    the link of the row after it."""
    ids = [i * 10 for i in _fill(database, 8)]
    _spread_ids(database, 10)
    before, after = ids[3], ids[4]
    with database.reading() as session:
        prev_hash = session.execute(
            select(AuditEvent.row_hash).where(AuditEvent.id == before)
        ).scalar_one()
    forged = AuditEvent(
        id=before + 5,
        occurred_at=utcnow(),
        event_id="110103",
        event_type=None,
        action="R",
        outcome=0,
        actor="FORGER",
        remote_address=None,
        study_instance_uid="1.2.3",
        patient_id="PAT-1",
        model_name=None,
        model_version=None,
        detail=None,
        prev_hash=prev_hash,
    )
    forged.row_hash = row_digest(forged)
    values = {c.key: getattr(forged, c.key) for c in AuditEvent.__table__.columns}
    with database.transaction() as session:
        session.execute(insert(AuditEvent).values(**values))

    report = _verify(database)

    assert report.first_bad_id == after
    assert report.problem is not None
    assert f"row {after} " in report.problem and f"row {before + 5}" in report.problem


def test_a_realistic_untouched_chain_verifies(database: Database) -> None:
    _fill(database, 30)
    report = _verify(database)
    assert report.intact, report.problem
    assert report.rows_checked == 30


# --- concurrent writers ---------------------------------------------------------------------------


def _append_from_process(url: str, index: int, threads: int, per_thread: int, go: Any) -> None:
    """Child process body: its own engine, `threads` threads, each appending `per_thread`."""
    database = Database(url)
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for n in range(per_thread):
                with database.transaction() as session:
                    append_event(
                        session=session,
                        event_id=AuditEventId.INSTANCES_TRANSFERRED,
                        action=AuditAction.CREATE,
                        outcome=AuditOutcome.SUCCESS,
                        actor=f"P{index}T{thread}",
                        detail={"n": n},
                    )
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    go.wait(60)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    database.dispose()
    if errors:
        raise errors[0]


@pytest.mark.slow
def test_several_processes_with_several_threads_keep_one_linear_chain(
    database: Database, database_url: str
) -> None:
    processes_count, threads, per_thread = 3, 2, 20
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    processes = [
        context.Process(
            target=_append_from_process, args=(database_url, i, threads, per_thread, go)
        )
        for i in range(processes_count)
    ]
    for process in processes:
        process.start()
    go.set()
    for process in processes:
        process.join(240)

    assert [process.exitcode for process in processes] == [0] * processes_count
    total = processes_count * threads * per_thread
    report = _verify(database)
    assert report.intact, report.problem
    assert report.rows_checked == total
    with database.reading() as session:
        distinct_parents = session.execute(
            select(func.count(func.distinct(AuditEvent.prev_hash)))
        ).scalar_one()
        actors = dict(
            session.execute(select(AuditEvent.actor, func.count()).group_by(AuditEvent.actor)).all()
        )
    assert distinct_parents == total  # no fork: every row has its own parent
    assert actors == {
        f"P{p}T{t}": per_thread for p in range(processes_count) for t in range(threads)
    }


# --- listeners ------------------------------------------------------------------------------------


def test_listeners_get_committed_rows_in_order_and_never_rolled_back_ones(
    database: Database,
) -> None:
    batches: list[Sequence[AuditRecord]] = []
    listener = batches.append
    add_listener(database.engine, listener)
    other = Database(database.url)  # another engine on the same database: not listened to
    try:
        with database.transaction() as session:
            for n in range(3):
                append_event(session=session, **_event(n))
        with pytest.raises(RuntimeError), database.transaction() as session:
            append_event(session=session, **_event(3))
            raise RuntimeError("roll back")
        with other.transaction() as session:
            append_event(session=session, **_event(4))
        with database.transaction() as session:
            append_event(session=session, **_event(5))
    finally:
        remove_listener(database.engine, listener)
        other.dispose()

    assert [len(batch) for batch in batches] == [3, 1]
    seen = [record for batch in batches for record in batch]
    stored = {record.id: record for record in _records(database)}
    assert seen == [stored[record.id] for record in seen]  # exactly what was committed
    assert [r.actor for r in seen] == [_event(n)["actor"] for n in (0, 1, 2, 5)]


def test_a_failing_listener_never_fails_the_append(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_records: Sequence[AuditRecord]) -> None:
        raise ValueError("listener bug")

    add_listener(database.engine, broken)
    try:
        _fill(database, 2)
    finally:
        remove_listener(database.engine, broken)

    assert _verify(database).rows_checked == 2
    assert "an audit listener failed" in caplog.text


# --- queries --------------------------------------------------------------------------------------


def _everything(db: Database, audit_filter: AuditFilter, *, limit: int, newest: bool) -> list[int]:
    ids: list[int] = []
    cursor = None
    with db.reading() as session:
        while True:
            page = query_events(
                session=session,
                filters=audit_filter,
                limit=limit,
                cursor=cursor,
                newest_first=newest,
            )
            ids.extend(record.id for record in page.records)
            if page.next_cursor is None:
                return ids
            cursor = page.next_cursor


def _matches(record: AuditRecord, f: AuditFilter) -> bool:
    return (
        (not f.event_ids or record.event_id in f.event_ids)
        and (not f.event_types or record.event_type in f.event_types)
        and (f.actor is None or record.actor == f.actor)
        and (f.patient_id is None or record.patient_id == f.patient_id)
        and (f.study_instance_uid is None or record.study_instance_uid == f.study_instance_uid)
        and (not f.outcomes or record.outcome in f.outcomes)
        and (f.since is None or record.occurred_at >= f.since)
        and (f.until is None or record.occurred_at < f.until)
    )


FILTERS = [
    AuditFilter(),
    AuditFilter(event_ids=("110104",)),
    AuditFilter(event_ids=("110104", "110106")),
    AuditFilter(event_types=("110120",)),
    AuditFilter(actor="ORTHANC"),
    AuditFilter(patient_id="PAT-2"),
    AuditFilter(study_instance_uid="1.2.826.0.1.3680043.9.4"),
    AuditFilter(outcomes=(8,)),
    AuditFilter(outcomes=(4, 8)),
    AuditFilter(since=T0 + dt.timedelta(hours=10), until=T0 + dt.timedelta(hours=31)),
    AuditFilter(patient_id="PAT-1", event_ids=("110103", "110106"), outcomes=(0,)),
    AuditFilter(actor="PACSAI", since=T0 + dt.timedelta(hours=20)),
    AuditFilter(patient_id="PAT-3", actor="CT_SCANNER", until=T0 + dt.timedelta(hours=40)),
    AuditFilter(actor="nobody"),
]


def test_filters_combine_and_pages_cover_each_match_once(database: Database) -> None:
    _fill(database, 60)
    records = _records(database)

    for audit_filter in FILTERS:
        expected = sorted((r.id for r in records if _matches(r, audit_filter)), reverse=True)
        assert _everything(database, audit_filter, limit=7, newest=True) == expected, audit_filter
        assert _everything(database, audit_filter, limit=1000, newest=False) == expected[::-1]
    assert _everything(database, FILTERS[-2], limit=7, newest=True)  # the combinations match some


def test_paging_newest_first_is_stable_while_events_are_appended(database: Database) -> None:
    _fill(database, 40)
    audit_filter = AuditFilter(patient_id="PAT-2")
    expected = [r.id for r in reversed(_records(database)) if r.patient_id == "PAT-2"]
    seen: list[int] = []
    cursor = None
    appended = 40
    while True:
        with database.reading() as session:
            page = query_events(session=session, filters=audit_filter, limit=3, cursor=cursor)
        seen.extend(record.id for record in page.records)
        _fill(database, 4, start=appended)  # new matching and other events between pages
        appended += 4
        if page.next_cursor is None:
            break
        cursor = page.next_cursor

    assert seen == expected  # no duplicate, no gap, nothing new slipped in


def test_paging_oldest_first_reaches_events_appended_meanwhile_once(database: Database) -> None:
    _fill(database, 20)
    seen: list[int] = []
    cursor = None
    appended = 20
    while True:
        with database.reading() as session:
            page = query_events(session=session, limit=6, cursor=cursor, newest_first=False)
        seen.extend(record.id for record in page.records)
        if appended < 32:
            _fill(database, 4, start=appended)
            appended += 4
        if page.next_cursor is None:
            break
        cursor = page.next_cursor

    assert seen == sorted(set(seen))
    assert seen == [record.id for record in _records(database)]


def test_a_cursor_from_other_filters_is_refused(database: Database) -> None:
    _fill(database, 10)
    with database.reading() as session:
        page = query_events(session=session, filters=AuditFilter(actor="ORTHANC"), limit=1)
        assert page.next_cursor is not None
        with pytest.raises(AuditQueryError, match="other filters"):
            query_events(session=session, filters=AuditFilter(), cursor=page.next_cursor)
        with pytest.raises(AuditQueryError, match="limit"):
            query_events(session=session, limit=0)


def test_streaming_reads_in_batches_in_chain_order(database: Database) -> None:
    ids = _fill(database, 25)
    with database.reading() as session:
        streamed = [r.id for r in iter_records(session=session, batch_size=4)]
        newest = [r.id for r in iter_records(session=session, batch_size=5, newest_first=True)]
        patient = [
            r.patient_id
            for r in iter_records(session=session, filters=AuditFilter(patient_id="PAT-4"))
        ]
    assert streamed == ids
    assert newest == ids[::-1]
    assert patient and set(patient) == {"PAT-4"}


# --- the CLI --------------------------------------------------------------------------------------


def _cli(url: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["audit", *args], env={"PACSAI_DATABASE__URL": url})


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _last_event(db: Database) -> AuditRecord:
    return _records(db)[-1]


def test_cli_verify_reports_an_intact_chain_and_audits_itself(database: Database) -> None:
    _fill(database, 5)

    result = _cli(database.url, "verify")

    assert result.exit_code == 0, result.output
    assert "audit trail intact: 5 rows verified" in result.stdout
    event = _last_event(database)
    assert (event.event_id, event.action, event.actor) == ("110101", "R", _actor())
    assert event.details is not None and event.details["intact"] is True


def test_cli_verify_names_the_broken_row_exits_1_and_raises_an_alert(database: Database) -> None:
    ids = _fill(database, 8)
    with database.transaction() as session:
        session.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": ids[4]})

    result = _cli(database.url, "verify")

    assert result.exit_code == 1
    assert f"audit trail BROKEN at row {ids[5]}" in result.output
    used, alert = _records(database)[-2:]
    assert used.event_id == "110101" and used.details and used.details["first_bad_id"] == ids[5]
    assert (alert.event_id, alert.outcome, alert.actor) == ("110113", 8, _actor())


def test_cli_verify_detects_truncation_against_a_noted_head(database: Database) -> None:
    _fill(database, 6)
    first = _cli(database.url, "verify")
    head = next(line for line in first.stdout.splitlines() if line.startswith("newest row:"))
    anchor = head.split()[2]
    assert _cli(database.url, "verify", "--expect-head", anchor).exit_code == 0

    anchor_id = int(anchor.split(":")[0])
    with database.transaction() as session:  # drop the newest rows: the chain itself stays valid
        session.execute(text("DELETE FROM audit_events WHERE id >= :id"), {"id": anchor_id})
    assert _verify(database).intact

    result = _cli(database.url, "verify", "--expect-head", anchor)

    assert result.exit_code == 1
    assert f"row {anchor_id} (the expected head) is gone" in result.output
    assert _cli(database.url, "verify", "--expect-head", "12:short").exit_code == 2


def test_cli_query_filters_pages_and_prints_jsonl_and_csv(database: Database) -> None:
    _fill(database, 30)
    result = _cli(database.url, "query", "--patient-id", "PAT-3", "--format", "jsonl")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and {row["patient_id"] for row in rows} == {"PAT-3"}
    assert [row["id"] for row in rows] == sorted((row["id"] for row in rows), reverse=True)
    used = _last_event(database)
    assert (used.event_id, used.actor, used.patient_id) == ("110101", _actor(), "PAT-3")

    first = _cli(database.url, "query", "--limit", "2", "--actor", "ORTHANC", "--format", "csv")
    assert first.stdout.startswith("id,occurred_at,event_id")
    cursor = first.output.rsplit("--cursor ", 1)[1].split()[0]
    second = _cli(database.url, "query", "--limit", "2", "--actor", "ORTHANC", "--cursor", cursor)
    assert second.exit_code == 0 and "ORTHANC" in second.stdout
    wrong = _cli(database.url, "query", "--limit", "2", "--cursor", cursor)
    assert wrong.exit_code == 1 and "other filters" in wrong.output
    assert _cli(database.url, "query", "--since", "last week").exit_code == 1


def test_cli_export_writes_every_format_and_audits_the_export(
    database: Database, tmp_path: Path
) -> None:
    _fill(database, 24)
    exported: dict[str, list[AuditRecord]] = {}

    for fmt in ("dicom-xml", "jsonl", "csv"):
        # each export's own 110101 event names the patient: the next export includes it
        matching = exported[fmt] = [r for r in _records(database) if r.patient_id == "PAT-1"]
        out = tmp_path / f"audit.{fmt}"
        result = _cli(
            database.url, "export", "--format", fmt, "--patient-id", "PAT-1", "--out", str(out)
        )
        assert result.exit_code == 0, result.output
        assert f"{len(matching)} audit events written" in result.output
        used = _last_event(database)
        assert used.details is not None
        assert (used.event_id, used.details["format"], used.details["rows"]) == (
            "110101",
            fmt,
            len(matching),
        )
    assert [r.event_id for r in exported["csv"][-2:]] == ["110101", "110101"]
    root = ET.parse(tmp_path / "audit.dicom-xml").getroot()
    messages = root.findall("AuditMessage")
    assert len(messages) == len(exported["dicom-xml"])
    for message, record in zip(messages, exported["dicom-xml"], strict=True):
        patient = message.find("ParticipantObjectIdentification[@ParticipantObjectTypeCode='1']")
        assert patient is not None and patient.attrib["ParticipantObjectID"] == "PAT-1"
        event = message.find("EventIdentification/EventID")
        assert event is not None and event.attrib["csd-code"] == record.event_id
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["row_hash"] for line in lines] == [
        r.row_hash for r in exported["jsonl"]
    ]
    csv_lines = (tmp_path / "audit.csv").read_text().splitlines()
    assert len(csv_lines) == len(exported["csv"]) + 1
    assert not list(tmp_path.glob(".audit*"))  # no temporary files left behind

    to_stdout = _cli(database.url, "export", "--format", "jsonl", "--event-id", "110113")
    assert to_stdout.exit_code == 0
    assert {json.loads(line)["event_id"] for line in to_stdout.stdout.splitlines()} == {"110113"}


# --- the HTTP API ---------------------------------------------------------------------------------


@pytest.fixture
def api(database: Database, tmp_path: Path) -> Iterator[Callable[[str | None], httpx.Client]]:
    """``api(role)``: a client of the node's API (on a free port) holding a token of that role
    (``None``: no token)."""
    from pacsai.api import ApiServer, create_app
    from pacsai.db import TokenRole
    from pacsai.db.tokens import create_token

    settings = make_settings(tmp_path, database.url)
    server = ApiServer(create_app(settings, database), host="127.0.0.1", port=0)
    server.start()
    clients: list[httpx.Client] = []

    def client(role: str | None) -> httpx.Client:
        headers = {}
        if role is not None:
            with database.transaction() as session:
                _token, secret = create_token(
                    session=session,
                    name=f"{role}{len(clients)}",
                    role=TokenRole(role),
                    now=utcnow(),
                )
            headers["Authorization"] = f"Bearer {secret}"
        made = httpx.Client(base_url=server.url + "/", headers=headers, timeout=30)
        clients.append(made)
        return made

    yield client
    for made in clients:
        made.close()
    server.stop()


def test_api_audit_needs_an_auditor_token(
    database: Database, api: Callable[[str | None], httpx.Client]
) -> None:
    for path in ("audit", "audit/verify"):
        assert api(None).get(path).status_code == 401
        refused = api("viewer").get(path)
        assert refused.status_code == 403
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert api("auditor").get(path).status_code == 200


def test_api_audit_filters_pages_and_records_who_read(
    database: Database, api: Callable[[str | None], httpx.Client]
) -> None:
    _fill(database, 40)
    expected = [r.id for r in reversed(_records(database)) if r.patient_id == "PAT-2"]
    auditor = api("auditor")
    token_name = "auditor0"

    seen: list[int] = []
    params: dict[str, Any] = {"patient_id": "PAT-2", "limit": 4}
    while True:
        response = auditor.get("audit", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        seen.extend(item["id"] for item in body["items"])
        assert all(item["patient_id"] == "PAT-2" for item in body["items"])
        if body["next_cursor"] is None:
            break
        params["cursor"] = body["next_cursor"]
    assert seen == expected  # the reads appended meanwhile are newer: not in later pages

    read = [r for r in _records(database) if r.event_id == "110101"]
    assert read and all(r.actor == f"api:{token_name}" for r in read)
    assert all(r.patient_id == "PAT-2" and r.remote_address == "127.0.0.1" for r in read)

    item = auditor.get("audit", params={"event_id": "110103", "limit": 1}).json()
    (event,) = item["items"]
    assert event["event"] == "DICOM Instances Accessed" and event["model_name"]
    assert isinstance(event["detail"], dict)


def test_api_audit_csv_and_refusals(
    database: Database, api: Callable[[str | None], httpx.Client]
) -> None:
    _fill(database, 12)
    auditor = api("auditor")

    response = auditor.get("audit", params={"format": "csv", "limit": 5})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert len(response.text.splitlines()) == 6 and "x-next-cursor" in response.headers
    following = auditor.get(
        "audit", params={"limit": 5, "cursor": response.headers["x-next-cursor"]}
    )
    assert following.status_code == 200 and len(following.json()["items"]) == 5

    for params in (
        {"cursor": "bogus"},
        {"cursor": response.headers["x-next-cursor"], "actor": "ORTHANC"},
        {"outcome": 5},
        {"event_id": "abc"},
        {"patient_id": "P\x00"},
        {"since": "0001-01-01T00:00:00+14:00"},
        {"limit": 0},
    ):
        refused = auditor.get("audit", params=params)
        assert refused.status_code == 422, (params, refused.text)
        assert refused.headers["content-type"].startswith("application/problem+json")


def test_api_verify_reports_and_alerts(
    database: Database, api: Callable[[str | None], httpx.Client]
) -> None:
    ids = _fill(database, 10)
    auditor = api("auditor")

    intact = auditor.get("audit/verify").json()
    assert intact["intact"] is True and intact["first_bad_id"] is None
    assert intact["rows_checked"] >= 10 and intact["head_id"] >= ids[-1]

    with database.transaction() as session:
        session.execute(update(AuditEvent).where(AuditEvent.id == ids[2]).values(actor="MALLORY"))
    broken = auditor.get("audit/verify").json()

    assert broken["intact"] is False
    assert broken["first_bad_id"] == ids[2] and f"row {ids[2]} " in broken["problem"]
    used, alert = _records(database)[-2:]
    assert used.event_id == "110101" and used.actor == "api:auditor0"
    assert alert.event_id == "110113" and alert.details and alert.details["first_bad_id"] == ids[2]


# --- syslog forwarding ----------------------------------------------------------------------------


class Collector:
    """A syslog collector on loopback reading octet-counted frames (RFC 5425/6587)."""

    def __init__(self, port: int, tls: ssl.SSLContext | None) -> None:
        self.messages: list[bytes] = []
        self.server = socket.create_server(("127.0.0.1", port))
        self.server.settimeout(0.2)
        self.tls = tls
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.server.accept()
            except TimeoutError:
                continue
            try:
                connection = self.tls.wrap_socket(raw, server_side=True) if self.tls else raw
            except OSError:  # a client that refused our certificate (ssl.SSLError is an OSError)
                raw.close()
                continue
            connection.settimeout(0.2)
            buffer = b""
            with connection:
                while not self._stop.is_set():
                    try:
                        chunk = connection.recv(65536)
                    except TimeoutError:
                        continue
                    except (OSError, ssl.SSLError):
                        break
                    if not chunk:
                        break
                    buffer += chunk
                    while b" " in buffer:
                        length, _, rest = buffer.partition(b" ")
                        if len(rest) < int(length):
                            break
                        self.messages.append(rest[: int(length)])
                        buffer = rest[int(length) :]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "audit collector")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "collector.pem", directory / "collector.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _parse(message: bytes) -> tuple[list[str], ET.Element]:
    header, _, body = message.partition(b" <?xml")
    return header.decode("ascii").split(" "), ET.fromstring(b"<?xml" + body)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "tcp"])
def test_committed_events_reach_the_collector_in_order(tmp_path: Path, tls: bool) -> None:
    database = Database(f"sqlite:///{tmp_path / 'a.db'}")
    upgrade(database)
    port = free_port()
    server_context = None
    ca = None
    if tls:
        ca, key = _certificate(tmp_path)
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(ca, key)
    collector = Collector(port, server_context)
    settings = SyslogSettings(enabled=True, host="127.0.0.1", port=port, tls=tls, ca=ca)
    forwarder = SyslogForwarder(settings, audit_source_id="PACSAI", hostname="node.example")
    forwarder.attach(database.engine)
    forwarder.start()
    try:
        with database.transaction() as session:
            for n in range(3):
                append_event(session=session, **_event(n))
        with pytest.raises(RuntimeError), database.transaction() as session:
            append_event(session=session, **_event(9))
            raise RuntimeError("rolled back")
        with database.transaction() as session:
            append_event(session=session, **_event(4))
        wait_for(lambda: len(collector.messages) >= 4, timeout=20)
    finally:
        forwarder.stop()
        collector.close()
        database.dispose()

    assert len(collector.messages) == 4 and forwarder.sent == 4 and forwarder.dropped == 0
    parsed = [_parse(message) for message in collector.messages]
    for (header, _xml), n in zip(parsed, (0, 1, 2, 4), strict=True):
        assert header[0] in ("<85>1", "<84>1", "<83>1")
        assert header[2:4] == ["node.example", "pacsai"] and header[5:] == ["IHE+RFC-3881", "-"]
        assert header[1] == _event(n)["occurred_at"].isoformat(timespec="microseconds").replace(
            "+00:00", "Z"
        )
    event_ids = [
        xml.find("EventIdentification/EventID").attrib["csd-code"]  # type: ignore[union-attr]
        for _header, xml in parsed
    ]
    assert event_ids == [str(_event(n)["event_id"]) for n in (0, 1, 2, 4)]


def test_a_tls_collector_with_an_unknown_certificate_gets_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = _certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    port = free_port()
    collector = Collector(port, server_context)
    other = tmp_path / "other"
    other.mkdir()
    untrusted, _ = _certificate(other)  # the forwarder trusts another CA
    settings = SyslogSettings(enabled=True, host="127.0.0.1", port=port, ca=untrusted)
    forwarder = SyslogForwarder(settings, audit_source_id="PACSAI", backoff=0.05)
    forwarder.start()
    try:
        forwarder(_records_of(3))
        wait_for(lambda: "cannot forward audit events" in caplog.text, timeout=20)
    finally:
        forwarder.stop(timeout=0.2)
        collector.close()
    assert collector.messages == [] and forwarder.sent == 0


def _records_of(count: int) -> list[AuditRecord]:
    return [
        AuditRecord(
            id=n + 1,
            occurred_at=T0,
            event_id="110104",
            event_type=None,
            action="C",
            outcome=0,
            actor="ORTHANC",
            remote_address=None,
            study_instance_uid=None,
            patient_id=None,
            model_name=None,
            model_version=None,
            detail=None,
            prev_hash="0" * 64,
            row_hash=f"{n:064x}",
        )
        for n in range(count)
    ]


def test_appends_never_wait_for_an_absent_collector(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'a.db'}")
    upgrade(database)
    port = free_port()  # nobody listens yet
    settings = SyslogSettings(enabled=True, host="127.0.0.1", port=port, tls=False)
    forwarder = SyslogForwarder(
        settings, audit_source_id="PACSAI", queue_size=5, backoff=0.05, max_backoff=0.1
    )
    forwarder.attach(database.engine)
    forwarder.start()
    collector = None
    try:
        started = time.monotonic()
        _fill(database, 20)
        elapsed = time.monotonic() - started
        assert _verify(database).rows_checked == 20
        assert forwarder.dropped >= 14 and forwarder.sent == 0
        assert elapsed < 10  # no append waited for the collector (each retry alone is 0.05 s+)

        collector = Collector(port, None)  # the collector comes up: the queue drains
        wait_for(lambda: forwarder.sent == 20 - forwarder.dropped, timeout=20)
    finally:
        forwarder.stop()
        if collector is not None:
            collector.close()
        database.dispose()
    assert len(collector.messages) == 20 - forwarder.dropped


def test_forwarding_starts_only_when_enabled(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'a.db'}")
    assert start_forwarding(make_settings(tmp_path), database.engine) is None
    settings = make_settings(
        tmp_path, audit={"syslog": {"enabled": True, "host": "127.0.0.1", "tls": False}}
    )
    forwarder = start_forwarding(settings, database.engine)
    assert forwarder is not None
    forwarder.stop(timeout=0.1)
    database.dispose()


def test_an_unreadable_ca_is_a_configuration_error(tmp_path: Path) -> None:
    from pacsai.errors import ConfigError

    missing = SyslogSettings(enabled=True, host="127.0.0.1", ca=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=r"audit\.syslog\.ca"):
        SyslogForwarder(missing, audit_source_id="PACSAI")
