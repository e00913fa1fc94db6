"""What a finished job sends beyond DICOM, decided from its stored results (priority by the
worklist's rules), the deliveries queued for it (once, unless re-sent), and retrievals whose
process went away (on SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pacsai.config import Settings
from pacsai.db import (
    Database,
    Delivery,
    DeliveryStatus,
    JobStatus,
    RetrievalStatus,
    upgrade,
    utcnow,
)
from pacsai.db.deliveries import queue_job_messages, retry_failed_deliveries
from pacsai.jobs.study_messages import plan_study_messages
from pacsai.operations import Caller
from pacsai.operations.retrievals import RetrieveRequest, get_retrieval, start_retrieval
from pacsai.reporting.study_result import StudyResult
from pacsai.storage import SharedDirectory
from tests.support import SeededStudy, db_rows, make_settings, seed_study

CT_SUMMARY = {
    "labels": [
        {"value": 1, "name": "liver", "voxels": 5000, "volume_ml": 1234.5},
        {"value": 2, "name": "spleen", "voxels": 0, "volume_ml": 0.0},
    ]
}
CXR_SUMMARY = {"probabilities": {"nodule": 0.91, "effusion": 0.12}}
ADMIN = Caller("api:it", "10.0.0.9", {"route": "POST /retrieve"})


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    upgrade(database)
    yield database
    database.dispose()


def _settings(tmp_path: Path, min_volume_ml: float) -> Settings:
    return make_settings(
        tmp_path,
        destinations={
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            "ris": {"kind": "hl7", "host": "127.0.0.1", "port": 2575},
            "hook": {"kind": "webhook", "url": "https://hooks.example/x"},
        },
        routes=[
            {
                "name": "ct-abdomen",
                "model": "ct_abdomen_demo",
                "send_to": ["pacs", "ris", "hook"],
                "priority": [{"finding": "liver", "min_volume_ml": min_volume_ml}],
            },
            {"name": "chest", "model": "cxr_findings_demo", "send_to": ["ris"]},
        ],
        api={"public_url": "https://pacsai.example.org/"},
        sources={"archive": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
    )


def _seed(database: Database) -> SeededStudy:
    return seed_study(
        database,
        accession="ACC-77",
        job=JobStatus.SUCCEEDED,
        summaries=[
            ("ct-abdomen", "ct_abdomen_demo", CT_SUMMARY),
            ("chest", "cxr_findings_demo", CXR_SUMMARY),
        ],
    )


def _plan(database: Database, settings: Settings, seeded: SeededStudy) -> Any:
    assert seeded.job_id is not None
    with database.reading() as session:
        return plan_study_messages(
            session,
            settings,
            SharedDirectory(settings.storage.spool_dir),
            job_id=seeded.job_id,
            result_ids=seeded.result_ids,
            routes={route.name: route for route in settings.routes or []},
        )


def test_a_priority_rule_that_holds_adds_the_alert_destinations(
    database: Database, tmp_path: Path
) -> None:
    seeded = _seed(database)
    planned = _plan(database, _settings(tmp_path, 1000), seeded)

    assert set(planned.targets) == {("ris", "hl7"), ("hook", "webhook")}  # pacs: its objects
    result: StudyResult = planned.result
    assert result.priority
    assert result.priority_reasons == ("ct-abdomen: liver 1234.5 ml >= 1000 ml",)
    assert (result.accession_number, result.patient_id) == ("ACC-77", seeded.patient_id)
    assert [(f.label, f.present, f.volume_ml, f.probability) for f in result.findings] == [
        ("liver", True, 1234.5, None),
        ("spleen", False, 0.0, None),
        ("effusion", False, None, 0.12),  # probabilities are stored in name order
        ("nodule", True, None, 0.91),
    ]
    assert [m.name for m in result.models] == ["ct_abdomen_demo", "cxr_findings_demo"]
    assert result.models[0].version == "0.1.0+000000000000"
    assert sorted(o.kind for o in result.objects) == ["SEG", "SEG", "SR", "SR"]
    assert result.link == f"https://pacsai.example.org/studies/{seeded.study_instance_uid}"
    assert result.study_time is None  # the seeded instances have no files to read it from
    assert "Seeded" not in planned.payload  # the patient's name is nowhere in what is stored


def test_without_a_rule_that_holds_only_the_ris_gets_the_result(
    database: Database, tmp_path: Path
) -> None:
    planned = _plan(database, _settings(tmp_path, 2000), _seed(database))
    assert planned.targets == (("ris", "hl7"),)
    assert not planned.result.priority and planned.result.priority_reasons == ()


def test_a_result_is_queued_once_per_destination_unless_sent_again(
    database: Database, tmp_path: Path
) -> None:
    seeded = _seed(database)
    planned = _plan(database, _settings(tmp_path, 1000), seeded)
    assert seeded.job_id is not None

    def queue(**flags: Any) -> list[int]:
        with database.transaction() as session:
            return queue_job_messages(
                session=session,
                job_id=seeded.job_id or 0,
                targets=planned.targets,
                payload=planned.payload,
                now=utcnow(),
                **flags,
            )

    first = queue()
    assert len(first) == 2
    assert queue() == []  # a re-run that found the same: nothing new
    rows = {d.id: d for d in db_rows(database, Delivery)}
    keys = {rows[i].message_key for i in first}
    for delivery_id in first:
        key = rows[delivery_id].message_key
        assert key and key.startswith(f"D{delivery_id}-") and len(key) <= 20
    assert {rows[i].kind for i in first} == {"hl7", "webhook"}
    assert {json.loads(rows[i].payload or "")["accession_number"] for i in first} == {"ACC-77"}

    again = queue(resend=True)  # asked for: new deliveries, new keys
    assert len(again) == 2
    assert not keys & {d.message_key for d in db_rows(database, Delivery) if d.id in again}

    # A dead letter retried by an admin keeps its key: the receiver sees the same message.
    with database.transaction() as session:
        session.get(Delivery, first[0]).status = DeliveryStatus.FAILED  # type: ignore[union-attr]
    with database.transaction() as session:
        assert retry_failed_deliveries(session=session, now=utcnow(), job_ids=[seeded.job_id]) == 1
    [retried] = db_rows(database, Delivery, Delivery.id == first[0])
    assert retried.status is DeliveryStatus.PENDING and retried.message_key in keys


def test_a_retrieval_whose_process_is_gone_reads_interrupted(
    database: Database, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, 1000)
    started = start_retrieval(
        database, settings, ADMIN, RetrieveRequest(source="archive", accession="A1")
    )
    assert started.status is RetrievalStatus.RUNNING
    assert (started.source, started.method, started.criteria) == (
        "archive",
        "move",
        {"accession": "A1"},
    )
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    from pacsai.db import Retrieval

    with database.transaction() as session:
        row = session.get(Retrieval, started.id)
        assert row is not None
        row.pid = int(gone.stdout)

    shown = get_retrieval(database, ADMIN, started.id)

    assert shown.status is RetrievalStatus.INTERRUPTED
    assert shown.error is not None and "stopped before it ended" in shown.error
    [row] = db_rows(database, Retrieval)
    assert row.status is RetrievalStatus.INTERRUPTED and row.finished_at is not None
