"""Receiving over real associations: pynetdicom and storescu push; the node stores and records."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.presentation import StoragePresentationContexts
from sqlalchemy import func, select

from pacsai._pynetdicom import AE  # pynetdicom, its response race fixed (see there)
from pacsai.db import AuditEvent, Instance, Job, JobStatus, Series, Study, StudyStatus
from pacsai.scu import Target, push
from pacsai.service import Node
from tests.support import make_ct_series, require_tool, wait_for, write_datasets

CT_SERIES = "dcm_qa_ct/In/Philips/S21570/S2010"
MR_SERIES = "dcm_qa_decubitus/In/HFS/3_t1_fl2d_sag"


def _target(node: Node) -> Target:
    return Target(node.settings.node.ae_title, "127.0.0.1", node.receiver.port)


def _stored_dataset_bytes(node: Node, sop_instance_uid: str) -> bytes:
    with node.database.reading() as session:
        instance = session.execute(
            select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
        ).scalar_one()
        path = node.spool.absolute(instance.path)
    return _dataset_part(path.read_bytes())


def _dataset_part(file_bytes: bytes) -> bytes:
    """The data set of a Part 10 file, without preamble and file meta."""
    ds = dcmread(file_bytes if isinstance(file_bytes, Path) else _bytes_io(file_bytes))
    group_length = int(ds.file_meta.FileMetaInformationGroupLength)
    return file_bytes[132 + 12 + group_length :]


def _bytes_io(data: bytes):  # type: ignore[no-untyped-def]
    from io import BytesIO

    return BytesIO(data)


def _assert_series_stored(node: Node, files: list[Path], *, same_bytes: bool) -> None:
    by_study: dict[str, set[str]] = {}
    for path in files:
        sent = dcmread(path)
        stored_bytes = _stored_dataset_bytes(node, sent.SOPInstanceUID)
        stored = dcmread(_bytes_io(stored_bytes), force=True)
        if same_bytes:
            assert stored_bytes == _dataset_part(path.read_bytes())
        stored.file_meta = sent.file_meta
        assert stored.PixelData == sent.PixelData
        assert stored == sent
        by_study.setdefault(sent.StudyInstanceUID, set()).add(sent.SeriesInstanceUID)
    with node.database.reading() as session:
        for study_uid, series_uids in by_study.items():
            study = session.execute(
                select(Study).where(Study.study_instance_uid == study_uid)
            ).scalar_one()
            assert study.instance_count == len(files)
            rows = session.execute(select(Series).where(Series.study_id == study.id)).scalars()
            assert {s.series_instance_uid for s in rows} == series_uids
            count = session.execute(
                select(func.count()).select_from(Instance).where(Instance.study_id == study.id)
            ).scalar_one()
            assert count == len(files)


@pytest.mark.shared_data
def test_pacsai_push_stores_real_ct_series_byte_for_byte(
    database_url: str, start_node: Callable[..., Node], shared_dicom: Path
) -> None:
    node = start_node(database_url)
    files = sorted((shared_dicom / CT_SERIES).iterdir())
    assert len(files) == 28

    summary = push(files, _target(node), calling_ae_title="PYNETDICOM")

    assert summary.succeeded == 28 and summary.failed == 0
    _assert_series_stored(node, files, same_bytes=True)


@pytest.mark.dcmtk
@pytest.mark.shared_data
def test_storescu_stores_real_mr_series(
    database_url: str, start_node: Callable[..., Node], shared_dicom: Path
) -> None:
    storescu = require_tool("storescu")
    node = start_node(database_url)
    folder = shared_dicom / MR_SERIES
    files = sorted(folder.iterdir())
    assert len(files) == 35

    result = subprocess.run(
        [
            storescu,
            "-aet",
            "STORESCU",
            "-aec",
            "PACSAI",
            "+sd",
            "+r",
            "127.0.0.1",
            str(node.receiver.port),
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    _assert_series_stored(node, files, same_bytes=False)
    with node.database.reading() as session:
        assert {i.calling_ae_title for i in session.execute(select(Instance)).scalars()} == {
            "STORESCU"
        }


def _send(port: int, datasets: list[Dataset], calling: str = "SENDER") -> list[int]:
    ae = AE(ae_title=calling)
    ae.requested_contexts = StoragePresentationContexts[:100]
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_four_concurrent_associations_store_every_instance_once(
    database_url: str, start_node: Callable[..., Node]
) -> None:
    node = start_node(database_url)
    study_uid = generate_uid()
    batches = [make_ct_series(100, study_uid=study_uid, seed=n) for n in range(4)]
    results: list[list[int]] = [[] for _ in batches]

    def send(index: int) -> None:
        results[index] = _send(node.receiver.port, batches[index], calling=f"SENDER{index}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    assert [status for batch in results for status in batch] == [0] * 400
    with node.database.reading() as session:
        assert session.execute(select(func.count()).select_from(Instance)).scalar_one() == 400
        study = session.execute(select(Study)).scalar_one()
        assert study.instance_count == 400
        series = session.execute(select(Series)).scalars().all()
        assert sorted(s.instance_count for s in series) == [100, 100, 100, 100]
    files = [p for p in node.spool.root.rglob("*.dcm")]
    assert len(files) == 400


def test_study_completes_after_quiet_period_and_reopens(
    database_url: str, start_node: Callable[..., Node]
) -> None:
    node = start_node(database_url, node={"study_quiet_seconds": 0.5})
    study_uid = generate_uid()
    assert _send(node.receiver.port, make_ct_series(3, study_uid=study_uid)) == [0, 0, 0]

    def jobs() -> list[Job]:
        with node.database.reading() as session:
            return list(session.execute(select(Job).order_by(Job.id)).scalars())

    first = wait_for(jobs)
    assert len(first) == 1 and first[0].status is JobStatus.QUEUED
    assert first[0].instance_count == 3

    assert _send(node.receiver.port, make_ct_series(2, study_uid=study_uid)) == [0, 0]
    second = wait_for(lambda: len(jobs()) == 2 and jobs())
    assert second[1].instance_count == 5
    with node.database.reading() as session:
        study = session.execute(select(Study)).scalar_one()
        assert study.status is StudyStatus.COMPLETE


def test_same_instance_twice_is_a_no_op_and_other_bytes_replace_with_audit(
    database_url: str, start_node: Callable[..., Node]
) -> None:
    node = start_node(database_url)
    [original] = make_ct_series(1)
    assert _send(node.receiver.port, [original]) == [0]
    assert _send(node.receiver.port, [original]) == [0]

    with node.database.reading() as session:
        instance = session.execute(select(Instance)).scalar_one()
        assert instance.replaced_count == 0
        first_path = instance.path
        assert session.execute(select(Study.instance_count)).scalar_one() == 1

    changed = Dataset()
    changed.update(original)
    changed.file_meta = original.file_meta
    changed.PixelData = bytes(len(original.PixelData))
    assert _send(node.receiver.port, [changed]) == [0]

    with node.database.reading() as session:
        instance = session.execute(select(Instance)).scalar_one()
        assert instance.replaced_count == 1
        assert session.execute(select(Study.instance_count)).scalar_one() == 1
        updates = (
            session.execute(select(AuditEvent).where(AuditEvent.action == "U")).scalars().all()
        )
    assert len(updates) == 1 and original.SOPInstanceUID in (updates[0].detail or "")
    assert not node.spool.absolute(first_path).exists()
    stored = dcmread(node.spool.absolute(instance.path))
    assert stored.PixelData == changed.PixelData


def test_pushed_folder_files_written_by_factories(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node()
    files = write_datasets(make_ct_series(5), tmp_path / "in")
    summary = push([tmp_path / "in"], _target(node))
    assert summary.succeeded == 5
    _assert_series_stored(node, files, same_bytes=True)
