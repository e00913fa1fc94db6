"""Two receivers (`pacsai serve` processes, nodes of their own) on one PostgreSQL database and
one spool: a node that restarts after kill -9 closes its own open associations as INTERRUPTED
and removes its own temporary files, never the other node's, whose association keeps working."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom.uid import CTImageStorage
from pynetdicom.association import Association as ScuAssociation
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from pacsai._pynetdicom import AE
from pacsai.db import Association, AssociationOutcome, Database
from tests.support import ServeProcess, free_port, make_ct_series, make_settings, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _serve(tmp_path: Path, name: str, database_url: str, spool: Path) -> ServeProcess:
    workdir = tmp_path / name
    workdir.mkdir(exist_ok=True)
    settings = make_settings(
        workdir,
        database_url,
        node={"id": name, "port": free_port()},
        storage={"spool_dir": str(spool)},
    )
    config = workdir / "pacsai.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    return ServeProcess(config, settings, workdir).start()


def _open(port: int, calling: str) -> ScuAssociation:
    ae = AE(ae_title=calling)
    ae.network_timeout = 120
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    return assoc


def _store_one(assoc: ScuAssociation) -> None:
    [ds] = make_ct_series(1)
    assert int(assoc.send_c_store(ds).Status) == 0


def _association(database: Database, calling: str) -> Association:
    with database.reading() as session:
        row = session.scalars(
            select(Association).where(Association.calling_ae_title == calling)
        ).one()
        session.expunge(row)
    return row


def _restart_after_kill9(process: ServeProcess) -> ServeProcess:
    process.kill9()
    return ServeProcess(process.config, process.settings, process.workdir).start()


@pytest.fixture
def processes() -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for process in started:
        if process.alive():
            process.terminate()


def test_two_receivers_each_restart_without_closing_the_others_association(
    postgres_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    spool = tmp_path / "shared-spool"
    a = _serve(tmp_path, "recv-a", postgres_url, spool)
    processes.append(a)
    b = _serve(tmp_path, "recv-b", postgres_url, spool)
    processes.append(b)
    database = Database(postgres_url)
    incoming = spool / ".incoming"
    try:
        # A has an association open and a write in flight; B is killed with one open.
        on_a = _open(a.port, "TO-A")
        _store_one(on_a)
        writing_on_a = incoming / "recv-a+0123456789abcdef.part"
        writing_on_a.write_bytes(b"half an instance")
        on_b = _open(b.port, "TO-B")
        _store_one(on_b)
        left_by_b = incoming / "recv-b+fedcba9876543210.part"
        left_by_b.write_bytes(b"cut short by kill -9")

        b = _restart_after_kill9(b)
        processes.append(b)
        on_b.abort()

        lost = _association(database, "TO-B")
        assert (lost.node_id, lost.outcome) == ("recv-b", AssociationOutcome.INTERRUPTED)
        assert lost.instances_stored == 1
        kept = _association(database, "TO-A")
        assert (kept.node_id, kept.outcome, kept.ended_at) == (
            "recv-a",
            AssociationOutcome.ACTIVE,
            None,
        )
        assert writing_on_a.read_bytes() == b"half an instance"  # A's, left alone
        assert not left_by_b.exists()  # B's own leftover, removed at its start

        # A's association was never touched: it stores, echoes and releases as usual.
        _store_one(on_a)
        assert int(on_a.send_c_echo().Status) == 0
        on_a.release()
        released = wait_for(
            lambda: (row := _association(database, "TO-A")).ended_at is not None and row
        )
        assert (released.outcome, released.instances_stored) == (AssociationOutcome.RELEASED, 2)

        # And the other way round: A is killed with an association open, B's stays open.
        on_b2 = _open(b.port, "TO-B2")
        on_a2 = _open(a.port, "TO-A2")
        _store_one(on_a2)
        a = _restart_after_kill9(a)
        processes.append(a)
        on_a2.abort()

        assert _association(database, "TO-A2").outcome is AssociationOutcome.INTERRUPTED
        still = _association(database, "TO-B2")
        assert (still.outcome, still.ended_at) == (AssociationOutcome.ACTIVE, None)
        _store_one(on_b2)
        on_b2.release()
        wait_for(lambda: _association(database, "TO-B2").outcome is AssociationOutcome.RELEASED)
    finally:
        database.dispose()
