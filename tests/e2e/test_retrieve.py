"""Pulling studies from a real PACS (Orthanc): C-FIND by accession and by date range, C-MOVE
into a real `pacsai serve` whose job then runs, C-GET through the receive path, a refused move
reported with its status, and "nothing found" for an unknown accession."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from pacsai.config import Source
from pacsai.db import AuditEvent, Database, Instance, Job, JobStatus, Study, TokenRole, utcnow
from pacsai.db.tokens import create_token
from pacsai.demo.orthanc import Orthanc
from pacsai.phantom import write_phantom
from pacsai.retrieve import StudyQuery, StudyRetrieval, find_studies, retrieve_studies
from pacsai.scp import InstanceStore
from pacsai.service import Node
from tests.support import (
    REPO,
    ServeProcess,
    db_rows,
    free_port,
    make_ct_series,
    run_pacsai,
    wait_for,
    write_datasets,
)

pytestmark = [pytest.mark.orthanc]

TIMEOUT = 300.0  # a job on a busy CPU, with the model loading on first use


def _known_to(make_orthanc: Callable[..., Orthanc], port: int | None = None) -> Orthanc:
    """An Orthanc (not started) that knows pacsai as modality PACSAI (it refuses queries and
    retrieves from AE titles it does not know)."""
    return make_orthanc(modalities={"PACSAI": ("PACSAI", "127.0.0.1", port or free_port())})


def _source(pacs: Orthanc, **extra: Any) -> Source:
    return Source(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.dicom_port, **extra)


def _old_and_new(pacs: Orthanc, tmp_path: Path) -> None:
    """Two small CT studies in Orthanc: OLD-1 of 2025-12-15 and NEW-1 of 2026-03-02."""
    for accession, study_date in (("OLD-1", "20251215"), ("NEW-1", "20260302")):
        series = make_ct_series(4, study_uid=generate_uid())
        for ds in series:
            ds.AccessionNumber = accession
            ds.StudyDate = study_date
        pacs.upload_all(write_datasets(series, tmp_path / accession))


def _pacsai(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_pacsai(config, *args, timeout=300)


def test_c_find_by_accession_and_by_date_range(
    make_orthanc: Callable[..., Orthanc], tmp_path: Path
) -> None:
    pacs = _known_to(make_orthanc).start()
    _old_and_new(pacs, tmp_path)
    source = _source(pacs)

    def accessions(**criteria: Any) -> list[str | None]:
        found = find_studies(source, StudyQuery(**criteria), calling_ae_title="PACSAI")
        return sorted(study.accession_number for study in found)

    assert accessions(accession_number="OLD-1") == ["OLD-1"]
    assert accessions(since=date(2026, 1, 1)) == ["NEW-1"]
    assert accessions(since=date(2025, 12, 1), until=date(2025, 12, 31)) == ["OLD-1"]
    assert accessions(since=date(2025, 1, 1), modality="CT") == ["NEW-1", "OLD-1"]
    assert accessions(since=date(2025, 1, 1), modality="MR") == []
    assert accessions(accession_number="NO-SUCH") == []
    [study] = find_studies(source, StudyQuery(accession_number="NEW-1"), calling_ae_title="PACSAI")
    assert study.study_date == "20260302"
    assert study.modalities == ("CT",)
    assert study.instances == 4
    assert study.patient_id == "PACSAI-TEST-001"


def test_an_unknown_accession_says_nothing_found(
    make_orthanc: Callable[..., Orthanc],
    serve_process: Callable[..., ServeProcess],
    tmp_path: Path,
) -> None:
    pacs = make_orthanc()
    server = serve_process(sources={"pacs": _source(pacs).model_dump(mode="json")})
    pacs.modalities["PACSAI"] = ("PACSAI", "127.0.0.1", server.port)
    pacs.start()

    result = _pacsai(server.config, "retrieve", "--from", "pacs", "--accession", "NO-SUCH")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "nothing found on pacs for accession NO-SUCH" in result.stderr
    database = Database(server.settings.database.url)
    [query] = db_rows(database, AuditEvent, AuditEvent.event_id == "110112")
    assert '"studies_found":0' in (query.detail or "").replace(" ", "")
    database.dispose()


@pytest.mark.slow
def test_c_move_into_pacsai_serve_runs_the_job(
    make_orthanc: Callable[..., Orthanc],
    serve_process: Callable[..., ServeProcess],
    tmp_path: Path,
) -> None:
    pacs = make_orthanc()
    server = serve_process(
        sources={"pacs": _source(pacs).model_dump(mode="json")},
        queue={"local_workers": 1, "poll_seconds": 0.2},
        inference={"models_dir": str(REPO / "models"), "device": "cpu"},
    )
    pacs.modalities["PACSAI"] = ("PACSAI", "127.0.0.1", server.port)
    pacs.start()
    phantom = write_phantom("ct", tmp_path / "phantom", seed=3)
    answers = pacs.upload_all(phantom.paths)
    accession = str(pacs.instance_tags(answers[0]["ID"])["AccessionNumber"])

    result = _pacsai(server.config, "retrieve", "--from", "pacs", "--accession", accession)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 1 studies retrieved" in result.stdout
    assert f"retrieved {accession}: {len(phantom.paths)} instances" in result.stdout
    database = Database(server.settings.database.url)

    def finished() -> list[Job]:
        jobs = db_rows(database, Job)
        return jobs if jobs and jobs[0].status in JobStatus.finished() else []

    [job] = wait_for(finished, timeout=TIMEOUT, interval=0.5)
    assert job.status is JobStatus.SUCCEEDED, job.reason
    [study] = db_rows(database, Study)
    assert study.study_instance_uid == phantom.study_instance_uid
    assert study.instance_count == len(phantom.paths)
    [imported] = db_rows(database, AuditEvent, AuditEvent.event_id == "110107")
    assert imported.study_instance_uid == phantom.study_instance_uid
    assert imported.outcome == 0
    assert imported.actor.startswith("cli:")
    database.dispose()


def test_c_get_stores_through_the_receive_path(
    make_orthanc: Callable[..., Orthanc],
    start_node: Callable[..., Node],
    tmp_path: Path,
) -> None:
    node = start_node()
    pacs = _known_to(make_orthanc, node.receiver.port).start()
    _old_and_new(pacs, tmp_path)
    source = _source(pacs, retrieve="get")
    found = find_studies(source, StudyQuery(accession_number="NEW-1"), calling_ae_title="PACSAI")
    progress: list[tuple[int | None, int]] = []

    def on_progress(retrieval: StudyRetrieval) -> None:
        progress.append((retrieval.remaining, retrieval.completed))

    [retrieval] = retrieve_studies(
        source,
        found,
        calling_ae_title="PACSAI",
        instances=InstanceStore(database=node.database, spool=node.spool),
        quiet_seconds=1.0,
        on_progress=on_progress,
    )

    assert retrieval.succeeded, retrieval.status_text
    assert (retrieval.completed, retrieval.stored) == (4, 4)
    assert all(remaining is not None for remaining, _ in progress)
    instances = db_rows(node.database, Instance)
    assert len(instances) == 4
    assert {i.calling_ae_title for i in instances} == {pacs.ae_title}
    # The study completes on its quiet window like a pushed one and gets a job.
    [job] = wait_for(lambda: db_rows(node.database, Job), timeout=30)
    assert job.instance_count == 4


def test_a_refused_move_is_reported_with_its_status(
    make_orthanc: Callable[..., Orthanc], tmp_path: Path
) -> None:
    pacs = _known_to(make_orthanc).start()
    _old_and_new(pacs, tmp_path)
    source = _source(pacs)
    found = find_studies(source, StudyQuery(since=date(2025, 1, 1)), calling_ae_title="PACSAI")
    assert len(found) == 2

    results = retrieve_studies(source, found, calling_ae_title="PACSAI", move_destination="NOBODY")

    for retrieval in results:
        assert not retrieval.succeeded
        assert retrieval.status is not None and retrieval.status != 0
        assert retrieval.status_text.startswith(f"0x{retrieval.status:04X}")


# --- POST /api/v1/retrieve --------------------------------------------------------------------


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code < 500
    except httpx.TransportError:
        return False


def _until_finished(client: httpx.Client, location: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        answer = client.get(location)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body if body["status"] != "RUNNING" else None

    result: dict[str, Any] = wait_for(finished, timeout=TIMEOUT, interval=0.2)
    return result


def test_post_retrieve_runs_in_the_background_and_reports_each_study(
    make_orthanc: Callable[..., Orthanc],
    serve_process: Callable[..., ServeProcess],
    tmp_path: Path,
) -> None:
    pacs = make_orthanc()
    server = serve_process(
        sources={"pacs": _source(pacs).model_dump(mode="json")},
        api={"enabled": True, "port": free_port()},
    )
    pacs.modalities["PACSAI"] = ("PACSAI", "127.0.0.1", server.port)
    pacs.start()
    _old_and_new(pacs, tmp_path)
    database = Database(server.settings.database.url)
    with database.transaction() as session:
        _, admin = create_token(session=session, name="it", role=TokenRole.ADMIN, now=utcnow())
        _, viewer = create_token(session=session, name="ward", role=TokenRole.VIEWER, now=utcnow())
    base = f"http://127.0.0.1:{server.settings.api.port}"
    wait_for(lambda: _answers(f"{base}/healthz"), timeout=60)
    try:
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {admin}"}, timeout=60
        ) as client:
            # Both studies since 2025, moved into the running node.
            answer = client.post("/api/v1/retrieve", json={"source": "pacs", "since": "2025-01-01"})
            assert answer.status_code == 202, answer.text
            assert answer.json()["status"] == "RUNNING"
            location = answer.headers["location"]
            done = _until_finished(client, location)
            assert done["status"] == "SUCCEEDED", done
            assert (done["found"], done["retrieved"], done["actor"]) == (2, 2, "api:it")
            assert sorted(s["accession_number"] for s in done["studies"]) == ["NEW-1", "OLD-1"]
            for study in done["studies"]:
                assert study["state"] == "retrieved"
                assert study["dimse_status"] == "0x0000 Success"
                assert (study["completed"], study["failed"], study["expected"]) == (4, 0, 4)
            wait_for(lambda: len(db_rows(database, Instance)) == 8, timeout=60)
            assert len(db_rows(database, Study)) == 2

            # A move the PACS refuses: each study fails with the DIMSE status it gave.
            refused = client.post(
                "/api/v1/retrieve",
                json={"source": "pacs", "accession": "NEW-1", "move_to": "NOBODY"},
            )
            assert refused.status_code == 202, refused.text
            failed = _until_finished(client, refused.headers["location"])
            assert (
                failed["status"] == "FAILED" and failed["error"] == "1 of 1 studies not retrieved"
            )
            [study] = failed["studies"]
            assert study["state"] == "failed"
            assert study["dimse_status"].startswith(("0xA", "0xC"))  # Orthanc: 0xC000
            assert study["error"].startswith(study["dimse_status"])

            # Nothing found, and requests refused before anything starts.
            nothing = client.post("/api/v1/retrieve", json={"source": "pacs", "accession": "NO"})
            empty = _until_finished(client, nothing.headers["location"])
            assert empty["status"] == "FAILED" and empty["found"] == 0
            assert empty["error"] == "nothing found on pacs for accession NO"
            unknown = client.post(
                "/api/v1/retrieve", json={"source": "elsewhere", "since": "2025-01-01"}
            )
            assert unknown.status_code == 422 and "elsewhere" in unknown.json()["detail"]
            vague = client.post("/api/v1/retrieve", json={"source": "pacs"})
            assert vague.status_code == 422 and "say what to retrieve" in vague.json()["detail"]
            listed = client.get("/api/v1/retrieve").json()
            assert [r["status"] for r in listed] == ["FAILED", "FAILED", "SUCCEEDED"]
            assert client.get("/api/v1/retrieve/999").status_code == 404
        forbidden = httpx.post(
            f"{base}/api/v1/retrieve",
            json={"source": "pacs", "since": "2025-01-01"},
            headers={"Authorization": f"Bearer {viewer}"},
            timeout=60,
        )
        assert forbidden.status_code == 403

        imports = db_rows(database, AuditEvent, AuditEvent.event_id == "110107")
        assert sorted((e.actor, e.outcome) for e in imports) == [
            ("api:it", 0),
            ("api:it", 0),
            ("api:it", 8),
        ]
        started = [
            e
            for e in db_rows(database, AuditEvent, AuditEvent.event_id == "110100")
            if "retrieve from a PACS" in (e.detail or "")
        ]
        assert len(started) == 3 and all(e.actor == "api:it" for e in started)
    finally:
        database.dispose()
