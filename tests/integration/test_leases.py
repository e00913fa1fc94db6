"""Leases on jobs and deliveries: several nodes on one database run each job once; a lost worker's
work runs again only once its lease has run out (or its own node takes it back at start-up)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pacsai.db import Database, Job, JobStatus, Result
from pacsai.phantom import write_phantom
from pacsai.scu import Target, push
from tests.support import REPO, ServeProcess, db_rows, wait_for

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
        wait_for(
            lambda: any(j.status is JobStatus.RUNNING for j in _jobs(database)), timeout=120
        )
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
