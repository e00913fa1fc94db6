"""Storage lifecycle cost: how fast finished studies are purged, and what looking for them costs.

N finished studies of M instances (files of K KiB in a real spool, rows recorded through the
receive path's repository functions) sit among F other studies (rows only: half finished
long ago with nothing left to remove, half with a job still QUEUED). Measured in the same run:

- the candidate query retention runs (oldest 50 purgeable studies) over all N + F studies;
- `pacsai studies purge --older-than 1d` as the operation (rows, audit, files), in studies/s,
  instances/s and MiB/s, and the slowest single study (what a C-STORE waiting for space sees);
- the peer: deleting the same number of files of the same size with `shutil.rmtree`, and the
  ratio of the purge's time to it.

PostgreSQL is used when it answers (``--database`` or 127.0.0.1:5432) unless ``--sqlite``.

    python bench/retention.py [--studies 20] [--instances 100] [--kib 32] [--others 20000]
                              [--sqlite]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import insert, text, update

from _common import fresh_database, postgres_answers
from pacsai.config import Settings
from pacsai.db import Database, Job, JobStatus, Study, StudyStatus, upgrade, utcnow
from pacsai.db.repository import PendingInstance, ReceivedInstance, record_instances
from pacsai.db.retention import PurgeRule, purge_candidates
from pacsai.operations import Caller
from pacsai.operations.storage import purge_studies

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def seed_files(database: Database, spool: Path, studies: int, instances: int, kib: int) -> None:
    """Finished studies with real files, received 10 days ago, their jobs SUCCEEDED."""
    received = utcnow() - timedelta(days=10)
    payload = os.urandom(kib * 1024)
    for _ in range(studies):
        study_uid, series_uid = generate_uid(), generate_uid()
        pending = []
        for index in range(instances):
            sop = generate_uid()
            relative = f"{study_uid}/{series_uid}/{sop}.{index:016x}.dcm"
            path = spool / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)
            pending.append(
                PendingInstance(
                    item=ReceivedInstance(
                        sop_class_uid=CTImageStorage,
                        sop_instance_uid=sop,
                        study_instance_uid=study_uid,
                        series_instance_uid=series_uid,
                        transfer_syntax_uid=ExplicitVRLittleEndian,
                        path=relative,
                        size_bytes=len(payload),
                        sha256=f"{index:064x}",
                        modality="CT",
                        patient_id="BENCH-001",
                    ),
                    association_id=None,
                    calling_ae_title="BENCH",
                    remote_address="127.0.0.1",
                    quiet_seconds=10.0,
                    received_at=received,
                )
            )
        with database.transaction() as session:
            record_instances(session=session, pending=pending)
    finish_all(database, received)


def finish_all(database: Database, received: object) -> None:
    with database.transaction() as session:
        ids = session.scalars(
            update(Study)
            .where(Study.status == StudyStatus.RECEIVING)
            .values(status=StudyStatus.COMPLETE, completed_at=received)
            .returning(Study.id)
        ).all()
        if ids:
            session.execute(
                insert(Job),
                [
                    {
                        "study_id": study_id,
                        "status": JobStatus.SUCCEEDED,
                        "instance_count": 1,
                        "attempts": 1,
                        "created_at": received,
                        "finished_at": received,
                        "queue": "default",
                    }
                    for study_id in ids
                ],
            )


def seed_others(database: Database, count: int) -> None:
    """Rows only: half finished long ago and purged already, half with a job QUEUED."""
    now = utcnow()
    long_ago = now - timedelta(days=30)
    rows = [
        {
            "study_instance_uid": generate_uid(),
            "status": StudyStatus.COMPLETE,
            "quiet_seconds": 10.0,
            "calling_ae_title": "BENCH",
            "instance_count": 0,
            "first_received_at": long_ago,
            "last_received_at": long_ago if index % 2 else now,
            "purged_at": long_ago if index % 2 else None,
        }
        for index in range(count)
    ]
    with database.transaction() as session:
        for start in range(0, len(rows), 5000):
            session.execute(insert(Study), rows[start : start + 5000])
        busy = session.scalars(
            text("SELECT id FROM studies WHERE purged_at IS NULL AND calling_ae_title = 'BENCH'")
        ).all()
        session.execute(
            insert(Job),
            [
                {
                    "study_id": study_id,
                    "status": JobStatus.QUEUED,
                    "instance_count": 1,
                    "attempts": 0,
                    "created_at": now,
                    "queue": "default",
                }
                for study_id in busy
            ],
        )


def peer_rmtree(folder: Path, files: int, kib: int) -> float:
    """Seconds `shutil.rmtree` takes for the same number of files of the same size."""
    payload = os.urandom(kib * 1024)
    per_dir = max(1, files // 20)
    for index in range(files):
        path = folder / f"d{index // per_dir}" / f"{index}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    start = time.perf_counter()
    shutil.rmtree(folder)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--kib", type=int, default=32)
    parser.add_argument("--others", type=int, default=20_000)
    parser.add_argument("--database", default=None, help="PostgreSQL admin URL (default: probe)")
    parser.add_argument("--sqlite", action="store_true", help="SQLite even if PostgreSQL answers")
    args = parser.parse_args()
    admin = (
        None if args.sqlite else args.database or (POSTGRES if postgres_answers(POSTGRES) else None)
    )
    with tempfile.TemporaryDirectory(prefix="pacsai-bench-retention-") as scratch:
        root = Path(scratch)
        with fresh_database(admin, root) as url:
            database = Database(url)
            upgrade(database)
            settings = Settings(
                storage={"spool_dir": str(root / "spool"), "results_dir": str(root / "results")},
                database={"url": url},
            )
            print(
                f"database: {database.dialect}; {args.studies} finished studies of "
                f"{args.instances} x {args.kib} KiB among {args.others} other studies"
            )
            seed_others(database, args.others)
            seed_files(database, root / "spool", args.studies, args.instances, args.kib)

            now = utcnow()
            rule = PurgeRule(now=now, instances_before=now - timedelta(days=1), results_before=now)
            start = time.perf_counter()
            for _ in range(5):
                with database.reading() as session:
                    found = purge_candidates(session=session, rule=rule, limit=50)
            query = (time.perf_counter() - start) / 5
            print(
                f"candidate query (oldest 50 of {args.studies + args.others} studies): "
                f"{query * 1000:.1f} ms, {len(found)} found"
            )

            start = time.perf_counter()
            report = purge_studies(
                database,
                settings,
                Caller("cli:bench", None, {"command": "bench"}),
                older_than=timedelta(days=1),
            )
            seconds = time.perf_counter() - start
            files = sum(s.instances for s in report.removed)
            mib = report.bytes / 2**20
            print(
                f"purge: {len(report.removed)} studies, {files} instances, {mib:.0f} MiB in "
                f"{seconds:.2f} s: {len(report.removed) / seconds:.1f} studies/s, "
                f"{files / seconds:.0f} instances/s, {mib / seconds:.0f} MiB/s; "
                f"{seconds / max(1, len(report.removed)) * 1000:.0f} ms per study"
            )
            database.dispose()
        peer = peer_rmtree(root / "peer", files, args.kib)
        print(
            f"peer shutil.rmtree of {files} files of {args.kib} KiB: {peer:.2f} s "
            f"({files / peer:.0f} files/s); purge / rmtree = {seconds / peer:.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
