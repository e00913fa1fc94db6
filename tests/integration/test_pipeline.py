"""Jobs end to end: a study pushed over DICOM is routed, turned into a volume, run through the
demo bundle and stored as a result, or skipped with a stored and audited reason."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select, update

from pacsai.db import AuditEvent, Job, JobStatus, Result, ResultKind, utcnow
from pacsai.phantom import write_phantom
from pacsai.scu import Target, push
from pacsai.service import Node
from tests.support import REPO, db_rows, wait_for

MODELS = REPO / "models"

pytestmark = pytest.mark.slow


def _rows(node: Node, model: type[Any], *where: Any) -> list[Any]:
    return db_rows(node.database, model, *where)


def _target(node: Node) -> Target:
    return Target(node.settings.node.ae_title, "127.0.0.1", node.receiver.port)


def _workers(**extra: Any) -> dict[str, Any]:
    return {
        "queue": {"local_workers": 1, "poll_seconds": 0.2},
        "inference": {"models_dir": str(MODELS), "device": "cpu"},
        **extra,
    }


def _finished_job(node: Node, *, timeout: float = 120.0) -> Job:
    def finished() -> Job | None:
        with node.database.reading() as session:
            job = session.scalars(select(Job).order_by(Job.id.desc())).first()
            if job is not None and job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
                session.expunge(job)
                return job
        return None

    job: Job = wait_for(finished, timeout=timeout)
    return job


def _results(node: Node, job_id: int) -> list[Result]:
    return _rows(node, Result, Result.job_id == job_id)


def _audit(node: Node, event_id: str) -> list[AuditEvent]:
    return _rows(node, AuditEvent, AuditEvent.event_id == event_id)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def test_ct_phantom_study_is_segmented_and_audited(
    database_url: str, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    study = write_phantom("ct", tmp_path / "ct", seed=7)
    node = start_node(database_url, **_workers())
    assert push(study.paths, _target(node)).failed == 0

    job = _finished_job(node)
    assert job.status is JobStatus.SUCCEEDED, job.reason
    timings = json.loads(job.timings or "{}")
    assert {"route", "volume", "preprocessing", "forward", "postprocessing"} <= set(timings)

    (result,) = _results(node, job.id)
    assert result.kind is ResultKind.SEGMENTATION
    assert result.model_name == "ct_abdomen_demo"
    assert result.series_instance_uid == study.series_instance_uid
    output = np.load(node.settings.storage.results_dir / result.output_path)
    label_map = output["label_map"]
    assert study.labels is not None and label_map.shape == study.labels.shape
    for value in (1, 2, 3):
        assert dice(label_map == value, study.labels == value) >= 0.85, value
    summary = json.loads(result.summary)
    liver = next(item for item in summary["labels"] if item["name"] == "liver")
    assert liver["volume_ml"] > 500

    (event,) = [e for e in _audit(node, "110103") if e.action == "R"]
    assert event.model_name == "ct_abdomen_demo"
    assert event.model_version and event.model_version.startswith("0.1.0+")
    assert event.study_instance_uid == study.study_instance_uid
    assert json.loads(event.detail or "{}")["result_id"] == result.id


def test_cr_phantom_is_classified(start_node: Callable[..., Node], tmp_path: Path) -> None:
    study = write_phantom("cr", tmp_path / "cr", seed=5)
    node = start_node(**_workers())
    assert push(study.paths, _target(node)).failed == 0
    job = _finished_job(node)
    assert job.status is JobStatus.SUCCEEDED, job.reason
    (result,) = _results(node, job.id)
    assert result.kind is ResultKind.CLASSIFICATION
    probabilities = json.loads(result.summary)["probabilities"]
    assert set(probabilities) == {"nodule", "effusion"}
    assert all(0.0 <= p <= 1.0 for p in probabilities.values())


def test_study_no_route_matches_is_skipped_with_reason(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    study = write_phantom("ct", tmp_path / "ct", seed=1)
    routes = [{"name": "mr-only", "when": {"Modality": "MR"}, "model": "mr_brain_lesion_demo"}]
    node = start_node(**_workers(routes=routes))
    assert push(study.paths, _target(node)).failed == 0

    job = _finished_job(node)
    assert job.status is JobStatus.SKIPPED
    assert job.reason is not None and "mr-only" in job.reason and "CT" in job.reason
    assert _results(node, job.id) == []
    (event,) = _audit(node, "110103")
    assert event.outcome == 4
    assert json.loads(event.detail or "{}")["reason"] == job.reason


def test_series_with_a_missing_slice_is_skipped_never_guessed(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    study = write_phantom("ct", tmp_path / "ct", seed=2)
    paths = list(study.paths)
    del paths[len(paths) // 2]
    node = start_node(**_workers())
    assert push(paths, _target(node)).failed == 0
    job = _finished_job(node)
    assert job.status is JobStatus.SKIPPED
    assert job.reason is not None and "ct_abdomen_demo" in job.reason
    assert "spacing" in job.reason or "missing" in job.reason


def test_a_missing_model_fails_the_job_with_the_error(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    study = write_phantom("ct", tmp_path / "ct", seed=3)
    routes = [{"name": "ct", "when": {"Modality": "CT"}, "model": "no_such_bundle"}]
    node = start_node(**_workers(routes=routes))
    assert push(study.paths, _target(node)).failed == 0
    job = _finished_job(node)
    assert job.status is JobStatus.FAILED
    assert job.reason is not None and "no_such_bundle" in job.reason


def test_jobs_left_running_by_a_killed_node_run_again(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    study = write_phantom("cr", tmp_path / "cr", seed=4)
    first = start_node(queue={"local_workers": 0})
    assert push(study.paths, _target(first)).failed == 0
    wait_for(lambda: _count_jobs(first) == 1)
    with first.database.transaction() as session:  # as if the node died while running it
        session.execute(
            update(Job).values(status=JobStatus.RUNNING, attempts=1, started_at=utcnow())
        )
    first.stop()

    second = start_node(**_workers())
    job = _finished_job(second)
    assert job.status is JobStatus.SUCCEEDED
    assert job.attempts == 2


def _count_jobs(node: Node) -> int:
    with node.database.reading() as session:
        return len(session.scalars(select(Job)).all())


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("dcm_qa_ct/In/GE", "tilt"),
        ("dcm_qa_nih/In/20180918GE/mr_0004", "time points"),
        ("pydicom-data/data_store/data/emri_small.dcm", "Per-Frame Functional Groups"),
    ],
)
def test_real_series_that_cannot_become_volumes_are_skipped_with_the_reason(
    shared_dicom: Path,
    start_node: Callable[..., Node],
    tmp_path: Path,
    folder: str,
    expected: str,
) -> None:
    source = tmp_path / "in"
    if (shared_dicom / folder).is_dir():
        shutil.copytree(shared_dicom / folder, source, ignore=shutil.ignore_patterns("*.txt"))
    else:
        source.mkdir()
        shutil.copy(shared_dicom / folder, source)
    routes = [
        {"name": "any", "when": {}, "series": {"min_instances": 2}, "model": "ct_abdomen_demo"}
    ]
    node = start_node(**_workers(routes=routes))
    assert push([source], _target(node)).failed == 0
    job = _finished_job(node)
    assert job.status is JobStatus.SKIPPED
    assert job.reason is not None and expected in job.reason


@pytest.mark.shared_data
def test_real_philips_ct_runs_through_a_route_that_accepts_it(
    shared_dicom: Path, start_node: Callable[..., Node]
) -> None:
    node = start_node(**_workers())
    assert push([shared_dicom / "dcm_qa_ct/In/Philips/S21570/S2010"], _target(node)).failed == 0
    job = _finished_job(node)
    assert job.status is JobStatus.SUCCEEDED, job.reason
    (result,) = _results(node, job.id)
    output = np.load(node.settings.storage.results_dir / result.output_path)
    assert output["label_map"].shape == (28, 512, 512)
    assert len(output["sop_instance_uids"]) == 28


def test_a_route_on_every_series_keeps_each_series_result(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """``select: all`` runs the model on two series of one study: two results, each with its own
    label map on its own series' grid (neither file overwrites the other)."""
    phantom = {"seed": 7, "spacing": 6.0, "patient_id": "PACSAI-TWO-SERIES"}
    axial = write_phantom("ct", tmp_path / "axial", **phantom)  # type: ignore[arg-type]
    sagittal = write_phantom(
        "ct",
        tmp_path / "sagittal",
        orientation="sagittal",
        **phantom,  # type: ignore[arg-type]
    )
    first = dcmread(axial.paths[0], stop_before_pixels=True)
    for path in sagittal.paths:  # the second series joins the first one's study
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.PatientName = axial.study_instance_uid, first.PatientName
        ds.save_as(path)
    node = start_node(
        **_workers(routes=[{"name": "ct", "model": "ct_abdomen_demo", "series": {"select": "all"}}])
    )
    assert push([*axial.paths, *sagittal.paths], _target(node)).failed == 0

    job = _finished_job(node)
    assert job.status is JobStatus.SUCCEEDED, job.reason
    results = {r.series_instance_uid: r for r in _results(node, job.id)}
    assert set(results) == {axial.series_instance_uid, sagittal.series_instance_uid}
    assert len({r.output_path for r in results.values()}) == 2
    for study in (axial, sagittal):
        output = np.load(
            node.settings.storage.results_dir / results[study.series_instance_uid].output_path
        )
        assert study.labels is not None and output["label_map"].shape == study.labels.shape
