"""The same SOP Instance UID from many associations at the same moment, in different bytes.

Twenty associations are opened first; then, in each round, all of them send one SOP Instance UID
at once (a barrier releases them together), alternating two byte-variants, then as twenty
different variants. Whatever the interleaving, every instance answered Success must have its row,
the row's file must exist, and the file must hold exactly the bytes whose hash the row records;
the bytes must be one of the variants acknowledged; and nothing may be left in the spool that no
row points at.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from sqlalchemy import select

from pacsai._pynetdicom import AE  # pynetdicom, its response race fixed (see there)
from pacsai.db import Database, Instance
from tests.support import ServeProcess, make_ct_slice

SENDERS = 20
ROUNDS = 4  # per kind of round: two variants, then twenty


def _dataset_bytes(part10: bytes) -> bytes:
    assert part10[128:132] == b"DICM"
    (group_length,) = struct.unpack("<I", part10[140:144])
    return part10[144 + group_length :]


def _variants(count: int, *, study: str, series: str, sop: str, round_: int) -> list[Dataset]:
    variants = []
    for number in range(count):
        ds = make_ct_slice(
            study_uid=study,
            series_uid=series,
            index=0,
            rows=32,
            columns=32,
            seed=round_ * 97 + number,
        )
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        variants.append(ds)
    return variants


def _sha(ds: Dataset) -> str:
    encoded = encode(ds, False, True)
    assert encoded is not None
    return hashlib.sha256(encoded).hexdigest()


class _Sender:
    def __init__(self, port: int, number: int) -> None:
        ae = AE(ae_title=f"RACE{number:02d}")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self.assoc: Association = ae.associate("127.0.0.1", port, ae_title="PACSAI")
        assert self.assoc.is_established, "pacsai refused the association"
        transport = self.assoc.dul.socket
        assert transport is not None and transport.socket is not None
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, ds: Dataset) -> int | None:
        status = self.assoc.send_c_store(ds).get("Status")
        return None if status is None else int(status)

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()
        self.assoc.join(timeout=30)
        transport = self.assoc.dul.socket
        if transport is not None and transport.socket is not None:
            transport.socket.close()


def _problems(database: Database, spool: Path, sop: str, acknowledged: set[str]) -> list[str]:
    with database.reading() as session:
        row = session.execute(
            select(Instance).where(Instance.sop_instance_uid == sop)
        ).scalar_one_or_none()
    if row is None:
        return [f"{sop}: acknowledged, but no row"]
    path = spool / row.path
    if not path.is_file():
        return [f"{sop}: the row points at {row.path}, which does not exist"]
    problems = []
    stored = hashlib.sha256(_dataset_bytes(path.read_bytes())).hexdigest()
    if stored != row.sha256:
        problems.append(f"{sop}: the file holds {stored[:12]}, the row says {row.sha256[:12]}")
    if row.sha256 not in acknowledged:
        problems.append(f"{sop}: the row holds {row.sha256[:12]}, which nobody was answered for")
    return problems


def _unreferenced(database: Database, spool: Path) -> list[str]:
    with database.reading() as session:
        recorded = set(session.execute(select(Instance.path)).scalars())
    return sorted(
        str(p.relative_to(spool))
        for p in spool.rglob("*.dcm")
        if str(p.relative_to(spool)) not in recorded
    )


@pytest.mark.slow
def test_the_same_uid_from_twenty_associations_at_once_is_never_lost(
    database_url: str, serve_process: Callable[..., ServeProcess]
) -> None:
    server = serve_process(
        database_url,
        node={
            "max_associations": SENDERS + 4,
            "max_connections_per_host": SENDERS + 4,
            "shutdown_grace_seconds": 2,
        },
    )
    database = Database(server.settings.database.url)
    spool = server.settings.storage.spool_dir.resolve()
    study, series = generate_uid(), generate_uid()
    senders = [_Sender(server.port, n) for n in range(SENDERS)]
    problems: list[str] = []
    rounds: list[tuple[str, list[int | None]]] = []
    try:
        for kind, count in (("two variants", 2), ("twenty variants", SENDERS)):
            for round_ in range(ROUNDS):
                sop = generate_uid()
                variants = _variants(count, study=study, series=series, sop=sop, round_=round_)
                hashes = [_sha(ds) for ds in variants]
                statuses: list[int | None] = [None] * SENDERS
                barrier = threading.Barrier(SENDERS)

                def send(
                    number: int,
                    barrier: threading.Barrier = barrier,
                    statuses: list[int | None] = statuses,
                    variants: list[Dataset] = variants,
                    count: int = count,
                ) -> None:
                    barrier.wait(timeout=60)
                    statuses[number] = senders[number].send(variants[number % count])

                threads = [threading.Thread(target=send, args=(n,)) for n in range(SENDERS)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=120)
                acknowledged = {hashes[n % count] for n in range(SENDERS) if statuses[n] == 0}
                rounds.append((f"{kind} round {round_}", statuses))
                if acknowledged:
                    problems += _problems(database, spool, sop, acknowledged)
                assert server.alive()
    finally:
        for sender in senders:
            sender.close()
    table = "\n".join(f"{name}: {statuses}" for name, statuses in rounds)
    try:
        assert not problems, "\n".join(problems) + "\n" + table
        # Every round must have acknowledged something: a node that refuses all is no answer.
        assert all(0 in statuses for _, statuses in rounds), table
        assert _unreferenced(database, spool) == []
    finally:
        database.dispose()
