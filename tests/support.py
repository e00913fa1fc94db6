"""Test helpers: free ports, polling with a deadline, peers, dataset factories, `pacsai serve`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from pacsai.config import Settings

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get(
    "PACSAI_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def shared_dicom_dir() -> Path | None:
    """The real DICOM files: $PACSAI_TEST_DATA, or ../shared/dicom beside the checkout."""
    candidates = [os.environ.get("PACSAI_TEST_DATA"), REPO.parent / "shared" / "dicom"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "MANIFEST.tsv").is_file():
            return Path(candidate)
    return None


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install dcmtk / dicom3tools)")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(predicate: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def postgres_reachable() -> bool:
    try:
        engine = create_engine(POSTGRES_ADMIN_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except OperationalError:
        return False


def make_settings(tmp_path: Path, database_url: str | None = None, **sections: Any) -> Settings:
    """Settings for a node on a free port with its spool and database under `tmp_path`."""
    data: dict[str, Any] = {
        "node": {
            "port": free_port(),
            "host": "127.0.0.1",
            "study_quiet_seconds": 1.0,
            "shutdown_grace_seconds": 5,
        },
        "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_mb": 0},
        "database": {"url": database_url or f"sqlite:///{tmp_path / 'pacsai.db'}"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return Settings(**data)


class ServeProcess:
    """`pacsai serve` as a real process, configured by a YAML file."""

    def __init__(self, config: Path, settings: Settings, workdir: Path) -> None:
        self.config = config
        self.settings = settings
        self.workdir = workdir
        self.log = workdir / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.settings.node.port

    def start(self) -> ServeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacsai.cli", "serve", "--config", str(self.config)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_for(self._listening, timeout=30)
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"pacsai serve exited:\n{self.log.read_text()}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def make_ct_slice(
    *,
    study_uid: str,
    series_uid: str,
    index: int,
    rows: int = 64,
    columns: int = 64,
    patient_id: str = "PACSAI-TEST-001",
    patient_name: str = "Test^Patient",
    seed: int = 0,
) -> Dataset:
    """A small, valid CT Image Storage instance with random 16-bit pixels."""
    rng = np.random.default_rng(seed * 100_003 + index)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid])
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.StudyDate = "20260101"
    ds.AccessionNumber = "ACC0001"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index) * 2.5]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 2.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = rng.integers(-1024, 2000, size=(rows, columns), dtype=np.int16).tobytes()
    return ds


def make_ct_series(count: int, *, study_uid: str | None = None, **kwargs: Any) -> list[Dataset]:
    """`count` slices of one new series (in a new study unless `study_uid` is given)."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    return [
        make_ct_slice(study_uid=study_uid, series_uid=series_uid, index=i, **kwargs)
        for i in range(count)
    ]


def write_datasets(datasets: list[Dataset], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
