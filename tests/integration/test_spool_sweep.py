"""The spool sweep: files without a row are moved aside (once old enough), rows without a file
are reported and audited once, old partial files are removed, and nothing a row points at or
that may be in flight is touched."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from pacsai._pynetdicom import AE  # pynetdicom, its response race fixed (see there)
from pacsai.db import AuditEvent, Instance
from pacsai.scp import SpoolSweep
from pacsai.scp.sweep import ORPHANS
from pacsai.service import Node
from tests.support import make_ct_series, wait_for

HOUR_AGO = time.time() - 3600


def _store(node: Node, count: int) -> list[Instance]:
    ae = AE(ae_title="SWEEPER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title="PACSAI")
    assert assoc.is_established
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in make_ct_series(count)] == [0] * count
    finally:
        assoc.release()
    with node.database.reading() as session:
        rows = list(session.execute(select(Instance)).scalars())
        for row in rows:
            session.expunge(row)
    return rows


def _audit(node: Node, event_id: str) -> list[dict[str, object]]:
    with node.database.reading() as session:
        return [
            json.loads(e.detail or "{}")
            for e in session.execute(
                select(AuditEvent).where(AuditEvent.event_id == event_id)
            ).scalars()
        ]


def _old_file(path: Path, content: bytes) -> Path:
    """A file written an hour ago (older than the sweep's in-flight margin)."""
    path.write_bytes(content)
    os.utime(path, (HOUR_AGO, HOUR_AGO))
    return path


def test_the_sweep_moves_orphans_aside_and_reports_missing_files(
    start_node: Callable[..., Node],
) -> None:
    node = start_node()
    rows = _store(node, 4)
    spool = node.spool.root
    kept, lost = rows[0], rows[1]
    series_dir = (spool / kept.path).parent
    orphan = _old_file(
        series_dir / f"{generate_uid()}.0123456789abcdef.dcm", b"written, never committed"
    )
    young = series_dir / f"{generate_uid()}.fedcba9876543210.dcm"
    young.write_bytes(b"may still be in flight")
    in_flight = _old_file(
        series_dir / f"{generate_uid()}.00112233aabbccdd.dcm", b"this process is committing it"
    )
    partial = _old_file(spool / ".incoming" / "leftover.part", b"cut short")
    (spool / lost.path).unlink()

    relative_in_flight = str(in_flight.relative_to(spool))
    sweep = SpoolSweep(
        node.database,
        node.spool,
        actor="PACSAI",
        in_flight=lambda: frozenset({relative_in_flight}),
    )
    report = sweep.run_once()

    assert report.orphans_moved == [str(orphan.relative_to(spool))]
    assert (spool / ORPHANS / orphan.relative_to(spool)).read_bytes() == (
        b"written, never committed"
    )
    assert not orphan.exists() and young.exists() and in_flight.exists()
    assert report.missing == [(lost.sop_instance_uid, lost.path)]
    assert report.partials_removed == 1 and not partial.exists()
    assert all((spool / row.path).is_file() for row in rows if row.id != lost.id)

    [moved] = [a for a in _audit(node, "110100") if "moved" in str(a.get("what"))]
    assert moved["count"] == 1 and moved["paths"] == report.orphans_moved
    [alert] = [a for a in _audit(node, "110113") if "missing" in str(a.get("what"))]
    assert alert["sop_instance_uids"] == [lost.sop_instance_uid]

    again = sweep.run_once()  # nothing new: no second alert for the same missing file
    assert again.orphans_moved == [] and again.missing == report.missing
    assert len([a for a in _audit(node, "110113") if "missing" in str(a.get("what"))]) == 1


def test_the_node_sweeps_at_start_up(start_node: Callable[..., Node], tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    series_dir = spool / generate_uid() / generate_uid()
    series_dir.mkdir(parents=True)
    orphan = _old_file(series_dir / f"{generate_uid()}.0123456789abcdef.dcm", b"left by a crash")

    node = start_node()

    wait_for(lambda: (node.spool.root / ORPHANS / orphan.relative_to(spool)).is_file())
    assert not orphan.exists()
