"""Storage lifecycle: retention by age, `pacsai studies purge`, and what stays afterwards.

Studies arrive over real associations and complete as usual; their jobs and deliveries are then
put in each state a worker would leave them in (with result files written where the runner
writes them), and retention or the purge command runs on them. Finished and delivered studies
lose their files and instance rows, with one 110105 audit event each; anything a job, a
delivery or a sender still needs is left exactly as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from sqlalchemy import select, update

from pacsai._pynetdicom import AE
from pacsai.db import (
    AuditEvent,
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    Result,
    ResultKind,
    ResultObject,
    Series,
    Study,
    StudyStatus,
    utcnow,
    verify_chain,
)
from pacsai.db.deliveries import add_objects, queue_deliveries
from pacsai.db.jobs import add_result
from pacsai.operations import Caller
from pacsai.operations.jobs import RetryOptions, retry_job
from pacsai.operations.storage import purge_studies
from pacsai.operations.studies import get_study
from pacsai.service import Node
from tests.support import db_rows, make_ct_series, run_pacsai, wait_for

ADMIN = Caller("cli:test-admin", None, {"command": "studies purge"})
#: Ages small enough to have passed by the time retention runs.
AT_ONCE = 1e-6  # days (0.09 s)


def _send(node: Node, datasets: list[Dataset], calling: str = "MODALITY") -> None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title=node.settings.node.ae_title)
    assert assoc.is_established
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0] * len(datasets)
    finally:
        assoc.release()


@dataclass
class Sent:
    """A study sent to the node, and where its files are."""

    uid: str
    datasets: list[Dataset]
    job_id: int | None = None
    spool_files: tuple[Path, ...] = ()
    result_files: tuple[Path, ...] = ()


def _study_id(node: Node, uid: str) -> int:
    with node.database.reading() as session:
        return int(session.scalars(select(Study.id).where(Study.study_instance_uid == uid)).one())


def _complete(node: Node, sent: Sent) -> None:
    """Wait for the study's job (QUEUED: this node runs no workers) and note its files."""

    def queued() -> int | None:
        with node.database.reading() as session:
            return session.scalar(
                select(Job.id).where(Job.study_id == _study_id(node, sent.uid)).order_by(Job.id)
            )

    sent.job_id = wait_for(queued)
    with node.database.reading() as session:
        paths = session.scalars(
            select(Instance.path).where(Instance.study_id == _study_id(node, sent.uid))
        ).all()
    sent.spool_files = tuple(node.spool.absolute(p) for p in paths)
    assert len(sent.spool_files) == len(sent.datasets)


def _finish(
    node: Node,
    sent: Sent,
    status: JobStatus,
    *,
    delivery: DeliveryStatus | None = None,
    finished_ago: timedelta = timedelta(hours=1),
    leased: bool = False,
) -> None:
    """Leave the job as a worker would: ``status`` (finished ``finished_ago``), and for a
    SUCCEEDED job a result with its files (label map, SEG, SR) and, with ``delivery``, one
    delivery in that state, its last attempt due ``finished_ago``."""
    assert sent.job_id is not None
    now = utcnow()
    results_dir = Path(node.settings.storage.results_dir)
    with node.database.transaction() as session:
        job = session.get(Job, sent.job_id)
        assert job is not None
        job.status = status
        if status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            job.finished_at = now - finished_ago
        if status is not JobStatus.SUCCEEDED:
            return
        output = f"job-{job.id}/00-ct.npz"
        result = add_result(
            session=session,
            job_id=job.id,
            route_name="ct",
            series_instance_uid=str(sent.datasets[0].SeriesInstanceUID),
            kind=ResultKind.SEGMENTATION,
            model_name="ct_abdomen_demo",
            model_version="0.1.0",
            weights_sha256="0" * 64,
            output_path=output,
            summary={"labels": [{"value": 1, "name": "liver", "voxels": 9, "volume_ml": 1.0}]},
            now=now,
        )
        folder = f"job-{job.id}/result-{result.id}"
        objects = [
            (
                "SEG",
                "1.2.840.10008.5.1.4.1.1.66.7",
                generate_uid(),
                generate_uid(),
                f"{folder}/seg.dcm",
            ),
            (
                "SR",
                "1.2.840.10008.5.1.4.1.1.88.34",
                generate_uid(),
                generate_uid(),
                f"{folder}/sr.dcm",
            ),
        ]
        add_objects(session=session, result_id=result.id, objects=objects, now=now)
        files = [results_dir / output] + [results_dir / o[4] for o in objects]
        previews = results_dir / "previews"
        for path in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(2048))
        if delivery is not None:
            [delivery_id] = queue_deliveries(
                session=session, result_id=result.id, targets=[("pacs", ["SEG", "SR"])], now=now
            )
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(
                    status=delivery,
                    attempts=1,
                    next_attempt_at=now - finished_ago,
                    sent_at=now if delivery is DeliveryStatus.SENT else None,
                    claimed_until=now + timedelta(minutes=5) if leased else None,
                    lease_owner="other-node/worker" if leased else None,
                )
            )
        session.flush()
        seg_id = session.scalars(
            select(ResultObject.id)
            .where(ResultObject.result_id == result.id)
            .order_by(ResultObject.id)
        ).first()
    # what the console keeps beside the results once a SEG was previewed
    (previews / str(seg_id)).mkdir(parents=True, exist_ok=True)
    (previews / str(seg_id) / "seg-1.png").write_bytes(b"png")
    files.append(previews / str(seg_id) / "seg-1.png")
    sent.result_files = tuple(files)


def _settings(**retention: Any) -> dict[str, Any]:
    return {
        "node": {
            "allowed_peers": [
                {"ae_title": "MODALITY"},
                {"ae_title": "SLOWPEER", "study_quiet_seconds": 3600},
            ]
        },
        "storage": {
            "high_water_mb": 0,  # these tests are about age and the command, not space
            "retention": {
                "instances_days": None,
                "results_days": None,
                "interval_minutes": 600,
                **retention,
            },
        },
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
    }


def _deleted_events(node: Node) -> list[AuditEvent]:
    return db_rows(node.database, AuditEvent, AuditEvent.event_id == "110105")


def _intact(node: Node, sent: Sent) -> None:
    assert all(path.is_file() for path in sent.spool_files + sent.result_files)
    with node.database.reading() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == sent.uid)).one()
        count = len(session.scalars(select(Instance.id).where(Instance.study_id == study.id)).all())
        assert study.purged_at is None
        assert (study.instance_count, count) == (len(sent.datasets), len(sent.datasets))
        results = session.scalars(select(Result).where(Result.job_id == sent.job_id)).all()
        assert all(result.purged_at is None for result in results)


def _purged(node: Node, sent: Sent, *, results: bool = True) -> None:
    assert not any(path.exists() for path in sent.spool_files)
    assert not sent.spool_files[0].parent.exists()  # empty series and study directories go
    assert not sent.spool_files[0].parent.parent.exists()
    with node.database.reading() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == sent.uid)).one()
        assert study.purged_at is not None and study.instance_count == 0
        assert session.scalars(select(Instance.id).where(Instance.study_id == study.id)).all() == []
        series = session.scalars(select(Series).where(Series.study_id == study.id)).all()
        assert [s.instance_count for s in series] == [0]  # the series row stays
        stored = session.scalars(select(Result).where(Result.job_id == sent.job_id)).all()
    if results:
        assert not any(path.exists() for path in sent.result_files)
        assert bool(stored) == bool(sent.result_files)
        assert all(result.purged_at is not None for result in stored)
    else:
        assert all(path.is_file() for path in sent.result_files)
        assert all(result.purged_at is None for result in stored)


def test_retention_removes_finished_studies_and_never_what_is_pending(
    database_url: str, start_node: Callable[..., Node]
) -> None:
    node = start_node(
        database_url,
        **_settings(instances_days=AT_ONCE, results_days=AT_ONCE, failed_hold_days=1),
    )
    studies = {name: Sent(generate_uid(), []) for name in "ABCDEFGHI"}
    for name, sent in studies.items():
        sent.datasets = make_ct_series(3, study_uid=sent.uid)
        _send(node, sent.datasets, calling="SLOWPEER" if name == "I" else "MODALITY")
    for name, sent in studies.items():
        if name != "I":
            _complete(node, sent)
    _finish(node, studies["A"], JobStatus.SUCCEEDED, delivery=DeliveryStatus.SENT)
    _finish(node, studies["B"], JobStatus.QUEUED)
    _finish(node, studies["C"], JobStatus.RUNNING)
    _finish(node, studies["D"], JobStatus.SUCCEEDED, delivery=DeliveryStatus.PENDING)
    _finish(node, studies["E"], JobStatus.SUCCEEDED, delivery=DeliveryStatus.RETRYING)
    _finish(node, studies["F"], JobStatus.FAILED)  # within failed_hold_days: a retry needs it
    _finish(node, studies["G"], JobStatus.FAILED, finished_ago=timedelta(days=2))
    _finish(  # a delivery that failed for good two days ago: no longer held
        node,
        studies["H"],
        JobStatus.SUCCEEDED,
        delivery=DeliveryStatus.FAILED,
        finished_ago=timedelta(days=2),
    )
    # I is still RECEIVING: its sender's quiet window is an hour
    studies["I"].spool_files = tuple(
        node.spool.absolute(i.path)
        for i in db_rows(
            node.database, Instance, Instance.study_id == _study_id(node, studies["I"].uid)
        )
    )

    report = node.retention.run_once()

    assert report is not None
    assert sorted(s.study_instance_uid for s in report.removed) == sorted(
        studies[n].uid for n in "AGH"
    )
    for name in "AGH":
        _purged(node, studies[name])
    for name in "BCDEFI":
        _intact(node, studies[name])
    events = {e.study_instance_uid: e for e in _deleted_events(node)}
    assert set(events) == {studies[n].uid for n in "AGH"}
    detail = json.loads(events[studies["A"].uid].detail or "{}")
    assert events[studies["A"].uid].action == "D"
    assert events[studies["A"].uid].actor == "PACSAI"
    assert events[studies["A"].uid].patient_id == "PACSAI-TEST-001"
    assert detail["instances"]["count"] == 3
    assert detail["instances"]["series"] == [
        {
            "series_instance_uid": str(studies["A"].datasets[0].SeriesInstanceUID),
            "modality": "CT",
            "instances": 3,
        }
    ]
    assert detail["results"]["job_ids"] == [studies["A"].job_id]
    assert [o["kind"] for o in detail["results"]["objects"]] == ["SEG", "SR"]
    assert detail["by"] == "storage.retention"
    with node.database.reading() as session:
        assert verify_chain(session=session).intact
        # the delivery rows of A and H stay: what was sent where remains known
        assert len(session.scalars(select(Delivery.id)).all()) == 4

    # What a purged study looks like to the API: the study with purged_at, no instances, its
    # series, job, findings and delivery; the files' absence said plainly.
    detail_a = get_study(node.database, ADMIN, studies["A"].uid)
    assert detail_a.purged_at is not None and detail_a.instance_count == 0
    assert [s.instance_count for s in detail_a.series] == [0]
    assert [j.status for j in detail_a.jobs] == [JobStatus.SUCCEEDED]
    assert detail_a.results[0].purged_at is not None
    assert [f.label for f in detail_a.results[0].findings] == ["liver"]
    assert [d.status for d in detail_a.deliveries] == [DeliveryStatus.SENT]

    # A second pass finds nothing more to do.
    again = node.retention.run_once()
    assert again is not None and again.removed == []
    assert len(_deleted_events(node)) == 3

    # A purged study cannot be run again; sent again, it is received as usual.
    from pacsai.operations import ConflictError

    with pytest.raises(ConflictError, match="were removed from this node"):
        retry_job(node.database, ADMIN, studies["G"].job_id or 0, RetryOptions(rerun=True))
    _send(node, studies["A"].datasets)
    with node.database.reading() as session:
        study_a = session.scalars(
            select(Study).where(Study.study_instance_uid == studies["A"].uid)
        ).one()
    assert study_a.purged_at is None and study_a.instance_count == 3
    assert study_a.status is StudyStatus.RECEIVING


def test_results_outlive_instances_with_their_own_age(start_node: Callable[..., Node]) -> None:
    node = start_node(**_settings(instances_days=AT_ONCE, results_days=30))
    sent = Sent(generate_uid(), make_ct_series(2))
    sent.uid = str(sent.datasets[0].StudyInstanceUID)
    _send(node, sent.datasets)
    _complete(node, sent)
    _finish(node, sent, JobStatus.SUCCEEDED, delivery=DeliveryStatus.SENT)

    report = node.retention.run_once()

    assert report is not None and [s.results for s in report.removed] == [0]
    _purged(node, sent, results=False)
    [event] = _deleted_events(node)
    assert "results" not in json.loads(event.detail or "{}")


def test_retention_disabled_removes_nothing(start_node: Callable[..., Node]) -> None:
    node = start_node(**_settings(enabled=False, instances_days=AT_ONCE, results_days=AT_ONCE))
    sent = Sent(generate_uid(), make_ct_series(2))
    sent.uid = str(sent.datasets[0].StudyInstanceUID)
    _send(node, sent.datasets)
    _complete(node, sent)
    _finish(node, sent, JobStatus.SUCCEEDED, delivery=DeliveryStatus.SENT)

    report = node.retention.run_once()

    assert report is not None and report.removed == []
    _intact(node, sent)


def test_a_leased_delivery_keeps_its_study(start_node: Callable[..., Node]) -> None:
    """A delivery another node's worker holds (status aside) is never pulled from under it."""
    node = start_node(**_settings())
    sent = Sent(generate_uid(), make_ct_series(2))
    sent.uid = str(sent.datasets[0].StudyInstanceUID)
    _send(node, sent.datasets)
    _complete(node, sent)
    _finish(node, sent, JobStatus.SUCCEEDED, delivery=DeliveryStatus.FAILED, leased=True)

    report = purge_studies(node.database, node.settings, ADMIN, study_uids=[sent.uid])

    assert report.removed == []
    [kept] = report.kept
    assert "being sent" in kept.reason
    _intact(node, sent)


# --- the command ---------------------------------------------------------------------------------


def _pacsai(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_pacsai(config, *args, timeout=120)


def _config(node: Node, tmp_path: Path) -> Path:
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(node.settings.model_dump(mode="json", exclude_none=True)))
    return path


def _snapshot(node: Node) -> dict[str, Any]:
    """Every file under the spool and results, and every row but the audit trail's."""
    files = sorted(
        str(p)
        for root in (node.spool.root, Path(node.settings.storage.results_dir))
        for p in root.rglob("*")
    )
    rows: dict[str, Any] = {"files": files}
    with node.database.reading() as session:
        for model in (Study, Series, Instance, Job, Result, ResultObject, Delivery):
            rows[model.__tablename__] = [
                {c.key: getattr(row, c.key) for c in model.__table__.columns}
                for row in session.scalars(select(model).order_by(model.id))
            ]
    return rows


def test_purge_command_dry_run_changes_nothing_then_purges_and_audits(
    database_url: str, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(database_url, **_settings())
    done, busy = Sent(generate_uid(), []), Sent(generate_uid(), [])
    for sent in (done, busy):
        sent.datasets = make_ct_series(2, study_uid=sent.uid)
        _send(node, sent.datasets)
        _complete(node, sent)
    _finish(node, done, JobStatus.SUCCEEDED, delivery=DeliveryStatus.SENT)
    config = _config(node, tmp_path)
    before = _snapshot(node)
    audit_rows = len(db_rows(node.database, AuditEvent))

    dry = _pacsai(config, "studies", "purge", "--older-than", "0s", "--dry-run")

    assert dry.returncode == 0, dry.stderr
    assert done.uid in dry.stdout and busy.uid not in dry.stdout
    assert "would remove the files of 1 studies (2 instances, 1 results" in dry.stdout
    assert "nothing was changed" in dry.stdout
    assert _snapshot(node) == before
    new_events = db_rows(node.database, AuditEvent)[audit_rows:]
    assert [e.event_id for e in new_events] == ["110112"]  # the dry run read study UIDs
    assert json.loads(new_events[0].detail or "{}")["studies"] == [done.uid]

    named = _pacsai(config, "studies", "purge", "--study", done.uid, "--study", busy.uid)

    assert named.returncode == 1  # the busy study was named and kept: say so
    assert f"study {busy.uid} kept: job {busy.job_id} is QUEUED" in named.stderr
    assert "removed the files of 1 studies (2 instances, 1 results" in named.stdout
    _purged(node, done)
    _intact(node, busy)
    [event] = _deleted_events(node)
    assert event.study_instance_uid == done.uid
    assert event.actor.startswith("cli:")
    detail = json.loads(event.detail or "{}")
    assert detail["command"] == "studies purge"
    assert detail["reason"] == "purge of named studies"

    none_left = _pacsai(config, "studies", "purge", "--older-than", "1d")
    assert none_left.returncode == 0
    assert "removed the files of 0 studies" in none_left.stdout

    refused = _pacsai(config, "studies", "purge")
    assert refused.returncode == 2 and "--older-than" in refused.stderr
    bad_age = _pacsai(config, "studies", "purge", "--older-than", "a while")
    assert bad_age.returncode == 2 and "30d" in bad_age.stderr


def test_the_sweep_removes_what_an_interrupted_purge_left(start_node: Callable[..., Node]) -> None:
    """Files of a purged study written before its purge (their removal after the commit never
    happened: a crash) are deleted by the sweep, not kept as orphans."""
    from pacsai.scp import SpoolSweep
    from pacsai.scp.sweep import ORPHANS

    node = start_node(**_settings())
    sent = Sent(generate_uid(), [])
    sent.datasets = make_ct_series(2, study_uid=sent.uid)
    _send(node, sent.datasets)
    _complete(node, sent)
    _finish(node, sent, JobStatus.SKIPPED)
    kept = {path: path.read_bytes() for path in sent.spool_files}

    report = purge_studies(node.database, node.settings, ADMIN, study_uids=[sent.uid])
    assert [s.instances for s in report.removed] == [2]
    for path, content in kept.items():  # as if the process had died right after the commit
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, (utcnow().timestamp() - 3600,) * 2)
    stray = sent.spool_files[0].parent / f"{generate_uid()}.0123456789abcdef.dcm"
    stray.write_bytes(b"an orphan of before the purge, too")
    os.utime(stray, (utcnow().timestamp() - 3600,) * 2)

    swept = SpoolSweep(node.database, node.spool, actor="PACSAI").run_once()

    assert swept.purged_removed == 3 and swept.orphans_moved == []
    assert not any(path.exists() for path in [*sent.spool_files, stray])
    assert not (node.spool.root / ORPHANS).exists()
