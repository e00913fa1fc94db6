"""`pacsai jobs send JOB --to DEST`: a stored result sent later to another DICOM destination,
through the node's own delivery workers, exactly once; refused once its files were purged."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from pacsai.db import Delivery, DeliveryStatus, Job, JobStatus, ResultObject
from pacsai.operations import Caller, InvalidRequestError, NotFoundError
from pacsai.operations.jobs import send_job_results
from pacsai.phantom import write_phantom
from pacsai.scu import Target, push
from pacsai.service import Node
from tests.support import REPO, db_rows, free_port, run_pacsai, start_storescp, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

ADMIN = Caller("cli:test-admin", None, {"command": "jobs send"})


def _pacsai(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_pacsai(config, *args, timeout=180)


def _arrivals(folder: Path) -> Counter[str]:
    """SOP Instance UID -> how many times it arrived (storescp +uf keeps every arrival)."""
    return Counter(
        str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        for path in folder.iterdir()
        if path.is_file()
    )


def _settled(node: Node, count: int) -> list[Delivery]:
    def done() -> list[Delivery] | None:
        deliveries = db_rows(node.database, Delivery)
        if len(deliveries) < count or any(
            d.status in (DeliveryStatus.PENDING, DeliveryStatus.RETRYING) for d in deliveries
        ):
            return None
        return deliveries

    settled: list[Delivery] = wait_for(done, timeout=180)
    return settled


def test_jobs_send_delivers_a_stored_result_to_a_second_storescp_exactly_once(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    pacs_port, archive_port = free_port(), free_port()
    pacs = start_storescp(tmp_path / "pacs", pacs_port)
    archive = start_storescp(
        tmp_path / "archive", archive_port, ae_title="ARCHIVE", options=("+uf",)
    )
    try:
        node = start_node(
            queue={"local_workers": 1, "poll_seconds": 0.2},
            inference={"models_dir": str(REPO / "models"), "device": "cpu"},
            routes=[
                {
                    "name": "ct",
                    "when": {"Modality": "CT"},
                    "model": "ct_abdomen_demo",
                    "seg_type": "BINARY",  # what DCMTK's storescp accepts
                    "send_to": ["pacs"],
                }
            ],
            destinations={
                "pacs": {"ae_title": "DCMTK", "host": "127.0.0.1", "port": pacs_port},
                "archive": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive_port},
                "ris": {"kind": "hl7", "host": "127.0.0.1", "port": free_port()},
            },
        )
        config = tmp_path / "cli.yaml"
        config.write_text(yaml.safe_dump(node.settings.model_dump(mode="json", exclude_none=True)))
        study = write_phantom("ct", tmp_path / "ct", seed=3)
        target = Target(node.settings.node.ae_title, "127.0.0.1", node.receiver.port)
        assert push(study.paths, target).failed == 0
        [first] = _settled(node, 1)
        assert first.status is DeliveryStatus.SENT, first.last_error
        [job] = db_rows(node.database, Job)
        assert job.status is JobStatus.SUCCEEDED, job.reason
        objects = {o.sop_instance_uid for o in db_rows(node.database, ResultObject)}
        assert len(objects) == 2  # SEG and SR
        assert _arrivals(tmp_path / "archive") == Counter()

        sent = _pacsai(config, "jobs", "send", str(job.id), "--to", "archive", "--wait", "120")

        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "SENT" in sent.stdout
        assert _arrivals(tmp_path / "archive") == Counter(objects)  # each exactly once
        deliveries = db_rows(node.database, Delivery)
        assert [(d.destination, d.status) for d in deliveries] == [
            ("pacs", DeliveryStatus.SENT),
            ("archive", DeliveryStatus.SENT),
        ]

        # Sending again is refused: the archive has them.
        again = _pacsai(config, "jobs", "send", str(job.id), "--to", "archive")
        assert again.returncode == 1
        assert "has the results of job" in again.stderr and "--again" in again.stderr
        assert len(db_rows(node.database, Delivery)) == 2

        # Destinations that are not there, or not DICOM, are refused with what to do.
        with pytest.raises(NotFoundError, match="archive, pacs, ris"):
            send_job_results(node.database, node.settings, ADMIN, job.id, "nowhere")
        with pytest.raises(InvalidRequestError, match="hl7 destination"):
            send_job_results(node.database, node.settings, ADMIN, job.id, "ris")

        # Once its files are purged, the result can no longer be sent.
        purged = _pacsai(config, "studies", "purge", "--study", study.study_instance_uid)
        assert purged.returncode == 0, purged.stderr
        refused = _pacsai(config, "jobs", "send", str(job.id), "--to", "archive", "--again")
        assert refused.returncode == 1
        assert "were removed from this node" in refused.stderr
        assert "send the study again" in refused.stderr
        assert len(db_rows(node.database, Delivery)) == 2
    finally:
        for process in (pacs, archive):
            process.terminate()
            process.wait(timeout=10)

    assert _arrivals(tmp_path / "pacs") == Counter(objects)  # the route's delivery, once
