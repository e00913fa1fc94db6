"""Receive throughput: pacsai against DCMTK storescp, measured in the same run.

Generates N synthetic 512x512 16-bit CT slices, pushes them with DCMTK ``storescu`` over 1 and
over 4 concurrent associations to (a) ``pacsai serve`` and (b) ``storescp`` (started with
``TCP_NODELAY=1``; without it storescp stalls about 45 ms per object), and prints images/s for
each and the ratio pacsai/storescp. Targets: >= 0.5x with one association, >= 1.0x with four.

    python bench/receive.py [--count 500] [--processes N] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout} s")


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


def push(port: int, paths: list[Path], associations: int) -> float:
    """Seconds for `associations` concurrent storescu processes to send all `paths`."""
    chunks = [paths[i::associations] for i in range(associations)]
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", "PACSAI", "127.0.0.1", str(port), *map(str, chunk)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for sender in senders:
        _, err = sender.communicate()
        if sender.returncode != 0:
            raise SystemExit(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def start_pacsai(workdir: Path, processes: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = {
        "node": {
            "port": port,
            "host": "127.0.0.1",
            "receiver_processes": processes,
            "study_quiet_seconds": 3600,
        },
        "storage": {"spool_dir": str(workdir / "spool"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{workdir / 'pacsai.db'}"},
        "logging": {"level": "WARNING"},
    }
    (workdir / "pacsai.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "pacsai.cli", "serve", "--config", str(workdir / "pacsai.yaml")],
        cwd=workdir,
        env=env,
        stderr=(workdir / "serve.log").open("wb"),
    )
    wait_listening(port, process)
    return process, port


def start_storescp(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    out = workdir / "storescp"
    out.mkdir()
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


def measure(name: str, starter, paths: list[Path], associations: int, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """Best images/s over `repeat` runs, each into a fresh server and spool."""
    best = 0.0
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            process, port = starter(Path(tmp))
            try:
                seconds = push(port, paths, associations)
            finally:
                stop(process)
            best = max(best, len(paths) / seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="pacsai node.receiver_processes (default: one per core)",
    )
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        raise SystemExit("needs DCMTK: apt-get install dcmtk")

    with tempfile.TemporaryDirectory(prefix="bench-data-") as data:
        paths = generate(args.count, Path(data))
        size = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(
            f"{args.count} CT slices of {size:.0f} KiB, {os.cpu_count()} cores, "
            f"pacsai receiver_processes={args.processes}, best of {args.repeat}"
        )
        print(f"{'associations':>12} {'pacsai img/s':>13} {'storescp img/s':>15} {'ratio':>7}")
        for associations in (1, 4):
            ours = measure(
                "pacsai",
                lambda d: start_pacsai(d, args.processes),
                paths,
                associations,
                args.repeat,
            )
            theirs = measure("storescp", start_storescp, paths, associations, args.repeat)
            print(f"{associations:>12} {ours:>13.1f} {theirs:>15.1f} {ours / theirs:>6.2f}x")


if __name__ == "__main__":
    main()
