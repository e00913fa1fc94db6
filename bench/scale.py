"""Scale-out throughput: jobs with 1 and 2 workers, receiving with 1 and 2 receiver processes.

Jobs: N phantom studies are received and QUEUED first (a receiver with no worker), then K
`pacsai worker` processes start (local backend: they poll the database) and run them; the
throughput is N over the time from the first job's start to the last one's end, for K = 1 and 2.
Each worker gets one core (``OMP_NUM_THREADS=1``), the CPU stand-in for one GPU per worker.

Receive: M phantom studies are pushed by S concurrent `pacsai push` processes, spread over K
`pacsai serve --role receiver` processes sharing one database, for K = 1 and 2.

PostgreSQL is used when it answers (``--database`` or 127.0.0.1:5432), otherwise SQLite.

    python bench/scale.py [--studies 6] [--modality ct] [--receive-studies 8] [--senders 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, func, select
from sqlalchemy.exc import OperationalError

from _common import free_port, fresh_database
from pacsai.db import Database, Job, JobStatus, upgrade
from pacsai.phantom import write_phantom

REPO = Path(__file__).resolve().parents[1]
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres(url: str | None) -> str | None:
    candidate = url or POSTGRES
    try:
        engine = create_engine(candidate)
        with engine.connect():
            pass
        engine.dispose()
        return candidate
    except OperationalError:
        if url:
            raise
        return None


class Processes:
    """`pacsai` commands started with one configuration; all stopped on exit."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder = folder
        self.config = folder / "pacsai.yaml"
        self.config.write_text(yaml.safe_dump(settings))
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, env: dict[str, str] | None = None, ready: str) -> None:
        log = self.folder / f"{'-'.join(args)}-{len(self.started)}.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
        environment.update(env or {})
        with log.open("wb") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "pacsai.cli", *args, "--config", str(self.config)],
                cwd=self.folder,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=environment,
            )
        self.started.append(process)
        deadline = time.monotonic() + 180
        while ready not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"pacsai {' '.join(args)} did not start:\n{log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        for process in self.started:
            process.terminate()
        for process in self.started:
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()


def settings_for(folder: Path, url: str, port: int) -> dict[str, Any]:
    return {
        "node": {"port": port, "host": "127.0.0.1", "study_quiet_seconds": 1.0, "id": "bench"},
        "storage": {
            "spool_dir": str(folder / "spool"),
            "results_dir": str(folder / "results"),
            "min_free_mb": 0,
        },
        "database": {"url": url, "auto_upgrade": False},
        "queue": {"backend": "local", "local_workers": 0, "poll_seconds": 0.2},
        "inference": {"models_dir": str(REPO / "models"), "device": "cpu"},
        "api": {"enabled": False},
        "logging": {"level": "INFO"},
    }


def push(paths: list[Path], port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pacsai.cli",
            "push",
            *map(str, paths),
            "--to",
            f"PACSAI@127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def jobs_throughput(
    admin: str | None, studies: list[list[Path]], workers: int
) -> tuple[float, float]:
    """(studies per minute run by ``workers`` worker processes, mean seconds per job)."""
    with tempfile.TemporaryDirectory(prefix="pacsai-scale-") as tmp:
        folder = Path(tmp)
        with fresh_database(admin, folder) as url:
            database = Database(url)
            upgrade(database)
            port = free_port()
            processes = Processes(folder, settings_for(folder, url, port))
            try:
                processes.start("serve", "--role", "receiver", ready="listening as AE")
                for paths in studies:
                    if push(paths, port).wait() != 0:
                        raise SystemExit("a push failed")
                deadline = time.monotonic() + 120
                while _count(database) < len(studies):
                    if time.monotonic() > deadline:
                        raise SystemExit("the studies were not all queued")
                    time.sleep(0.2)
                for index in range(workers):
                    processes.start(
                        "worker",
                        "--name",
                        f"w{index}",
                        "--queues",
                        "default",
                        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                        ready="worker ",
                    )
                while _count(database, finished=True) < len(studies):
                    time.sleep(0.5)
                with database.reading() as session:
                    first, last = session.execute(
                        select(func.min(Job.started_at), func.max(Job.finished_at))
                    ).one()
                    spans = session.execute(select(Job.started_at, Job.finished_at)).all()
                    failed = session.scalar(
                        select(func.count(Job.id)).where(Job.status != JobStatus.SUCCEEDED)
                    )
                if failed:
                    raise SystemExit(f"{failed} jobs did not succeed")
            finally:
                processes.stop()
                database.dispose()
    mean = sum((end - start).total_seconds() for start, end in spans) / len(spans)
    return len(studies) / (last - first).total_seconds() * 60, mean


def _count(database: Database, *, finished: bool = False) -> int:
    with database.reading() as session:
        query = select(func.count(Job.id))
        if finished:
            query = query.where(Job.status.in_(JobStatus.finished()))
        return int(session.scalar(query) or 0)


def receive_throughput(
    admin: str | None, studies: list[list[Path]], receivers: int, senders: int
) -> tuple[float, float]:
    """(studies per minute, instances per second) received by ``receivers`` processes."""
    with tempfile.TemporaryDirectory(prefix="pacsai-scale-") as tmp:
        folder = Path(tmp)
        with fresh_database(admin, folder) as url:
            database = Database(url)
            upgrade(database)
            database.dispose()
            ports = [free_port() for _ in range(receivers)]
            groups = []
            try:
                for index, port in enumerate(ports):
                    sub = folder / f"r{index}"
                    sub.mkdir()
                    settings = settings_for(folder, url, port)
                    settings["node"]["id"] = f"bench-r{index}"
                    processes = Processes(sub, settings)
                    processes.start("serve", "--role", "receiver", ready="listening as AE")
                    groups.append(processes)
                pending = list(enumerate(studies))
                running: list[subprocess.Popen[bytes]] = []
                start = time.perf_counter()
                while pending or running:
                    while pending and len(running) < senders:
                        index, paths = pending.pop(0)
                        running.append(push(paths, ports[index % receivers]))
                    for process in list(running):
                        if process.poll() is not None:
                            if process.returncode != 0:
                                raise SystemExit("a push failed")
                            running.remove(process)
                    time.sleep(0.01)
                seconds = time.perf_counter() - start
            finally:
                for processes in groups:
                    processes.stop()
    instances = sum(len(paths) for paths in studies)
    return len(studies) / seconds * 60, instances / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=6, help="studies for the job runs")
    parser.add_argument("--modality", choices=["ct", "mr", "cr"], default="ct")
    parser.add_argument("--receive-studies", type=int, default=8)
    parser.add_argument("--senders", type=int, default=4, help="concurrent `pacsai push`")
    parser.add_argument("--database", default=None, help="PostgreSQL admin URL")
    parser.add_argument("--skip-jobs", action="store_true")
    parser.add_argument("--skip-receive", action="store_true")
    args = parser.parse_args()
    admin = postgres(args.database)
    print(f"database: {'PostgreSQL' if admin else 'SQLite'}; {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory(prefix="pacsai-phantoms-") as tmp:
        folder = Path(tmp)
        if not args.skip_jobs:
            studies = [
                list(write_phantom(args.modality, folder / f"j{i}", seed=900 + i).paths)
                for i in range(args.studies)
            ]
            one, one_job = jobs_throughput(admin, studies, 1)
            two, two_job = jobs_throughput(admin, studies, 2)
            kind = args.modality.upper()
            print(f"jobs ({args.studies} {kind} phantom studies, one core per worker)")
            print(f"  1 worker:  {one:7.1f} studies/min   {one_job:5.2f} s per job")
            print(f"  2 workers: {two:7.1f} studies/min   {two_job:5.2f} s per job", end="")
            print(f"   scaling {two / one:.2f}x")
        if not args.skip_receive:
            studies = [
                list(write_phantom("ct", folder / f"r{i}", seed=950 + i).paths)
                for i in range(args.receive_studies)
            ]
            count = sum(len(s) for s in studies)
            r1, i1 = receive_throughput(admin, studies, 1, args.senders)
            r2, i2 = receive_throughput(admin, studies, 2, args.senders)
            print(
                f"receive ({args.receive_studies} CT phantom studies, {count} instances, "
                f"{args.senders} concurrent senders)"
            )
            print(f"  1 receiver:  {r1:7.1f} studies/min  {i1:7.1f} instances/s")
            ratio = r2 / r1
            line = f"  2 receivers: {r2:7.1f} studies/min  {i2:7.1f} instances/s"
            print(f"{line}   scaling {ratio:.2f}x")
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
