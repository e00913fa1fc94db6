"""A full spool over real associations: Out of Resources (0xA700), nothing partial, nothing lost.

Three ways to run out of space: ``storage.min_free_mb`` above what the filesystem has, ENOSPC
injected into the spool's own ``os.write``/``os.fsync`` calls, and a real 1 MiB tmpfs filled up.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom.association import Association as ScuAssociation
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from pacsai._pynetdicom import AE  # pynetdicom, its response race fixed (see there)
from pacsai.db import Association, AuditEvent, AuditEventId, Instance, Study
from pacsai.scp import spool as spool_module
from pacsai.service import Node
from tests.support import make_ct_series, wait_for

OUT_OF_RESOURCES = 0xA700


def _open(node: Node, calling: str = "MODALITY") -> ScuAssociation:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 15
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title=node.settings.node.ae_title)
    assert assoc.is_established
    return assoc


def _send(node: Node, datasets: list[Dataset]) -> list[Dataset]:
    """C-STORE each data set on one association; return the responses."""
    assoc = _open(node)
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def _spool_files(node: Node) -> list[Path]:
    """Every file below the spool root, .incoming included."""
    return sorted(path for path in node.spool.root.rglob("*") if not path.is_dir())


def _instances(node: Node) -> list[Instance]:
    with node.database.reading() as session:
        return list(session.execute(select(Instance)).scalars())


def _refusals(node: Node) -> list[dict[str, Any]]:
    with node.database.reading() as session:
        events = session.execute(
            select(AuditEvent).where(
                AuditEvent.event_id == str(AuditEventId.INSTANCES_TRANSFERRED),
                AuditEvent.outcome != 0,
            )
        ).scalars()
        return [{"actor": e.actor, **json.loads(e.detail or "{}")} for e in events]


def _dataset_bytes(path: Path) -> bytes:
    """The data set of a spooled Part 10 file, without preamble and file meta."""
    ds = dcmread(path, stop_before_pixels=True)
    return path.read_bytes()[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength) :]


def _assert_intact(node: Node, sent: list[Dataset]) -> None:
    """Every acknowledged instance has a row and a complete file, and nothing else is there."""
    by_uid = {ds.SOPInstanceUID: ds for ds in sent}
    rows = _instances(node)
    assert {row.sop_instance_uid for row in rows} == set(by_uid)
    for row in rows:
        path = node.spool.absolute(row.path)
        assert path.stat().st_size == row.size_bytes
        assert hashlib.sha256(_dataset_bytes(path)).hexdigest() == row.sha256
        stored = dcmread(path)
        assert stored.PixelData == by_uid[row.sop_instance_uid].PixelData
        assert stored.SOPInstanceUID == row.sop_instance_uid
    assert _spool_files(node) == sorted(node.spool.absolute(row.path) for row in rows)


# --- (a) storage.min_free_mb above the free space -------------------------------------------------


def test_below_min_free_space_store_is_refused_and_nothing_is_written(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    node = start_node(storage={"min_free_mb": free_mb + 10_000})
    [ds] = make_ct_series(1)

    assoc = _open(node)
    try:
        response = assoc.send_c_store(ds)
        echo = assoc.send_c_echo()
    finally:
        assoc.release()

    assert int(response.Status) == OUT_OF_RESOURCES
    assert response.get("ErrorComment")
    assert int(echo.Status) == 0  # the node still answers
    assert _spool_files(node) == []
    assert [p.name for p in node.spool.root.iterdir()] == [".incoming"]
    assert _instances(node) == []
    with node.database.reading() as session:
        assert session.execute(select(func.count()).select_from(Study)).scalar_one() == 0
    [refusal] = _refusals(node)
    assert refusal["actor"] == "MODALITY"
    assert refusal["status"] == "0xA700"
    assert refusal["affected_sop_instance_uid"] == ds.SOPInstanceUID
    [association] = wait_for(
        lambda: [a for a in _associations(node) if a.ended_at is not None] or None
    )
    assert (association.instances_stored, association.instances_failed) == (0, 1)


def _associations(node: Node) -> list[Association]:
    with node.database.reading() as session:
        return list(session.execute(select(Association)).scalars())


# --- (b) ENOSPC injected into the spool's writes ------------------------------------------------


class _Enospc:
    """Makes the spool's writes fail with ENOSPC, after a partial write has reached the disk.

    ``pacsai.scp.spool.os`` is the process-wide ``os`` module, so only file descriptors that
    point into the spool fail; everything else (SQLite, logging, sockets) is left alone.
    """

    def __init__(self, spool_root: Path, call: str) -> None:
        self.spool_root = str(spool_root)
        self.call = call
        self.real = getattr(os, call)
        self.partial_sizes: list[int] = []
        self.failures = 0

    def _in_spool(self, fd: int) -> bool:
        try:
            return str(Path(f"/proc/self/fd/{fd}").readlink()).startswith(self.spool_root)
        except OSError:
            return False

    def _fail(self, fd: int) -> None:
        self.partial_sizes.append(os.fstat(fd).st_size)
        self.failures += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, fd: int, data: Any) -> int:
        if not self._in_spool(fd):
            return int(self.real(fd, data))
        if os.fstat(fd).st_size == 0 and len(data) > 1:
            return int(self.real(fd, bytes(data[: len(data) // 2])))  # a short write first
        self._fail(fd)
        return 0

    def fsync(self, fd: int) -> None:
        if self._in_spool(fd):
            self._fail(fd)
        self.real(fd)


@pytest.mark.parametrize("call", ["write", "fsync"])
def test_enospc_during_the_write_is_refused_and_leaves_no_partial_file(
    start_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    node = start_node()
    [ds] = make_ct_series(1)
    injection = _Enospc(node.spool.root, call)
    monkeypatch.setattr(spool_module.os, call, getattr(injection, call))

    [refused] = _send(node, [ds])

    assert int(refused.Status) == OUT_OF_RESOURCES
    assert "full" in str(refused.get("ErrorComment", ""))  # "the spool filesystem is full"
    assert injection.failures == 1
    assert injection.partial_sizes[0] > 0  # a partial file existed when the disk "filled"
    assert _spool_files(node) == []
    assert list((node.spool.root / ".incoming").iterdir()) == []
    assert _instances(node) == []
    [refusal] = _refusals(node)
    assert refusal["status"] == "0xA700"

    monkeypatch.undo()
    [stored] = _send(node, [ds])

    assert int(stored.Status) == 0
    _assert_intact(node, [ds])


def test_enospc_replacing_an_instance_keeps_the_acknowledged_version(
    start_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = start_node()
    [original] = make_ct_series(1)
    assert [int(r.Status) for r in _send(node, [original])] == [0]
    changed = copy.deepcopy(original)
    changed.PixelData = bytes(len(original.PixelData))
    injection = _Enospc(node.spool.root, "write")
    monkeypatch.setattr(spool_module.os, "write", injection.write)

    [refused] = _send(node, [changed])

    assert int(refused.Status) == OUT_OF_RESOURCES
    _assert_intact(node, [original])
    [row] = _instances(node)
    assert row.replaced_count == 0


# --- (c) a real, tiny filesystem ----------------------------------------------------------------


@pytest.fixture(
    params=[
        pytest.param("size=1m", id="blocks"),
        pytest.param("size=16m,nr_inodes=12", id="inodes"),
    ]
)
def tiny_filesystem(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A tmpfs that fills up: 1 MiB of blocks, or plenty of blocks and a dozen inodes.

    Blocks run out first in the spool's own free-space check (tmpfs reports its free space
    exactly); inodes run out in the kernel, as ENOSPC from creating the temporary file.
    Mounting needs root with CAP_SYS_ADMIN; elsewhere the tests skip.
    """
    mount = shutil.which("mount")
    umount = shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("mount/umount not installed")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    point = tmp_path / "tiny"
    point.mkdir()
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"{request.param},mode=0700", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run([umount, str(point)], capture_output=True, timeout=30, check=True)


def test_a_real_full_filesystem_refuses_and_keeps_every_acknowledged_instance(
    tiny_filesystem: Path, start_node: Callable[..., Node]
) -> None:
    node = start_node(storage={"spool_dir": str(tiny_filesystem / "spool"), "min_free_mb": 0})
    sent = make_ct_series(200, rows=128, columns=128)  # 32 KiB of pixels each: 1 MiB holds ~30
    acknowledged: list[Dataset] = []
    statuses: list[int] = []

    assoc = _open(node)
    try:
        for ds in sent:
            status = int(assoc.send_c_store(ds).Status)
            statuses.append(status)
            if status != 0:
                break
            acknowledged.append(ds)
        again = int(assoc.send_c_store(sent[-1]).Status)  # still full: still refused
        echo = int(assoc.send_c_echo().Status)
    finally:
        assoc.release()

    assert statuses[-1] == OUT_OF_RESOURCES, "the filesystem never filled up"
    assert set(statuses[:-1]) == {0} and len(acknowledged) >= 2
    assert again == OUT_OF_RESOURCES
    assert echo == 0
    _assert_intact(node, acknowledged)
    assert list((node.spool.root / ".incoming").iterdir()) == []
    refusals = _refusals(node)
    assert [r["status"] for r in refusals] == ["0xA700", "0xA700"]
    with node.database.reading() as session:
        study = session.execute(select(Study)).scalar_one()
    assert study.instance_count == len(acknowledged)
