"""Audit trail at scale: bulk-load 1,000,000 chained events, time the common queries, verify.

For SQLite (a temporary file) and PostgreSQL (a temporary database, created and dropped like the
tests' ``postgres_url`` fixture; skipped with a message when unreachable):

1. generate a realistic trail: ~50,000 studies of ~20,000 patients over half a year; transfers
   from modalities, inference reads and SEG/SR creation by the node with model versions, exports
   (some failed), API queries and audit reads by a few dozen users, security alerts, starts and
   stops; chained with SHA-256 exactly as ``append_event`` does, in batches;
2. insert it in bulk (rows/s, hashing and inserting timed apart);
3. time the common queries through :func:`pacsai.db.audit_query.query_events` (page of 100,
   newest first): by study, by patient, by a one-day time range, the last 100; plus a few more
   (by actor, failures, audit reads, the next page of a range). Median of 5 runs, each on another
   random key, after a warm-up; target < 50 ms each;
4. print each common query's plan (``EXPLAIN QUERY PLAN`` / ``EXPLAIN ANALYZE``);
5. run a full :func:`pacsai.db.verify_chain` and a streamed DICOM XML export of every row.

    python bench/audit.py [--rows 1000000] [--backends sqlite,postgresql] [--runs 5]

PostgreSQL is reached at $PACSAI_TEST_POSTGRES_URL (default
postgresql+psycopg://postgres@127.0.0.1:5432/test), as by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from sqlalchemy import ClauseElement, Executable, create_engine, insert, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

from pacsai.db import AuditEvent, Database, upgrade, verify_chain
from pacsai.db.audit import GENESIS_HASH, row_digest
from pacsai.db.audit_export import export_dicom_xml
from pacsai.db.audit_query import AuditFilter, build_query, iter_records, query_events

POSTGRES_ADMIN_URL = os.environ.get(
    "PACSAI_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
START = datetime(2026, 1, 1, tzinfo=UTC)
SPAN = timedelta(days=182)
STUDIES, PATIENTS = 50_000, 24_000  # ~20,000 of the patients have studies
TARGET_MS = 50.0
BATCH = 20_000

# (event ID, share of all events)
KINDS = [
    ("110104", 0.14),  # transfers in from modalities
    ("110103R", 0.10),  # inference reads (model name and version)
    ("110103C", 0.20),  # SEG / SR objects written
    ("110106", 0.11),  # exports to the PACS (some failed, retried)
    ("110112", 0.35),  # API reads of studies / worklist results
    ("110101", 0.05),  # audit trail reads
    ("110107", 0.04),  # imports
    ("110113", 0.008),  # security alerts (refused associations, tokens)
    ("110100", 0.002),  # application start / stop
]
MODALITY_AES = [f"{m}{n:02d}" for m in ("CT", "MR", "CR", "DX") for n in range(1, 6)]
USERS = [f"api:user{n:02d}" for n in range(30)] + ["cli:auditor", "cli:admin"]
MODELS = [("ct_abdomen_demo", "0.1.0+e57ab942a49d"), ("cxr_findings_demo", "0.1.0+7558b7b37fa0")]


# --- EXPLAIN as a statement ---------------------------------------------------------------------


class Explain(Executable, ClauseElement):
    """``EXPLAIN`` of a SELECT, compiled for the dialect (with its bound parameters)."""

    inherit_cache = False

    def __init__(self, statement: Any) -> None:
        self.statement = statement


@compiles(Explain, "sqlite")
def _explain_sqlite(element: Explain, compiler: SQLCompiler, **kw: Any) -> str:
    return "EXPLAIN QUERY PLAN " + compiler.process(element.statement, **kw)


@compiles(Explain, "postgresql")
def _explain_postgresql(element: Explain, compiler: SQLCompiler, **kw: Any) -> str:
    return "EXPLAIN (ANALYZE, COSTS OFF, BUFFERS OFF) " + compiler.process(element.statement, **kw)


# --- the trail ------------------------------------------------------------------------------------


@dataclass
class Trail:
    """The generated events (numpy columns, time-ordered) and keys to query by."""

    seconds: np.ndarray  # offset from START, sorted
    kind: np.ndarray  # index into KINDS
    study: np.ndarray  # -1: none
    pick: np.ndarray  # a random integer per event (actor, remote, outcome choices)
    patient_of: np.ndarray  # study -> patient

    def __len__(self) -> int:
        return len(self.seconds)


def generate(rows: int, seed: int = 5) -> Trail:
    """A time-ordered mix of events over ~50,000 studies of ~20,000 patients."""
    rng = np.random.default_rng(seed)
    study_at = np.sort(rng.uniform(0, SPAN.total_seconds() * 0.97, STUDIES))
    # most patients have a study or two; a tenth of them (followed up) have several
    patient_of = np.where(
        rng.random(STUDIES) < 0.25,
        rng.integers(0, PATIENTS // 10, STUDIES),
        rng.integers(0, PATIENTS, STUDIES),
    )
    shares = np.array([share for _kind, share in KINDS])
    kind = rng.choice(len(KINDS), size=rows, p=shares / shares.sum())
    study = rng.integers(0, STUDIES, rows)
    # transfers and inference follow a study's arrival within minutes, reads within days
    delay = np.where(kind <= 3, rng.exponential(600, rows), rng.exponential(3 * 86400, rows))
    seconds = np.minimum(study_at[study] + delay, SPAN.total_seconds())
    no_study = np.isin(kind, [KINDS.index(k) for k in KINDS if k[0] in ("110113", "110100")])
    study = np.where(no_study, -1, study)
    seconds = np.where(no_study, rng.uniform(0, SPAN.total_seconds(), rows), seconds)
    order = np.argsort(seconds, kind="stable")
    return Trail(
        seconds=seconds[order],
        kind=kind[order],
        study=study[order],
        pick=rng.integers(0, 2**31, rows)[order],
        patient_of=patient_of,
    )


def study_uid(index: int) -> str:
    return f"1.2.826.0.1.3680043.10.543.{index}"


def patient_id(index: int) -> str:
    return f"PAT{index:06d}"


def event_row(trail: Trail, i: int) -> dict[str, Any]:
    """The columns of event `i` (no id, no hashes)."""
    code = KINDS[int(trail.kind[i])][0]
    pick = int(trail.pick[i])
    s = int(trail.study[i])
    row: dict[str, Any] = {
        "occurred_at": START + timedelta(seconds=float(trail.seconds[i])),
        "event_id": code[:6],
        "event_type": None,
        "action": "R",
        "outcome": 0,
        "actor": "PACSAI",
        "remote_address": None,
        "study_instance_uid": None if s < 0 else study_uid(s),
        "patient_id": None if s < 0 else patient_id(int(trail.patient_of[s])),
        "model_name": None,
        "model_version": None,
        "detail": None,
    }
    if code == "110104":
        row |= {
            "action": "C",
            "actor": MODALITY_AES[pick % len(MODALITY_AES)],
            "remote_address": f"10.20.{pick % 7}.{pick % 250 + 1}",
            "detail": {"association_id": str(uuid.UUID(int=pick)), "instances": pick % 400 + 1},
        }
    elif code in ("110103R", "110103C"):
        model, version = MODELS[pick % len(MODELS)]
        row |= {"model_name": model, "model_version": version}
        if code == "110103C":
            row |= {"action": "C", "detail": {"object": ("SEG", "SR")[pick % 2], "job_id": s}}
        else:
            row |= {"detail": {"job_id": s, "device": "cuda:0"}}
    elif code == "110106":
        failed = pick % 20 == 0
        row |= {
            "outcome": 8 if failed else 0,
            "detail": {"destination": "pacs", "status": "RETRYING" if failed else "SENT"},
        }
    elif code in ("110112", "110101"):
        row |= {
            "action": "E" if code == "110112" else "R",
            "actor": USERS[pick % len(USERS)],
            "remote_address": f"192.168.{pick % 5}.{pick % 200 + 10}",
            "detail": {"route": "GET /studies/{study_uid}" if code == "110112" else "GET /audit"},
        }
    elif code == "110107":
        row |= {"action": "C", "actor": "ORTHANC", "remote_address": "10.20.9.9"}
    elif code == "110113":
        row |= {
            "action": "E",
            "event_type": "110126",
            "outcome": 4,
            "actor": f"ROGUE{pick % 50}",
            "remote_address": f"172.16.{pick % 30}.{pick % 250}",
            "detail": {"reason": "calling AE title not allowed"},
        }
    else:  # 110100
        row |= {"action": "E", "event_type": ("110120", "110121")[pick % 2]}
    if row["detail"] is not None:
        row["detail"] = json.dumps(row["detail"], sort_keys=True)
    return row


def chained_batches(trail: Trail) -> Iterator[tuple[list[dict[str, Any]], float]]:
    """Rows with ids and hashes, BATCH at a time, and the seconds spent hashing each batch."""
    previous = GENESIS_HASH
    for start in range(0, len(trail), BATCH):
        began = time.perf_counter()
        batch = []
        for i in range(start, min(start + BATCH, len(trail))):
            row = event_row(trail, i)
            row["id"] = i + 1
            row["prev_hash"] = previous
            previous = row["row_hash"] = row_digest(SimpleNamespace(**row))  # type: ignore[arg-type]
            batch.append(row)
        yield batch, time.perf_counter() - began


# --- the backends -------------------------------------------------------------------------------


def sqlite_database(folder: Path) -> Database:
    return Database(f"sqlite:///{folder / 'audit-bench.db'}")


def postgres_database() -> tuple[Database, Callable[[], None]] | None:
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"pacsai_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        print(f"PostgreSQL skipped: not reachable at {POSTGRES_ADMIN_URL} ({exc.orig})")
        admin.dispose()
        return None
    database = Database(f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}")

    def drop() -> None:
        database.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return database, drop


def load(database: Database, trail: Trail) -> None:
    hashing = inserting = 0.0
    for batch, seconds in chained_batches(trail):
        hashing += seconds
        began = time.perf_counter()
        with database.engine.begin() as connection:
            connection.execute(insert(AuditEvent), batch)
        inserting += time.perf_counter() - began
        done = batch[-1]["id"]
        if done % 200_000 == 0:
            print(f"  {done:>9,} rows  ({done / (hashing + inserting):,.0f} rows/s)", flush=True)
    if database.dialect == "postgresql":
        with database.engine.begin() as connection:
            connection.execute(
                text(
                    "SELECT setval(pg_get_serial_sequence('audit_events', 'id'), max(id)) "
                    "FROM audit_events"
                )
            )
            connection.execute(text("ANALYZE audit_events"))
    total = hashing + inserting
    rows = len(trail)
    print(
        f"  loaded {rows:,} rows in {total:.1f} s: {rows / total:,.0f} rows/s "
        f"(hashing {rows / hashing:,.0f} rows/s, inserting {rows / inserting:,.0f} rows/s)"
    )


# --- queries ------------------------------------------------------------------------------------


def queries(trail: Trail, rng: np.random.Generator) -> dict[str, Callable[[], AuditFilter]]:
    """Each query as a factory of a new random filter (so that runs do not hit one key)."""
    used_studies = trail.study[trail.study >= 0]

    def by_study() -> AuditFilter:
        return AuditFilter(study_instance_uid=study_uid(int(rng.choice(used_studies))))

    def by_patient() -> AuditFilter:
        s = int(rng.choice(used_studies))
        return AuditFilter(patient_id=patient_id(int(trail.patient_of[s])))

    def by_day() -> AuditFilter:
        day = START + timedelta(days=int(rng.integers(1, SPAN.days - 1)))
        return AuditFilter(since=day, until=day + timedelta(days=1))

    return {
        "by study": by_study,
        "by patient": by_patient,
        "by time range (1 day)": by_day,
        "last 100": AuditFilter,
        "by actor (one API user)": lambda: AuditFilter(actor=USERS[int(rng.integers(len(USERS)))]),
        "failures (outcome 8)": lambda: AuditFilter(outcomes=(8,)),
        "audit reads (110101)": lambda: AuditFilter(event_ids=("110101",)),
        "security alerts, 1 week": lambda: AuditFilter(
            event_ids=("110113",),
            since=START + timedelta(days=int(rng.integers(0, SPAN.days - 7))),
            until=START + timedelta(days=int(rng.integers(7, SPAN.days))),
        ),
    }


COMMON = ("by study", "by patient", "by time range (1 day)", "last 100")


def time_query(database: Database, make: Callable[[], AuditFilter], runs: int) -> list[float]:
    def once(audit_filter: AuditFilter, cursor: str | None = None) -> tuple[float, Any]:
        began = time.perf_counter()
        with database.reading() as session:
            page = query_events(session=session, filters=audit_filter, limit=100, cursor=cursor)
        return (time.perf_counter() - began) * 1000, page

    once(make())  # warm-up
    return [once(make())[0] for _ in range(runs)]


def next_page_ms(database: Database, audit_filter: AuditFilter, runs: int) -> list[float]:
    with database.reading() as session:
        first = query_events(session=session, filters=audit_filter, limit=100)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        with database.reading() as session:
            query_events(session=session, filters=audit_filter, limit=100, cursor=first.next_cursor)
        times.append((time.perf_counter() - began) * 1000)
    return times


def plan(database: Database, audit_filter: AuditFilter) -> list[str]:
    statement = Explain(build_query(audit_filter, limit=101))
    with database.engine.connect() as connection:
        rows = connection.execute(statement).all()
    if database.dialect == "sqlite":
        return [f"    {row[3]}" for row in rows]
    return [f"    {row[0]}" for row in rows]


# --- main -----------------------------------------------------------------------------------------


def run_backend(name: str, database: Database, trail: Trail, runs: int) -> dict[str, Any]:
    print(f"\n== {name}: {database.display_url}")
    upgrade(database)
    load(database, trail)
    rng = np.random.default_rng(11)
    results: dict[str, Any] = {}
    print(f"\n  queries through audit_query.query_events, page of 100, median of {runs} (ms):")
    makers = queries(trail, rng)
    for label, make in makers.items():
        times = time_query(database, make, runs)
        median = statistics.median(times)
        results[label] = median
        flag = "" if label not in COMMON else ("  ok" if median < TARGET_MS else "  OVER TARGET")
        print(f"  {label:<28} {median:8.2f}   (min {min(times):.2f}, max {max(times):.2f}){flag}")
    day = makers["by time range (1 day)"]()
    page2 = statistics.median(next_page_ms(database, day, runs))
    results["time range, next page"] = page2
    print(f"  {'time range, next page':<28} {page2:8.2f}")

    print("\n  plans of the common queries:")
    for label in COMMON:
        print(f"  {label}:")
        print("\n".join(plan(database, makers[label]())))

    began = time.perf_counter()
    with database.reading() as session:
        report = verify_chain(session=session)
    verify_s = time.perf_counter() - began
    results["verify_s"] = verify_s
    print(
        f"\n  verify_chain: {report.rows_checked:,} rows in {verify_s:.1f} s "
        f"({report.rows_checked / verify_s:,.0f} rows/s), intact={report.intact}"
    )
    assert report.intact and report.rows_checked == len(trail), report

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    written = 0
    with tempfile.TemporaryFile("w+", encoding="utf-8") as out, database.reading() as session:
        for chunk in export_dicom_xml(iter_records(session=session), audit_source_id="PACSAI"):
            written += len(chunk)
            out.write(chunk)
    export_s = time.perf_counter() - began
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results["export_s"] = export_s
    print(
        f"  DICOM XML export, streamed: {len(trail):,} messages, {written / 2**20:,.0f} MiB "
        f"in {export_s:.1f} s ({len(trail) / export_s:,.0f} rows/s); peak RSS "
        f"{rss_after / 1024:,.0f} MiB (+{(rss_after - rss_before) / 1024:,.0f} MiB during export)"
    )
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    began = time.perf_counter()
    trail = generate(args.rows)
    print(
        f"generated {len(trail):,} events over {SPAN.days} days in "
        f"{time.perf_counter() - began:.1f} s: "
        f"{len(np.unique(trail.study[trail.study >= 0])):,} studies, "
        f"{len(np.unique(trail.patient_of[trail.study[trail.study >= 0]])):,} patients"
    )
    summary: dict[str, dict[str, Any]] = {}
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "sqlite" in backends:
        with tempfile.TemporaryDirectory(prefix="pacsai-audit-bench-") as folder:
            database = sqlite_database(Path(folder))
            try:
                summary["SQLite"] = run_backend("SQLite", database, trail, args.runs)
            finally:
                database.dispose()
    if "postgresql" in backends:
        made = postgres_database()
        if made is not None:
            database, drop = made
            try:
                summary["PostgreSQL"] = run_backend("PostgreSQL", database, trail, args.runs)
            finally:
                drop()

    print("\n== summary (ms, median; target < 50 ms for the first four)")
    labels = [*COMMON, "time range, next page"]
    print(f"  {'query':<28}" + "".join(f"{name:>12}" for name in summary))
    for label in labels:
        print(f"  {label:<28}" + "".join(f"{r[label]:12.2f}" for r in summary.values()))
    print(f"  {'verify (s)':<28}" + "".join(f"{r['verify_s']:12.1f}" for r in summary.values()))
    print(f"  {'XML export (s)':<28}" + "".join(f"{r['export_s']:12.1f}" for r in summary.values()))
    over = [
        f"{name} {label}"
        for name, r in summary.items()
        for label in COMMON
        if r[label] >= TARGET_MS
    ]
    if over:
        print("over target: " + ", ".join(over))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
