"""`kill -9` of `pacsai serve` in the middle of a series, then a restart on the same data.

Whatever was answered Success must survive, byte for byte, with its row; nothing partial may be
left in the spool; the association cut short is recorded as INTERRUPTED; and the study, once
quiet, gets exactly one job.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import split_dataset
from sqlalchemy import func, select

from pacsai._pynetdicom import AE  # pynetdicom, its response race fixed (see there)
from pacsai.db import (
    Association,
    AssociationOutcome,
    Database,
    Instance,
    Job,
    Study,
    utcnow,
    verify_chain,
)
from tests.support import ServeProcess, make_ct_series, wait_for, write_datasets

SLICES = 200
KILL_AFTER = 80  # Success responses before the node is killed
QUIET_SECONDS = 1.0
CALLING_AE = "DURABILITY"


def _dataset_bytes(part10: bytes) -> bytes:
    """The data set of a Part 10 file as pacsai spools it: after (0002,0000)-counted meta."""
    assert part10[128:132] == b"DICM", "not a Part 10 file"
    assert part10[132:138] == b"\x02\x00\x00\x00UL", "file meta does not start with its length"
    (group_length,) = struct.unpack("<I", part10[140:144])
    return part10[144 + group_length :]


class _SeriesSender(threading.Thread):
    """Sends files in order on one association until done or until the node goes away."""

    def __init__(self, port: int, files: list[Path]) -> None:
        super().__init__(name="durability-sender", daemon=True)
        self.port = port
        self.files = files
        self.answered: list[tuple[Path, int]] = []  # appended to by this thread only
        self.error: BaseException | None = None

    def successes(self) -> int:
        return sum(1 for _, status in list(self.answered) if status == 0)

    def run(self) -> None:
        ae = AE(ae_title=CALLING_AE)
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 60
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="PACSAI")
        try:
            if not assoc.is_established:
                raise RuntimeError("pacsai refused the association")
            for path in self.files:
                if not assoc.is_established:
                    return
                status = assoc.send_c_store(path).get("Status")
                if status is None:  # no response: the node went away
                    return
                self.answered.append((path, int(status)))
            assoc.release()
        except BaseException as exc:
            self.error = exc
        finally:
            # When the peer goes without an A-ABORT, pynetdicom's shutdown() of the socket fails
            # and skips its close(): close it here, or it leaks (ResourceWarning).
            assoc.join(timeout=30)
            transport = assoc.dul.socket
            if transport is not None and transport.socket is not None:
                transport.socket.close()


@pytest.fixture
def chunked_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send data sets straight from their files, unchanged (restored after the test)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def open_database() -> Iterator[Callable[[str], Database]]:
    opened: list[Database] = []

    def open_(url: str) -> Database:
        database = Database(url)
        opened.append(database)
        return database

    yield open_
    for database in opened:
        database.dispose()


def _holds(predicate: Callable[[], object], *, seconds: float, interval: float = 0.1) -> None:
    """Poll `predicate` for `seconds`; it must be true every time."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        assert value, f"stopped holding: {predicate}"
        if time.monotonic() > deadline:
            return
        time.sleep(interval)


@pytest.mark.slow
@pytest.mark.usefixtures("chunked_sends")
def test_kill_9_mid_series_loses_nothing_acknowledged(
    serve_process: Callable[..., ServeProcess],
    open_database: Callable[[str], Database],
    tmp_path: Path,
) -> None:
    # A short grace: the readiness probe of ServeProcess.start leaves a half-open association.
    server = serve_process(node={"study_quiet_seconds": QUIET_SECONDS, "shutdown_grace_seconds": 1})
    datasets = make_ct_series(SLICES, rows=32, columns=32, seed=11)
    study_uid = datasets[0].StudyInstanceUID
    files = write_datasets(datasets, tmp_path / "series")
    sent = {path: path.read_bytes()[split_dataset(path)[1] :] for path in files}
    uid_of = {path: ds.SOPInstanceUID for path, ds in zip(files, datasets, strict=True)}

    sender = _SeriesSender(server.port, files)
    sender.start()
    wait_for(lambda: sender.successes() >= KILL_AFTER or not sender.is_alive(), timeout=120)
    server.kill9()
    killed_at: datetime = utcnow()
    sender.join(timeout=120)
    assert not sender.is_alive(), "the sender did not notice that the node was killed"

    answered = list(sender.answered)
    acknowledged = [path for path, status in answered if status == 0]
    assert [status for _, status in answered] == [0] * len(answered)
    assert KILL_AFTER <= len(acknowledged) < SLICES, (
        f"{len(acknowledged)} of {SLICES} acknowledged before the kill: not mid-series "
        f"(sender error: {sender.error!r})"
    )

    server.start()  # same configuration file: same port, database and spool
    assert server.alive()
    database = open_database(server.settings.database.url)
    spool = server.settings.storage.spool_dir.resolve()

    # Every acknowledged instance is recorded, and its file holds exactly the bytes sent.
    with database.reading() as session:
        rows = {
            row.sop_instance_uid: row
            for row in session.execute(
                select(Instance).where(
                    Instance.sop_instance_uid.in_([uid_of[p] for p in acknowledged])
                )
            ).scalars()
        }
    damaged = []
    for path in acknowledged:
        row = rows.get(uid_of[path])
        if row is None:
            damaged.append(f"{uid_of[path]}: acknowledged, but no instances row")
            continue
        spooled = spool / row.path
        if not spooled.is_file():
            damaged.append(f"{uid_of[path]}: acknowledged, but {row.path} is missing")
            continue
        stored = _dataset_bytes(spooled.read_bytes())
        if hashlib.sha256(stored).hexdigest() != row.sha256:
            damaged.append(f"{uid_of[path]}: spool file does not match instances.sha256")
        if stored != sent[path]:
            damaged.append(f"{uid_of[path]}: spool file differs from what was sent")
    assert not damaged, damaged

    # Nothing partial is left behind.
    assert not list((spool / ".incoming").glob("*.part"))

    # The association the kill cut short is closed as INTERRUPTED, with what it stored.
    with database.reading() as session:
        [association] = session.execute(
            select(Association).where(Association.calling_ae_title == CALLING_AE)
        ).scalars()
        recorded = session.execute(
            select(func.count())
            .select_from(Instance)
            .where(Instance.association_id == association.id)
        ).scalar_one()
        study = session.execute(
            select(Study).where(Study.study_instance_uid == study_uid)
        ).scalar_one()
        in_study = session.execute(
            select(func.count()).select_from(Instance).where(Instance.study_id == study.id)
        ).scalar_one()
        chain = verify_chain(session=session)
    assert association.outcome is AssociationOutcome.INTERRUPTED
    assert association.ended_at is not None
    assert association.instances_stored == recorded >= len(acknowledged)
    assert study.instance_count == in_study == recorded
    assert chain.intact, chain.problem

    # Once quiet, the study gets exactly one job, covering every instance, and only one.
    study_id = study.id

    def jobs_since_kill() -> list[Job]:
        with database.reading() as session:
            jobs = session.execute(
                select(Job).where(Job.study_id == study_id).order_by(Job.id)
            ).scalars()
            return [job for job in jobs if job.created_at >= killed_at]

    jobs = wait_for(jobs_since_kill, timeout=30)
    assert len(jobs) == 1, [(j.id, j.instance_count) for j in jobs]
    assert jobs[0].instance_count == recorded
    _holds(lambda: len(jobs_since_kill()) == 1, seconds=3 * QUIET_SECONDS)
    assert server.alive()


class _KillingSender(threading.Thread):
    """Sends its files; the sender whose acknowledgement is the `kill_at`-th of all of them
    kills the node with SIGKILL at once, before it even looks at the next file."""

    def __init__(
        self, port: int, files: list[Path], name: str, on_ack: Callable[[Path], None]
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.port = port
        self.files = files
        self.on_ack = on_ack
        self.error: BaseException | None = None

    def run(self) -> None:
        ae = AE(ae_title=self.name)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="PACSAI")
        try:
            if not assoc.is_established:
                raise RuntimeError("pacsai refused the association")
            for path in self.files:
                if not assoc.is_established:
                    return
                status = assoc.send_c_store(path).get("Status")
                if status is None:
                    return
                if int(status) == 0:
                    self.on_ack(path)
        except BaseException as exc:
            self.error = exc
        finally:
            assoc.join(timeout=30)
            transport = assoc.dul.socket
            if transport is not None and transport.socket is not None:
                transport.socket.close()


@pytest.mark.slow
@pytest.mark.usefixtures("chunked_sends")
@pytest.mark.parametrize("kill_at", [1, 37, 150])
def test_an_instance_acknowledged_just_before_kill_9_is_present(
    serve_process: Callable[..., ServeProcess],
    open_database: Callable[[str], Database],
    tmp_path: Path,
    kill_at: int,
) -> None:
    """Four associations at once, so that instances are committed in groups; the node is
    killed the moment the `kill_at`-th acknowledgement arrives. Every acknowledged instance,
    the last one above all, is there after the restart with its bytes."""
    server = serve_process(node={"shutdown_grace_seconds": 1})
    assert server.process is not None
    victim = server.process
    acknowledged: list[Path] = []
    lock = threading.Lock()

    def on_ack(path: Path) -> None:
        with lock:
            acknowledged.append(path)
            if len(acknowledged) == kill_at:
                victim.kill()  # SIGKILL, from the thread that just got the answer

    senders = []
    sent: dict[Path, bytes] = {}
    uid_of: dict[Path, str] = {}
    for number in range(4):
        datasets = make_ct_series(60, rows=16, columns=16, seed=100 + number)
        files = write_datasets(datasets, tmp_path / f"series{number}")
        for path, ds in zip(files, datasets, strict=True):
            sent[path] = path.read_bytes()[split_dataset(path)[1] :]
            uid_of[path] = ds.SOPInstanceUID
        senders.append(_KillingSender(server.port, files, f"KILLER{number}", on_ack))
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=120)
    victim.wait(timeout=10)
    assert len(acknowledged) >= kill_at, [s.error for s in senders]
    last = acknowledged[kill_at - 1]

    server.start()
    database = open_database(server.settings.database.url)
    spool = server.settings.storage.spool_dir.resolve()
    with database.reading() as session:
        rows = {
            row.sop_instance_uid: row
            for row in session.execute(
                select(Instance).where(Instance.sop_instance_uid.in_(uid_of.values()))
            ).scalars()
        }
    lost = []
    for path in acknowledged:
        row = rows.get(uid_of[path])
        if row is None or not (spool / row.path).is_file():
            lost.append(uid_of[path])
            continue
        if _dataset_bytes((spool / row.path).read_bytes()) != sent[path]:
            lost.append(f"{uid_of[path]} (other bytes)")
    assert uid_of[last] in rows, "the instance acknowledged just before the kill is missing"
    assert not lost, lost
