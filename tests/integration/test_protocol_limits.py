"""Hostile upper layer traffic over raw sockets against `pacsai serve`.

Each case is sent several times, so that memory kept per attempt would show: the node's RSS (read
from /proc) must come back to what it was after a clean warm-up series, no association may stay
ACTIVE in the database, what an association stored before it went bad is audited (110104), and
C-ECHO and a clean series still work afterwards.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from pacsai._pynetdicom import AE  # pynetdicom, its response race fixed (see there)
from pacsai.db import Association, AssociationOutcome, AuditEvent, Database
from tests.raw_dul import (
    VERIFICATION_CONTEXTS,
    RawPeer,
    c_store_rq,
    encoded_dataset,
    p_data,
    pdu,
    pdv,
    response_status,
)
from tests.support import ServeProcess, make_ct_series, make_ct_slice, wait_for

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
RSS_TOLERANCE_KIB = 24 * 1024
CT_CONTEXT = [(1, CTImageStorage, ExplicitVRLittleEndian), (3, *VERIFICATION_CONTEXTS[0][1:])]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _settled_rss(pid: int) -> int:
    """RSS once it stops falling (threads ending, buffers freed): the lowest of a few reads."""
    readings = []
    for _ in range(6):
        readings.append(_rss_kib(pid))
        time.sleep(0.25)
    return min(readings)


@pytest.fixture
def node(serve_process: Callable[..., ServeProcess]) -> Iterator[tuple[ServeProcess, Database]]:
    server = serve_process(
        node={"shutdown_grace_seconds": 1, "timeouts": {"acse": 5, "dimse": 30, "network": 10}},
        storage={"max_instance_mb": 4},
    )
    database = Database(server.settings.database.url)
    try:
        yield server, database
    finally:
        database.dispose()


def _clean_series(server: ServeProcess) -> None:
    ae = AE(ae_title="CLEAN")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSAI")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_echo().Status) == 0
        statuses = [int(assoc.send_c_store(ds).Status) for ds in make_ct_series(20, seed=5)]
    finally:
        assoc.release()
        assoc.join(timeout=30)
    assert statuses == [0] * 20


def _warm_baseline(server: ServeProcess) -> int:
    assert server.process is not None
    _clean_series(server)
    _clean_series(server)
    return _settled_rss(server.process.pid)


def _still_serving(server: ServeProcess, database: Database, baseline_kib: int) -> None:
    """Memory back to baseline, nothing ACTIVE, C-ECHO and a clean series still work."""
    assert server.alive()
    _clean_series(server)

    def nothing_active() -> bool:
        with database.reading() as session:
            return not session.execute(
                select(Association.id).where(Association.outcome == AssociationOutcome.ACTIVE)
            ).first()

    wait_for(nothing_active, timeout=30)
    assert server.process is not None
    grown = _settled_rss(server.process.pid) - baseline_kib
    assert grown < RSS_TOLERANCE_KIB, f"RSS grew by {grown} KiB and stayed"


def _raw_associations(database: Database) -> list[Association]:
    with database.reading() as session:
        rows = list(
            session.execute(
                select(Association)
                .where(Association.calling_ae_title == "RAWPEER")
                .order_by(Association.started_at)
            ).scalars()
        )
        for row in rows:
            session.expunge(row)
    return rows


def _associated(server: ServeProcess) -> RawPeer:
    peer = RawPeer(server.port)
    answer = peer.associate(contexts=CT_CONTEXT)
    assert answer.type == 0x02, f"not accepted: {answer}"
    return peer


def _stream_until_closed(peer: RawPeer, total: int) -> int:
    """Send up to `total` bytes of junk; how many went out before the node closed."""
    chunk = b"\xab" * MIB
    sent = 0
    while sent < total and peer.send_quietly(chunk):
        sent += len(chunk)
    return sent


def test_a_pdu_header_claiming_4_gib_is_refused_before_any_of_it_is_buffered(
    node: tuple[ServeProcess, Database],
) -> None:
    server, database = node
    baseline = _warm_baseline(server)
    for attempt in range(3):
        for pdu_type in (0x01, 0x04):  # an A-ASSOCIATE-RQ, then a P-DATA-TF, before any AC
            with RawPeer(server.port) as peer:
                peer.send(struct.pack(">BBL", pdu_type, 0, 0xFFFFFFF0))
                _stream_until_closed(peer, 64 * MIB)
                assert peer.closed_within(10) is not None, f"attempt {attempt}: still open"
        with _associated(server) as peer:  # and on an established association
            peer.send(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0))
            _stream_until_closed(peer, 64 * MIB)
            assert peer.closed_within(10) is not None
    _still_serving(server, database, baseline)
    rows = _raw_associations(database)
    assert len(rows) == 3 and {r.outcome for r in rows} == {AssociationOutcome.ABORTED}


def test_a_p_data_tf_of_empty_pdvs_is_refused_by_their_count(
    node: tuple[ServeProcess, Database],
) -> None:
    server, database = node
    baseline = _warm_baseline(server)
    empty = pdv(1, 0x00, b"")
    for _ in range(3):
        with _associated(server) as peer:
            # 1 MiB of 6-byte PDVs (the announced maximum PDU length): 174,762 of them
            peer.send(pdu(0x04, empty * (MIB // len(empty))))
            answer = peer.receive()
            assert answer is not None and answer.type == 0x07, f"no A-ABORT but {answer}"
            assert peer.closed_within(10) is not None
    _still_serving(server, database, baseline)
    assert {r.outcome for r in _raw_associations(database)} == {AssociationOutcome.ABORTED}


def test_a_malformed_pdv_after_store_fragments_ends_and_audits_the_association(
    node: tuple[ServeProcess, Database],
) -> None:
    server, database = node
    baseline = _warm_baseline(server)
    study = generate_uid()
    fragment = b"\x00" * (MIB - 64)
    for attempt in range(5):
        with _associated(server) as peer:
            [first] = make_ct_series(1, study_uid=study, seed=attempt)
            peer.send(p_data(pdv(1, 0x03, c_store_rq(1, CTImageStorage, first.SOPInstanceUID))))
            peer.send(p_data(pdv(1, 0x02, encoded_dataset(first))))
            assert response_status(peer) == 0
            second = generate_uid()
            peer.send(p_data(pdv(1, 0x03, c_store_rq(2, CTImageStorage, second))))
            for _ in range(3):  # 3 MiB of a data set that never ends (under max_instance_mb)
                peer.send(p_data(pdv(1, 0x00, fragment)))
            # a PDV item of length 1: a context ID, no message control header
            peer.send(pdu(0x04, struct.pack(">LB", 1, 1)))
            answer = peer.receive()
            assert answer is not None and answer.type == 0x07, f"no A-ABORT but {answer}"
    _still_serving(server, database, baseline)
    rows = _raw_associations(database)
    assert len(rows) == 5
    assert all(r.outcome is AssociationOutcome.ABORTED and r.ended_at for r in rows)
    assert all(r.instances_stored == 1 for r in rows)
    with database.reading() as session:
        transfers = [
            json.loads(e.detail or "{}")
            for e in session.execute(
                select(AuditEvent).where(AuditEvent.event_id == "110104")
            ).scalars()
        ]
    audited = {t.get("association_id"): t.get("instances") for t in transfers}
    assert all(audited.get(r.id) == 1 for r in rows), audited


def test_a_data_set_over_max_instance_mb_is_refused_and_not_held(
    node: tuple[ServeProcess, Database],
) -> None:
    server, database = node
    baseline = _warm_baseline(server)
    fragment = b"\x00" * (MIB - 64)
    for _ in range(3):
        with _associated(server) as peer:
            uid = generate_uid()
            peer.send(p_data(pdv(1, 0x03, c_store_rq(1, CTImageStorage, uid))))
            for _ in range(39):
                peer.send(p_data(pdv(1, 0x00, fragment)))
            peer.send(p_data(pdv(1, 0x02, fragment)))  # 40 MiB against max_instance_mb 4
            assert response_status(peer) == 0xA700
            assert peer.echo(3, message_id=2) == 0  # the association goes on
    _still_serving(server, database, baseline)
    with database.reading() as session:
        refusals = [
            json.loads(e.detail or "{}")
            for e in session.execute(
                select(AuditEvent).where(AuditEvent.event_id == "110104", AuditEvent.outcome == 4)
            ).scalars()
        ]
    assert len(refusals) == 3
    assert all(
        r["status"] == "0xA700" and "storage.max_instance_mb" in r["reason"] for r in refusals
    )


def test_600_kb_of_0xff_bytes_make_a_few_log_lines(node: tuple[ServeProcess, Database]) -> None:
    server, database = node
    baseline = _warm_baseline(server)
    before = len(server.log.read_text().splitlines())
    for _ in range(3):
        with RawPeer(server.port) as peer:
            peer.send_quietly(b"\xff" * 600 * 1024)
            assert peer.closed_within(10) is not None
    _still_serving(server, database, baseline)
    added = server.log.read_text().splitlines()[before:]
    assert len(added) < 20, "\n".join(added[:40])


def test_a_store_of_a_real_instance_in_many_small_fragments_is_stored(
    node: tuple[ServeProcess, Database],
) -> None:
    """The limits bound, they do not break: a data set in 1-byte-PDV steps of 64 PDVs each."""
    server, _ = node
    ds = make_ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0, rows=8)
    body = encoded_dataset(ds)
    with _associated(server) as peer:
        peer.send(p_data(pdv(1, 0x03, c_store_rq(1, CTImageStorage, ds.SOPInstanceUID))))
        pieces = [body[i : i + 16] for i in range(0, len(body), 16)]
        for start in range(0, len(pieces), 64):
            group = pieces[start : start + 64]
            last = start + 64 >= len(pieces)
            peer.send(
                p_data(
                    *(
                        pdv(1, 0x02 if last and n == len(group) - 1 else 0x00, piece)
                        for n, piece in enumerate(group)
                    )
                )
            )
        assert response_status(peer) == 0
