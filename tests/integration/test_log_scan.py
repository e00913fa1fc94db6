"""No log line names a patient: after a full run with phantom studies (receive, refuse, infer,
report, deliver to DCMTK storescp, read through the API and the audit trail), every line the node
logged at DEBUG, in text and in JSON, is free of the phantoms' patient names, IDs and birth dates.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacsai.config import LoggingSettings
from pacsai.db import AuditEvent, Delivery, DeliveryStatus, Job, JobStatus, TokenRole, utcnow
from pacsai.db.tokens import create_token
from pacsai.logs import setup_logging
from pacsai.phantom import write_phantom
from pacsai.scu import Target, push
from pacsai.service import Node
from tests.support import REPO, free_port, start_storescp, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

# Distinctive identities: seeds and IDs that appear nowhere else.
PHANTOMS = {"ct": (7919, "LEAKCHECK-CT-58213"), "cr": (4481, "LEAKCHECK-CR-64027")}
_CLIENT_LOGGERS = ("httpx", "httpcore")  # the test's own HTTP client, not the node


class _NodeOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(_CLIENT_LOGGERS)


@pytest.fixture
def node_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, io.StringIO]]:
    """Everything logged while the test runs, through pacsai's own set-up at DEBUG: once as
    text and once as JSON lines (two handlers on the root logger)."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_pynetdicom = logging.getLogger("pynetdicom").level
    streams = {"text": io.StringIO(), "json": io.StringIO()}
    handlers = []
    for fmt, stream in streams.items():
        monkeypatch.setattr(sys, "stderr", stream)  # setup_logging's handler writes to stderr
        setup_logging(LoggingSettings(level="DEBUG", format=fmt))  # type: ignore[arg-type]
        handlers.extend(root.handlers)
    monkeypatch.undo()
    for handler in handlers:
        handler.addFilter(_NodeOnly())
        if handler not in root.handlers:
            root.addHandler(handler)
    assert len(root.handlers) == 2
    try:
        yield streams
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        logging.getLogger("pynetdicom").setLevel(saved_pynetdicom)


def _secrets(paths: list[Path]) -> set[str]:
    """The patient name (and its parts), ID and birth date of a study, in the forms a log
    line might use."""
    ds = dcmread(paths[0], stop_before_pixels=True)
    name, patient_id, birth = str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate)
    assert name and patient_id and len(birth) == 8
    return {
        name,
        name.replace("^", " "),
        name.split("^")[-1],  # S<seed>: the one part of the name unique to this phantom
        patient_id,
        birth,
        f"{birth[:4]}-{birth[4:6]}-{birth[6:]}",
    }


def _settled(node: Node, jobs: int) -> bool:
    with node.database.reading() as session:
        rows = list(session.scalars(select(Job)))
        deliveries = list(session.scalars(select(Delivery)))
    return (
        len(rows) >= jobs
        and all(job.status not in (JobStatus.QUEUED, JobStatus.RUNNING) for job in rows)
        and bool(deliveries)
        and all(
            d.status not in (DeliveryStatus.PENDING, DeliveryStatus.RETRYING) for d in deliveries
        )
    )


def test_no_log_line_names_a_phantom_patient(
    node_logs: dict[str, io.StringIO], start_node: Callable[..., Node], tmp_path: Path
) -> None:
    pacs_port = free_port()
    storescp = start_storescp(tmp_path / "pacs", pacs_port)
    studies = {
        kind: write_phantom(kind, tmp_path / kind, seed=seed, patient_id=patient_id)
        for kind, (seed, patient_id) in PHANTOMS.items()
    }
    secrets = set().union(*(_secrets(study.paths) for study in studies.values()))
    try:
        node = start_node(
            queue={"local_workers": 1, "poll_seconds": 0.2},
            inference={"models_dir": str(REPO / "models"), "device": "cpu"},
            destinations={"pacs": {"ae_title": "DCMTK", "host": "127.0.0.1", "port": pacs_port}},
            api={"enabled": True, "port": 0},
        )
        target = Target(node.settings.node.ae_title, "127.0.0.1", node.receiver.port)
        for study in studies.values():
            assert push(study.paths, target).failed == 0
        _push_a_refused_instance(studies["ct"].paths[0], target, tmp_path)
        wait_for(lambda: _settled(node, jobs=2), timeout=300)
        _read_through_the_api(node, patient_id=PHANTOMS["ct"][1])
        node.stop()
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)

    _assert_the_run_involved_the_patients(node)
    for fmt, stream in node_logs.items():
        lines = stream.getvalue().splitlines()
        assert len(lines) > 20, f"{fmt}: the capture saw almost nothing"
        if fmt == "json":
            records = [json.loads(line) for line in lines]
            assert any(record["level"] == "DEBUG" for record in records)
        else:
            assert any(" DEBUG " in line for line in lines)
        logged = "\n".join(lines)
        for step in (  # the whole run is in the log...
            "refused an instance",
            "job 1 SUCCEEDED",
            "job 2 SUCCEEDED",
            "to pacs: SENT",
            "GET /api/v1/audit",
        ):
            assert step in logged, f"{fmt}: {step!r} was not logged"
        leaks = [
            (secret, line)
            for line in lines
            for secret in secrets
            if secret.casefold() in line.casefold()
        ]
        assert leaks == [], f"{fmt} log lines name a patient:\n" + "\n".join(
            f"{secret!r}: {line}" for secret, line in leaks[:20]
        )  # ...but no patient


def _push_a_refused_instance(source: Path, target: Target, tmp_path: Path) -> None:
    """An instance of the CT phantom's patient without Pixel Data: refused, and logged."""
    ds = dcmread(source)
    del ds.PixelData
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "refused" / "no-pixels.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)
    assert push([path], target).failed == 1


def _read_through_the_api(node: Node, *, patient_id: str) -> None:
    """Reads whose query strings carry the patient ID: studies, worklist and the audit trail."""
    with node.database.transaction() as session:
        _, secret = create_token(
            session=session, name="logscan", role=TokenRole.AUDITOR, now=utcnow()
        )
    assert node.api_port is not None
    base = f"http://127.0.0.1:{node.api_port}/api/v1/"
    headers = {"Authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        reads: list[tuple[str, dict[str, Any]]] = [
            ("studies", {"patient_id": patient_id}),
            ("audit", {"patient_id": patient_id}),
            ("audit", {"patient_id": patient_id, "format": "csv"}),
            ("audit", {"patient_id": patient_id, "cursor": "not-a-cursor"}),
        ]
        for path, params in reads:
            assert client.get(path, params=params).status_code in (200, 422)
        assert client.get("audit/verify").json()["intact"] is True


def _assert_the_run_involved_the_patients(node: Node) -> None:
    """The secrets were really in play: the audit trail (not the log) holds the patient IDs."""
    with node.database.reading() as session:
        audited = set(session.scalars(select(AuditEvent.patient_id).distinct()))
    assert {patient_id for _seed, patient_id in PHANTOMS.values()} <= audited
