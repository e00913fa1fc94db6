"""A disk at the high-water mark is cleaned instead of refusing: the oldest finished studies go
first, in the background and before a C-STORE would be answered Out of Resources (0xA700);
what a job or a sender still needs stays.

Studies arrive over real associations and run through the node's own worker process (their
route does not match, so each job ends SKIPPED, a finished study). One test fills a real tmpfs
(mounting needs root); the other configures a mark above the free space of the disk it runs on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from sqlalchemy import select

from pacsai._pynetdicom import AE
from pacsai.db import AuditEvent, Instance, Job, JobStatus, Study
from pacsai.service import Node
from tests.support import REPO, db_rows, make_ct_series, wait_for

pytestmark = pytest.mark.slow

MIB = 2**20


def _workers(**storage: Any) -> dict[str, Any]:
    """Settings whose jobs end SKIPPED at once (no route matches CT) in a real worker process."""
    return {
        "queue": {"local_workers": 1, "poll_seconds": 0.2},
        "inference": {"models_dir": str(REPO / "models"), "device": "cpu", "warm_up": False},
        "routes": [
            {"name": "mr-only", "when": {"Modality": "MR"}, "model": "mr_brain_lesion_demo"}
        ],
        "storage": {"retention": {"instances_days": None, "results_days": None}, **storage},
    }


def _send(node: Node, datasets: list[Dataset], calling: str = "MODALITY") -> list[int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title=node.settings.node.ae_title)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _finished(node: Node, study_uid: str) -> None:
    def skipped() -> bool:
        with node.database.reading() as session:
            status = session.scalar(
                select(Job.status)
                .join(Study, Study.id == Job.study_id)
                .where(Study.study_instance_uid == study_uid)
            )
        return status is JobStatus.SKIPPED

    wait_for(skipped, timeout=120)


def _held(node: Node) -> dict[str, int]:
    """Study UID -> instances held, for every study on the node."""
    with node.database.reading() as session:
        return {
            uid: count
            for uid, count in session.execute(
                select(Study.study_instance_uid, Study.instance_count)
            ).all()
        }


def _deleted(node: Node) -> list[dict[str, Any]]:
    return [
        {"study": e.study_instance_uid, **json.loads(e.detail or "{}")}
        for e in db_rows(node.database, AuditEvent, AuditEvent.event_id == "110105")
    ]


def _assert_intact(node: Node, sent: dict[str, list[Dataset]], uids: list[str]) -> None:
    """Every instance of these studies has its row and its complete file."""
    with node.database.reading() as session:
        rows = {
            row.sop_instance_uid: row
            for row in session.scalars(
                select(Instance)
                .join(Study, Study.id == Instance.study_id)
                .where(Study.study_instance_uid.in_(uids))
            )
        }
    expected = {str(ds.SOPInstanceUID): ds for uid in uids for ds in sent[uid]}
    assert set(rows) == set(expected)
    for sop, row in rows.items():
        path = node.spool.absolute(row.path)
        assert path.stat().st_size == row.size_bytes
        assert dcmread(path).PixelData == expected[sop].PixelData


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs; mounting needs root with CAP_SYS_ADMIN, elsewhere the test skips."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("mount/umount not installed")
    point = tmp_path / "small"
    point.mkdir()
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root, CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run([umount, str(point)], capture_output=True, timeout=30, check=True)


def test_a_full_small_disk_is_cleaned_instead_of_refusing(
    small_filesystem: Path, start_node: Callable[..., Node]
) -> None:
    node = start_node(
        **_workers(spool_dir=str(small_filesystem / "spool"), min_free_mb=2, high_water_mb=8)
    )
    sent: dict[str, list[Dataset]] = {}
    order: list[str] = []
    # Eight studies of 4 MiB (32 slices of 256 x 256) on a 24 MiB disk: without removals
    # the sixth would be refused. Each finishes (SKIPPED) before the next is sent, as studies
    # arrive over a day.
    for _ in range(8):
        datasets = make_ct_series(32, rows=256, columns=256)
        uid = str(datasets[0].StudyInstanceUID)
        sent[uid] = datasets
        order.append(uid)
        statuses = _send(node, datasets)
        assert statuses == [0] * len(datasets), f"refused: {sorted(set(statuses))}"
        _finished(node, uid)

    held = _held(node)
    removed = [uid for uid in order if held[uid] == 0]
    kept = [uid for uid in order if held[uid]]
    assert removed and kept
    assert removed == order[: len(removed)]  # the oldest first, none skipped
    assert order[-1] in kept
    _assert_intact(node, sent, kept)
    events = _deleted(node)
    assert [e["study"] for e in events] == removed  # one event per study, in that order
    assert all(e["by"] == "storage.high_water_mb" for e in events)
    assert all(e["instances"]["count"] == 32 for e in events)
    assert shutil.disk_usage(node.spool.root).free >= 2 * MIB


def test_a_mark_above_the_free_space_removes_finished_studies_only(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // MIB
    # The disk is "at the mark" as far as the node can tell; nothing is below min_free_mb.
    node = start_node(
        node={
            "allowed_peers": [
                {"ae_title": "MODALITY"},
                {"ae_title": "SLOWPEER", "study_quiet_seconds": 3600},
            ]
        },
        **_workers(min_free_mb=0, high_water_mb=free_mb + 100_000),
    )
    first = [make_ct_series(3) for _ in range(2)]
    for datasets in first:
        assert _send(node, datasets) == [0] * 3
        _finished(node, str(datasets[0].StudyInstanceUID))
    # Removed in the background, woken by the writes that found the disk low.
    uids = [str(d[0].StudyInstanceUID) for d in first]
    wait_for(lambda: all(_held(node)[uid] == 0 for uid in uids), timeout=60)
    assert [e["study"] for e in _deleted(node)] == uids  # oldest first

    # A study still being received (its sender's quiet window is an hour) stays, while a
    # finished study that arrived after it goes.
    receiving = make_ct_series(3)
    assert _send(node, receiving, calling="SLOWPEER") == [0] * 3
    last = make_ct_series(3)
    assert _send(node, last) == [0] * 3
    last_uid = str(last[0].StudyInstanceUID)
    _finished(node, last_uid)
    wait_for(lambda: _held(node)[last_uid] == 0, timeout=60)

    receiving_uid = str(receiving[0].StudyInstanceUID)
    assert [e["study"] for e in _deleted(node)] == [*uids, last_uid]
    assert _held(node)[receiving_uid] == 3
    _assert_intact(node, {receiving_uid: receiving}, [receiving_uid])
