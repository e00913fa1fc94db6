"""Leases on jobs and deliveries: several nodes on one database run each job once; a lost worker's
work runs again only once its lease has run out (or its own node takes it back at start-up)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pacsai.db import (
    AuditEvent,
    Database,
    DeliveredObject,
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    Result,
    ResultObject,
    Worker,
)
from pacsai.phantom import write_phantom
from pacsai.scu import Target, echo, push
from tests.peers import arrivals
from tests.support import REPO, ServeProcess, db_rows, free_port, wait_for

pytestmark = pytest.mark.slow


def _workers(**queue: Any) -> dict[str, Any]:
    return {
        "queue": {"local_workers": 1, "poll_seconds": 0.2, **queue},
        "inference": {"models_dir": str(REPO / "models"), "device": "cpu"},
    }


def _jobs(database: Database) -> list[Job]:
    return db_rows(database, Job)


def _push(server: ServeProcess, paths: Any) -> None:
    assert push(paths, Target("PACSAI", "127.0.0.1", server.port)).failed == 0


def test_two_serve_processes_on_one_database_run_each_job_once(
    database_url: str, serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    first = serve_process(database_url, **_workers())
    database = Database(database_url)
    try:
        _push(first, write_phantom("ct", tmp_path / "ct1", seed=31).paths)
        wait_for(lambda: any(j.status is JobStatus.RUNNING for j in _jobs(database)), timeout=120)
        second = serve_process(database_url, **_workers())
        _push(second, write_phantom("cr", tmp_path / "cr1", seed=32).paths)

        def finished() -> list[Job] | None:
            jobs = _jobs(database)
            done = [j for j in jobs if j.status in JobStatus.finished()]
            return jobs if len(jobs) == 2 and len(done) == 2 else None

        jobs = wait_for(finished, timeout=240)
        for job in jobs:
            assert job.status is JobStatus.SUCCEEDED, job.reason
            assert job.attempts == 1, f"job {job.id} ran {job.attempts} times"
            assert len(db_rows(database, Result, Result.job_id == job.id)) == 1
        log = first.log.read_text()
        assert "queued again" not in log, log
    finally:
        database.dispose()


# --- kill -9 of the node while it sends: what the destination sees ----------------------------


@pytest.fixture
def recording_scp(tmp_path: Path) -> Iterator[Callable[..., tuple[int, Path]]]:
    """``recording_scp(delay=..., find=...)``: a storage SCP process logging every arrival."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(*, delay: float = 0.0, find: bool = True) -> tuple[int, Path]:
        port = free_port()
        log = tmp_path / f"arrivals-{port}.jsonl"
        command = [sys.executable, "-m", "tests.peers", "recording-scp", str(port)]
        command += ["--log", str(log), "--delay", str(delay)] + ([] if find else ["--no-find"])
        processes.append(subprocess.Popen(command, cwd=REPO))

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, timeout=30)
        return port, log

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def _destination(port: int, **extra: Any) -> dict[str, Any]:
    return {"pacs": {"ae_title": "RECORDER", "host": "127.0.0.1", "port": port, **extra}}


@pytest.mark.parametrize("queryable", [True, False], ids=["c-find", "storage-only"])
def test_kill_9_of_the_node_mid_delivery_sends_each_uid_once(
    queryable: bool,
    serve_process: Callable[..., ServeProcess],
    recording_scp: Callable[..., tuple[int, Path]],
    tmp_path: Path,
) -> None:
    """The node is killed after the destination stored the first object and before its answer
    came back. After the restart the node takes its own delivery lease back at once (not after
    the lease's 60 s), asks the destination for the object in doubt (C-FIND), and sends only
    what is missing. A storage-only destination gets the object in doubt again under the same
    SOP Instance UID: a duplicate it stores as the same instance, never a second result."""
    port, log = recording_scp(delay=4.0, find=queryable)
    sections = _workers(lease_seconds=60)
    sections["destinations"] = _destination(port, backoff_seconds=2)
    study = write_phantom("ct", tmp_path / "ct", seed=41)
    first = serve_process(**sections)
    database = Database(first.settings.database.url)
    try:
        _push(first, study.paths)
        wait_for(lambda: len(arrivals(log)) == 1, timeout=180)
        first.kill9()
        restarted = time.monotonic()
        serve_process(**sections)

        def sent() -> Delivery | None:
            rows = db_rows(database, Delivery)
            return rows[0] if rows and rows[0].status is DeliveryStatus.SENT else None

        delivery = wait_for(sent, timeout=120)
        assert time.monotonic() - restarted < 45, "the node waited for its own lease to run out"
        objects = {o.sop_instance_uid: o.kind for o in db_rows(database, ResultObject)}
        assert sorted(objects.values()) == ["SEG", "SR"]
        seen = [item["sop"] for item in arrivals(log)]
        assert set(seen) == set(objects)  # nothing but the result's own UIDs
        acknowledged = db_rows(database, DeliveredObject)
        assert {a.sop_instance_uid for a in acknowledged} == set(objects)
        if queryable:
            assert sorted(seen) == sorted(objects), "a SOP Instance UID arrived twice"
            assert sorted(a.confirmed_by for a in acknowledged) == ["C-FIND", "C-STORE"]
        else:
            first_sent = seen[0]
            assert seen.count(first_sent) == 2 and len(seen) == 3
            assert [a.confirmed_by for a in acknowledged] == ["C-STORE", "C-STORE"]
        exports = db_rows(database, AuditEvent, AuditEvent.event_id == "110106")
        assert [json.loads(e.detail or "{}")["status"] for e in exports] == ["SENT"]
        assert delivery.attempts == 1
    finally:
        database.dispose()


# --- a worker killed while it runs a job (the out-of-memory killer) ---------------------------


def _kill_the_worker_running(database: Database, attempt: int) -> int:
    """Wait until the job runs its ``attempt``-th time, then SIGKILL its worker process."""

    def running() -> Job | None:
        jobs = [j for j in _jobs(database) if j.status is JobStatus.RUNNING]
        return jobs[0] if jobs and jobs[0].attempts == attempt else None

    job = wait_for(running, timeout=180)
    (worker,) = db_rows(database, Worker, Worker.id == job.lease_owner)
    os.kill(worker.pid, signal.SIGKILL)
    return worker.pid


def test_a_job_whose_worker_is_killed_ends_failed_and_reception_goes_on(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    server = serve_process(**_workers(max_attempts=2))
    database = Database(server.settings.database.url)
    target = Target("PACSAI", "127.0.0.1", server.port)
    try:
        _push(server, write_phantom("ct", tmp_path / "ct", seed=42).paths)
        killed = [_kill_the_worker_running(database, attempt) for attempt in (1, 2)]
        assert echo(target) == 0  # the receiver never stopped

        (job,) = wait_for(
            lambda: [j for j in _jobs(database) if j.status is JobStatus.FAILED] or None,
            timeout=60,
        )
        assert job.attempts == 2
        assert job.reason is not None and "SIGKILL" in job.reason and "2 times" in job.reason
        lost = [
            json.loads(e.detail or "{}")
            for e in db_rows(database, AuditEvent, AuditEvent.event_id == "110100")
            if json.loads(e.detail or "{}").get("activity") == "job attempt lost"
        ]
        assert [(d["attempt"], d["status"]) for d in lost] == [(1, "QUEUED"), (2, "FAILED")]

        # The restarted worker runs the next study.
        _push(server, write_phantom("cr", tmp_path / "cr", seed=43).paths)
        finished = wait_for(
            lambda: [j for j in _jobs(database) if j.status is JobStatus.SUCCEEDED] or None,
            timeout=180,
        )
        assert finished[0].attempts == 1
        workers = db_rows(database, Worker)
        assert all(w.pid not in killed for w in workers if w.stopped_at is None)
        assert "SIGKILL" in server.log.read_text()
    finally:
        database.dispose()
