"""The job's "route" stage: from the rows the receiver recorded against the files' headers.

Writes a phantom CT (``--spacing 0.75``: 512 x 512 x 256 slices), pushes it to an in-process
node over a real association (SQLite, no workers), and runs jobs of that study with the
node's own job runner, whose route matches the study but picks no series (so that the job
ends after routing, SKIPPED, with no model). Each job's "route" timing is read from the job,
as the API shows it. Then the instance rows are made to look recorded before migration 0012
(frames null), so that the same study is routed from the headers of its files, and the jobs
run again. Prints the median of each, with the time of the job's one query for its study
(``job_context``, run before the stage: it reads the rows either way), and the ratio, all
measured in the same run.

    python bench/route.py [--spacing 0.75] [--repeat 5]

On a tree before migration 0012 only the files are measured.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import select, update

from pacsai.config import Settings
from pacsai.db import Instance, Job, JobStatus, Study, utcnow
from pacsai.db.jobs import job_context, queue_job
from pacsai.inference.registry import ModelRegistry
from pacsai.jobs.runner import JobRunner
from pacsai.phantom.dicom import write_phantom
from pacsai.scu import Target, push
from pacsai.service import Node, configure_libraries


def route_seconds(
    node: Node, runner: JobRunner, study_id: int, repeat: int
) -> tuple[list[float], list[float]]:
    """Run ``repeat`` new jobs of the study: each one's "route" stage, and the query that reads
    what the job needs of its study (before the stage), in seconds."""
    seconds, queries = [], []
    for _ in range(repeat):
        with node.database.transaction() as session:
            job_id = queue_job(
                session=session, study_id=study_id, instance_count=0, now=utcnow(), queue="default"
            ).id
        with node.database.reading() as session:
            started = time.perf_counter()
            job_context(session=session, job_id=job_id)
            queries.append(time.perf_counter() - started)
        lease = runner.claim(job_id=job_id)
        assert lease is not None
        outcome = runner.run(lease)
        assert outcome is not None and outcome.status is JobStatus.SKIPPED, outcome
        with node.database.reading() as session:
            timings = session.scalar(select(Job.timings).where(Job.id == job_id))
        seconds.append(float(json.loads(timings or "{}")["route"]))
    return seconds, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=0.75, help="mm (0.75: 256 slices)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    configure_libraries()
    with tempfile.TemporaryDirectory(prefix="pacsai-route-") as temp:
        tmp = Path(temp)
        started = time.perf_counter()
        phantom = write_phantom("ct", tmp / "phantom", spacing=args.spacing)
        print(f"phantom CT: {len(phantom.paths)} slices in {time.perf_counter() - started:.0f} s")
        rule = {
            "name": "ct",
            "when": {"Modality": "CT"},
            "series": {"min_instances": 100_000},  # fires, picks nothing: no model needed
            "model": "none",
        }
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        settings = Settings(
            node={
                "host": "127.0.0.1",
                "port": port,
                "study_quiet_seconds": 1.0,
                "receiver_processes": 1,
                "state_dir": str(tmp / "state"),
            },
            storage={
                "spool_dir": str(tmp / "spool"),
                "results_dir": str(tmp / "results"),
                "min_free_mb": 0,
            },
            database={"url": f"sqlite:///{tmp / 'pacsai.db'}"},
            queue={"local_workers": 0},  # the jobs run here, one by one
            inference={"models_dir": str(tmp / "models"), "device": "cpu"},
            api={"enabled": False},
            routes=[rule],
        )
        node = Node(settings)
        node.start()
        try:
            target = Target(node.settings.node.ae_title, "127.0.0.1", node.receiver.port)
            summary = push(list(phantom.paths), target)
            assert summary.succeeded == len(phantom.paths), summary
            with node.database.reading() as session:
                study_id = session.scalar(
                    select(Study.id).where(Study.study_instance_uid == phantom.study_instance_uid)
                )
            assert study_id is not None
            registry = ModelRegistry(tmp / "models", device="cpu")
            runner = JobRunner(node.settings, node.database, registry, owner="bench")
            figures: dict[str, tuple[list[float], list[float]]] = {}
            if hasattr(Instance, "frames"):
                figures["rows"] = route_seconds(node, runner, study_id, args.repeat)
                with node.database.transaction() as session:
                    session.execute(update(Instance).values(frames=None))
            figures["files"] = route_seconds(node, runner, study_id, args.repeat)
        finally:
            node.stop()
    print(f"{len(phantom.paths)}-slice CT, median of {args.repeat} jobs:")
    print('             stage "route"   job_context query')
    for name, (seconds, queries) in figures.items():
        route, query = statistics.median(seconds), statistics.median(queries)
        print(f"  from {name:5}  {route * 1000:9.1f} ms  {query * 1000:9.1f} ms")
    if "rows" in figures:
        ratio = statistics.median(figures["files"][0]) / statistics.median(figures["rows"][0])
        print(f'  stage "route" from rows: {ratio:.0f}x faster than from files')


if __name__ == "__main__":
    main()
