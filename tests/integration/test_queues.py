"""Routes pinned to a queue run on the workers of that queue (the local backend: workers poll
the database), as separate `pacsai worker` processes beside a receiver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pacsai.db import Database, Job, JobStatus, Result, Worker, upgrade
from pacsai.phantom import write_phantom
from pacsai.scu import Target, push
from tests.support import REPO, PacsaiProcess, db_rows, make_settings, wait_for

pytestmark = pytest.mark.slow


def test_a_route_pinned_to_a_queue_runs_on_that_queues_worker(tmp_path: Path) -> None:
    sections: dict[str, Any] = {
        "queue": {"poll_seconds": 0.2, "local_workers": 0},
        "inference": {"models_dir": str(REPO / "models"), "device": "cpu"},
        "routes": [
            {
                "name": "ct-big",
                "when": {"Modality": "CT"},
                "model": "ct_abdomen_demo",
                "queue": "big-gpu",
            },
        ],
    }
    settings = make_settings(tmp_path, **sections)
    database = Database(settings.database.url)
    upgrade(database)
    processes = []
    try:
        receiver = PacsaiProcess("receiver", ["serve", "--role", "receiver"], settings, tmp_path)
        processes.append(receiver.start(lambda log: "listening as AE" in log))
        for name, queue in (("small", "default"), ("big", "big-gpu")):
            worker = PacsaiProcess(
                name, ["worker", "--name", name, "--queues", queue], settings, tmp_path
            )
            processes.append(worker.start(lambda log: " ready: local backend" in log))
        study = write_phantom("ct", tmp_path / "ct", seed=81)
        assert push(study.paths, Target("PACSAI", "127.0.0.1", settings.node.port)).failed == 0

        def finished() -> list[Job] | None:
            jobs = db_rows(database, Job)
            done = len(jobs) == 2 and all(j.status in JobStatus.finished() for j in jobs)
            return jobs if done else None

        first, second = wait_for(finished, timeout=240)
        assert first.queue == "default" and first.status is JobStatus.SUCCEEDED
        assert first.reason == f"route 'ct-big' runs on queue 'big-gpu' as job {second.id}"
        assert second.queue == "big-gpu" and json.loads(second.routes or "[]") == ["ct-big"]
        assert second.status is JobStatus.SUCCEEDED, second.reason
        assert db_rows(database, Result, Result.job_id == first.id) == []
        (result,) = db_rows(database, Result, Result.job_id == second.id)
        assert result.route_name == "ct-big"
        workers = {w.id.rsplit("/", 1)[1]: w for w in db_rows(database, Worker)}
        assert workers["big"].queues == "big-gpu" and workers["small"].queues == "default"
    finally:
        for process in processes:
            process.terminate()
        database.dispose()


def test_a_worker_that_cannot_see_its_device_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here: ask for one beyond the last instead")
    settings = make_settings(tmp_path, inference={"models_dir": str(REPO / "models")})
    config = tmp_path / "pacsai.yaml"
    config.write_text(json.dumps(settings.model_dump(mode="json", exclude_none=True)))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacsai.cli",
            "worker",
            "--device",
            "cuda:0",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot use device 'cuda:0'" in result.stderr
    assert "no CUDA device is visible" in result.stderr
    database = Database(settings.database.url)
    try:
        assert db_rows(database, Worker) == []  # it never registered
    finally:
        database.dispose()
