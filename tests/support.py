"""Test helpers: free ports, polling with a deadline, peers, dataset factories, `pacsai serve`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import create_engine, select, update
from sqlalchemy.exc import OperationalError

from pacsai.config import Settings
from pacsai.db import Database, Delivery, utcnow
from pacsai.db.workers import heartbeat_worker, register_worker

REPO = Path(__file__).resolve().parents[1]
Row = TypeVar("Row")
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


def report_worker(database: Database, models: dict[str, str], *, worker_id: str = "") -> str:
    """A worker of another host, registered (unless ``worker_id`` names one) and heartbeating
    now with ``models`` (name -> "warm", "loading" or why not), as a real worker reports itself
    to ``/readyz``; its id."""
    with database.transaction() as session:
        if not worker_id:
            worker_id = register_worker(
                session=session,
                node_id="elsewhere",
                name="worker",
                host="elsewhere",
                pid=os.getpid(),
                backend="local",
                device="cpu",
                queues=["*"],
                concurrency=1,
                version="test",
                now=utcnow(),
                is_alive=lambda pid: True,
            ).worker_id
        heartbeat_worker(
            session=session, worker_id=worker_id, pid=os.getpid(), now=utcnow(), models=models
        )
    return worker_id


def run_pacsai(config: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``pacsai ARGS --config CONFIG`` as a user runs it: a process of its own, without the
    test run's ``PACSAI_`` environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    return subprocess.run(
        [sys.executable, "-m", "pacsai.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        check=False,
    )


def db_rows(database: Database, model: type[Row], *where: Any) -> list[Row]:
    """The rows of `model` matching `where`, in id order, detached from their session."""
    with database.reading() as session:
        rows = list(session.scalars(select(model).where(*where).order_by(model.id)))  # type: ignore[attr-defined]
        for row in rows:
            session.expunge(row)
    return rows


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
            "receiver_processes": 1,  # tests that want more ask (spawning costs seconds)
            "state_dir": str(tmp_path / "state"),  # the node identity, not in the cwd
        },
        "storage": {
            "spool_dir": str(tmp_path / "spool"),
            "results_dir": str(tmp_path / "results"),
            "min_free_mb": 0,
        },
        "database": {"url": database_url or f"sqlite:///{tmp_path / 'pacsai.db'}"},
        # No job workers and no models unless a test asks: receive tests see QUEUED jobs.
        "queue": {"local_workers": 0},
        "inference": {"models_dir": str(tmp_path / "models"), "device": "cpu"},
        # No HTTP API unless a test asks (api={"enabled": True, "port": 0}): 8080 may be taken.
        "api": {"enabled": False},
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


def _instance(
    sop_class_uid: str,
    modality: str,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PACSAI-TEST-001",
    patient_name: str = "Test^Patient",
) -> Dataset:
    """A new instance with its file meta, UIDs, modality and patient; no pixels yet."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    return ds


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
    ds = _instance(
        CTImageStorage,
        "CT",
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=patient_id,
        patient_name=patient_name,
    )
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid])
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


def make_dx_image(
    *,
    rows: int = 24,
    columns: int = 32,
    photometric: str = "MONOCHROME1",
    bits_stored: int = 12,
    pixel_spacing: tuple[float, float] | None = (0.15, 0.2),
    seed: int = 0,
) -> Dataset:
    """A small Digital X-Ray (for presentation) instance, unsigned pixels, no Image Plane Module."""
    from pydicom.uid import DigitalXRayImageStorageForPresentation

    rng = np.random.default_rng(seed)
    ds = _instance(DigitalXRayImageStorageForPresentation, "DX")
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PresentationIntentType = "FOR PRESENTATION"
    if pixel_spacing is not None:
        ds.ImagerPixelSpacing = list(pixel_spacing)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    pixels = rng.integers(0, 2**bits_stored, size=(rows, columns), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def make_enhanced_ct(
    frames: int = 4,
    *,
    rows: int = 16,
    columns: int = 16,
    step: float = 2.0,
    seed: int = 0,
) -> Dataset:
    """A small Enhanced CT Image instance: one stack along +z, geometry in functional groups.

    Frame ``f`` (0-based) lies at z = ``f * step``; orientation, pixel spacing (0.5 x 0.6 mm) and
    rescale (slope 1, intercept -1024) are shared. Tests edit the groups to make other cases.
    """
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage

    rng = np.random.default_rng(seed)
    ds = _instance(EnhancedCTImageStorage, "CT")
    ds.FrameOfReferenceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0

    orientation = Dataset()
    orientation.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.6]
    measures.SliceThickness = step
    transformation = Dataset()
    transformation.RescaleSlope = 1
    transformation.RescaleIntercept = -1024
    transformation.RescaleType = "HU"
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transformation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    per_frame = []
    for index in range(frames):
        position = Dataset()
        position.ImagePositionPatient = [-4.0, -4.8, index * step]
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = index + 1
        content.DimensionIndexValues = [1, index + 1]
        item = Dataset()
        item.PlanePositionSequence = Sequence([position])
        item.FrameContentSequence = Sequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    pixels = rng.integers(0, 3000, size=(frames, rows, columns), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def start_storescp(
    out: Path, port: int, *, ae_title: str = "DCMTK", options: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """DCMTK storescp (a real, independent storage SCP) writing to ``out`` on ``port``.

    By default it accepts the SOP Classes DCMTK knows in uncompressed transfer syntaxes;
    ``options`` such as ``-pm`` (any SOP Class) or ``+xa`` (every transfer syntax it supports)
    change that.
    """
    binary = require_tool("storescp")
    out.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, *options, "-aet", ae_title, "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening)
    return process


class SeededStudy:
    """What :func:`seed_study` put in the database."""

    def __init__(self, study_instance_uid: str, patient_id: str, accession: str) -> None:
        self.study_instance_uid = study_instance_uid
        self.patient_id = patient_id
        self.accession = accession
        self.job_id: int | None = None
        self.result_ids: list[int] = []
        self.seg_series_uid: str | None = None
        self.sr_series_uid: str | None = None


def seed_study(
    database: Any,
    *,
    modality: str = "CT",
    patient_id: str = "PAT-001",
    accession: str = "ACC001",
    received_at: Any = None,
    instances: int = 2,
    job: Any = None,
    timings: dict[str, float] | None = None,
    summaries: list[tuple[str, str, dict[str, Any]]] | None = None,
    outputs: tuple[str, ...] = ("SEG", "SR"),
    delivery: Any = None,
) -> SeededStudy:
    """A received study (through the repository functions), optionally with a finished job.

    ``job`` is a :class:`pacsai.db.JobStatus` (``None``: the study is still receiving);
    ``summaries`` holds (route, model, result summary) per result of a SUCCEEDED job, each
    with the SEG/SR objects of ``outputs`` and, if ``delivery`` is a status, one delivery.
    """
    from datetime import timedelta

    from pacsai.db import Job, JobStatus, ResultKind, Study, StudyStatus, utcnow
    from pacsai.db.deliveries import add_objects, queue_deliveries
    from pacsai.db.jobs import add_result
    from pacsai.db.repository import ReceivedInstance, record_instance

    received = received_at or utcnow()
    study_uid, series_uid = generate_uid(), generate_uid()
    seeded = SeededStudy(study_uid, patient_id, accession)
    with database.transaction() as session:
        for index in range(instances):
            record_instance(
                session=session,
                item=ReceivedInstance(
                    sop_class_uid=CTImageStorage,
                    sop_instance_uid=generate_uid(),
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    path=f"{study_uid}/{index}.dcm",
                    size_bytes=1000,
                    sha256=f"{index:064d}",
                    modality=modality,
                    patient_id=patient_id,
                    patient_name="Seeded^Patient",
                    accession_number=accession,
                ),
                association_id=None,
                calling_ae_title="SEEDER",
                remote_address="127.0.0.1",
                quiet_seconds=10.0,
                now=received,
            )
        if job is None:
            return seeded
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        study.status = StudyStatus.COMPLETE
        study.completed_at = received + timedelta(seconds=10)
        finished = job not in (JobStatus.QUEUED, JobStatus.RUNNING)
        row = Job(
            study_id=study.id,
            status=job,
            instance_count=instances,
            attempts=1 if job != JobStatus.QUEUED else 0,
            created_at=received + timedelta(seconds=10),
            started_at=received + timedelta(seconds=11) if job != JobStatus.QUEUED else None,
            finished_at=received + timedelta(seconds=20) if finished else None,
            timings=json.dumps(timings) if timings is not None else None,
            reason="seeded failure" if job == JobStatus.FAILED else None,
        )
        session.add(row)
        session.flush()
        seeded.job_id = row.id
        seeded.seg_series_uid, seeded.sr_series_uid = generate_uid(), generate_uid()
        for index, (route, model, summary) in enumerate(summaries or []):
            result = add_result(
                session=session,
                job_id=row.id,
                route_name=route,
                series_instance_uid=series_uid,
                kind=(
                    ResultKind.CLASSIFICATION
                    if "probabilities" in summary
                    else ResultKind.SEGMENTATION
                ),
                model_name=model,
                model_version="0.1.0",
                weights_sha256="0" * 64,
                output_path=f"job-{row.id}/{index}.npz",
                summary=summary,
                now=received + timedelta(seconds=19),
            )
            seeded.result_ids.append(result.id)
            series = {"SEG": seeded.seg_series_uid, "SR": seeded.sr_series_uid}
            add_objects(
                session=session,
                result_id=result.id,
                objects=[
                    (kind, "1.2.840.10008.5.1.4.1.1.66.4", generate_uid(), series[kind], "x.dcm")
                    for kind in outputs
                ],
                now=received + timedelta(seconds=19),
            )
            if delivery is not None:
                for delivery_id in queue_deliveries(
                    session=session,
                    result_id=result.id,
                    targets=[("pacs", list(outputs))],
                    now=received + timedelta(seconds=19),
                ):
                    session.execute(
                        update(Delivery).where(Delivery.id == delivery_id).values(status=delivery)
                    )
    return seeded


class PacsaiProcess:
    """Any `pacsai` command as a real process (``serve --role ...``, ``worker ...``), with its
    own configuration file and log, started and judged ready by ``ready(log text)``."""

    def __init__(
        self,
        name: str,
        args: list[str],
        settings: Settings,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.args = args
        self.settings = settings
        self.workdir = workdir
        self.config = workdir / f"{name}.yaml"
        self.log = workdir / f"{name}.log"
        self.extra_env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: Callable[[str], bool], timeout: float = 120) -> PacsaiProcess:
        import yaml

        self.config.write_text(
            yaml.safe_dump(self.settings.model_dump(mode="json", exclude_none=True))
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
        env.update(self.extra_env)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacsai.cli", *self.args, "--config", str(self.config)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

        def started() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.log.read_text()[-5000:]}")
            return ready(self.log.read_text(errors="replace"))

        wait_for(started, timeout=timeout, interval=0.2)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=30)
