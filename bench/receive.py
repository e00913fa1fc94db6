"""Receive and send throughput: pacsai against DCMTK, measured in the same run.

Generates N synthetic 512x512 16-bit CT slices (about 513 KiB each) and measures:

* **receive**: DCMTK ``storescu`` over 1 and over 4 concurrent associations to (a) ``pacsai
  serve`` and (b) ``storescp`` (started with ``TCP_NODELAY=1``; without it storescp stalls about
  45 ms per object), each into a fresh server and spool. After each pacsai run every instance
  must have its row and its file (checked, and printed as "durable"). Targets: >= 0.5x
  storescp with one association, >= 1.0x with four.
* **send**: ``pacsai push`` (the command, interpreter start included; and the same ``push()``
  called in this process, without it) against ``storescu`` as it is run (Nagle's algorithm on)
  and with ``TCP_NODELAY=1``, all to one ``storescp``. Target: >= 0.5x.

    python bench/receive.py [--count 500] [--repeat 2] [--processes auto|N] [--database-url URL]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import create_engine, text

from _common import free_port
from pacsai.config import load_settings

Starter = Callable[[Path], tuple[subprocess.Popen[bytes], int]]


def listeners(port: int) -> int:
    """Sockets listening on `port` (Linux): one per receiver process that has bound it."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


def wait_listening(
    port: int, process: subprocess.Popen[bytes], processes: int = 1, timeout: float = 60
) -> None:
    """Until `processes` sockets listen on `port` (every receiver process is up: before, the
    first takes every connection), without connecting (a probe would count as one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        if listeners(port) >= processes:
            return
        time.sleep(0.05)
    raise SystemExit(f"fewer than {processes} processes listen on {port} after {timeout} s")


def generate(count: int, folder: Path) -> list[Path]:
    """`count` 512x512 signed 16-bit CT slices of one series, about 512 KiB each."""
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "BENCH", "Bench^Receive"
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [0, 0, index * 1.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = rng.integers(-1024, 3000, (512, 512), dtype=np.int16).tobytes()
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, paths: list[Path], associations: int, *, no_delay: bool) -> float:
    """Seconds for `associations` concurrent storescu processes to send all `paths`."""
    chunks = [paths[i::associations] for i in range(associations)]
    env = {**os.environ, "TCP_NODELAY": "1"} if no_delay else dict(os.environ)
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", "PACSAI", "127.0.0.1", str(port), *map(str, chunk)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        for chunk in chunks
    ]
    for sender in senders:
        _, err = sender.communicate()
        if sender.returncode != 0:
            raise SystemExit(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def pacsai_push(port: int, folder: Path) -> float:
    """Seconds for `pacsai push FOLDER` (the command, interpreter start included)."""
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacsai.cli",
            "push",
            str(folder),
            "--to",
            f"PACSAI@127.0.0.1:{port}",
        ],
        capture_output=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"pacsai push failed: {result.stderr.decode()[-500:]}")
    return elapsed


def run_database(workdir: Path, admin_url: str | None) -> str:
    """SQLite in the run directory, or a new PostgreSQL database on `admin_url`'s server."""
    if admin_url is None:
        return f"sqlite:///{workdir / 'pacsai.db'}"
    name = f"bench_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{admin_url.rsplit('/', 1)[0]}/{name}"


def drop_database(url: str, admin_url: str | None) -> None:
    if admin_url is None:
        return
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    engine.dispose()


def start_pacsai(
    workdir: Path, processes: str, admin_url: str | None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    database_url = run_database(workdir, admin_url)
    (workdir / "database_url").write_text(database_url)
    config = {
        "node": {
            "port": port,
            "host": "127.0.0.1",
            "receiver_processes": processes if processes == "auto" else int(processes),
            "study_quiet_seconds": 3600,
        },
        "storage": {"spool_dir": str(workdir / "spool"), "min_free_mb": 0},
        "database": {"url": database_url},
        "queue": {"local_workers": 0},
        "api": {"enabled": False},
        "logging": {"level": "WARNING"},
    }
    (workdir / "pacsai.yaml").write_text(yaml.safe_dump(config))
    expected = load_settings(workdir / "pacsai.yaml").receiver_process_count()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "pacsai.cli", "serve", "--config", str(workdir / "pacsai.yaml")],
        cwd=workdir,
        env=env,
        stderr=(workdir / "serve.log").open("wb"),
    )
    wait_listening(port, process, expected)
    return process, port


def start_storescp(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    out = workdir / "storescp"
    out.mkdir(exist_ok=True)
    process = subprocess.Popen(
        ["storescp", "-aet", "PACSAI", "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(port, process)
    return process, port


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def durable(workdir: Path, admin_url: str | None, expected: int) -> str:
    """Whether every pushed instance has its row and its file (after the server stopped)."""
    url = (workdir / "database_url").read_text()
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            paths = [row[0] for row in connection.execute(text("SELECT path FROM instances"))]
    finally:
        engine.dispose()
        drop_database(url, admin_url)
    missing = [p for p in paths if not (workdir / "spool" / p).is_file()]
    if len(paths) != expected or missing:
        return f"NO ({len(paths)} rows of {expected}, {len(missing)} files missing)"
    return "yes"


def measure(
    starter: Starter,
    paths: list[Path],
    associations: int,
    repeat: int,
    check: Callable[[Path], str] | None = None,
) -> tuple[float, str]:
    """Best images/s over `repeat` runs, each into a fresh server and spool."""
    best, verdict = 0.0, "-"
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="bench-receive-") as tmp:
            process, port = starter(Path(tmp))
            try:
                seconds = storescu(port, paths, associations, no_delay=False)
            finally:
                stop(process)
            if check is not None:
                verdict = check(Path(tmp))
                if verdict != "yes":
                    return len(paths) / seconds, verdict
            best = max(best, len(paths) / seconds)
    return best, verdict


def push_in_process(port: int, folder: Path) -> float:
    """Seconds for pacsai's ``push()`` called here (no interpreter start, imports done)."""
    from pacsai.scu import Target, push

    start = time.perf_counter()
    summary = push([folder], Target("PACSAI", "127.0.0.1", port))
    elapsed = time.perf_counter() - start
    if summary.failed:
        raise SystemExit(f"push() failed: {summary.failures[:3]}")
    return elapsed


def measure_push(folder: Path, paths: list[Path], repeat: int) -> dict[str, float]:
    """Best images/s of each sender, to one storescp."""
    senders: dict[str, Callable[[int], float]] = {
        "storescu": lambda port: storescu(port, paths, 1, no_delay=False),
        "storescu TCP_NODELAY=1": lambda port: storescu(port, paths, 1, no_delay=True),
        "pacsai push": lambda port: pacsai_push(port, folder),
        "pacsai push() in-process": lambda port: push_in_process(port, folder),
    }
    with tempfile.TemporaryDirectory(prefix="bench-push-") as tmp:
        process, port = start_storescp(Path(tmp))
        try:
            return {
                name: max(len(paths) / send(port) for _ in range(repeat))
                for name, send in senders.items()
            }
        finally:
            stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--processes", default="auto", help="pacsai node.receiver_processes (default: auto)"
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="a PostgreSQL server URL with a database to connect to "
        "(postgresql+psycopg://postgres@127.0.0.1:5432/test): each run gets a new database; "
        "default: SQLite in the run directory",
    )
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        raise SystemExit("needs DCMTK: apt-get install dcmtk")

    with tempfile.TemporaryDirectory(prefix="bench-data-") as data:
        folder = Path(data)
        paths = generate(args.count, folder)
        size = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        database = "PostgreSQL" if args.database_url else "SQLite"
        print(
            f"{args.count} CT slices of {size:.0f} KiB, {os.cpu_count()} cores, "
            f"receiver_processes={args.processes}, {database}, best of {args.repeat}"
        )
        print(f"{'receive':>12} {'pacsai img/s':>13} {'storescp img/s':>15} {'ratio':>7} durable")
        for associations in (1, 4):
            ours, verdict = measure(
                lambda d: start_pacsai(d, args.processes, args.database_url),
                paths,
                associations,
                args.repeat,
                check=lambda d: durable(d, args.database_url, len(paths)),
            )
            theirs, _ = measure(start_storescp, paths, associations, args.repeat)
            label = f"{associations} assoc."
            print(f"{label:>12} {ours:>13.1f} {theirs:>15.1f} {ours / theirs:>6.2f}x {verdict}")
        rates = measure_push(folder, paths, args.repeat)
        print(f"{'send (1 assoc.)':>26} {'img/s':>8}  ratio to storescu / with TCP_NODELAY")
        for name, rate in rates.items():
            plain = rate / rates["storescu"]
            fast = rate / rates["storescu TCP_NODELAY=1"]
            print(f"{name:>26} {rate:>8.1f}  {plain:>5.2f}x / {fast:.2f}x")


if __name__ == "__main__":
    main()
