"""The pixel bomb (issue 9): ten 4096 x 4096 JPEG 2000 slices of zeros, 141 bytes each on the
wire, that would decode to 168 million voxels (671 MB as float32, before the model's transforms).

Pushed over DICOM to a node whose site limit (``inference.max_voxels``) is below that, the job
ends with the reason and the worker process never allocates the volume (its peak resident memory
is read from the kernel), while the receiver goes on storing other studies and answering C-ECHO.
Without a limit the same job took the worker's peak memory up by 9.8 GB here (the demo bundle's
inverted postprocessing at 4096 x 4096); what keeps reception alive then is the process boundary:
the worker offers itself first to the out-of-memory killer (checked here), and ``test_leases.py``
kills a worker in the middle of a job, as that killer would.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import JPEG2000Lossless, generate_uid

from pacsai.db import Job, JobStatus, Worker
from pacsai.jobs.supervisor import OOM_SCORE_ADJ
from pacsai.phantom import write_phantom
from pacsai.scu import Target, echo, push
from pacsai.service import Node
from tests.support import REPO, db_rows, wait_for

pytestmark = pytest.mark.slow

SIZE, SLICES = 4096, 10
VOLUME_BYTES = SIZE * SIZE * SLICES * 4  # the float32 volume a decode would allocate
GROWTH_LIMIT = 256 * 2**20  # far below that: the pixels were never decoded


def _bomb(template: Path, folder: Path) -> list[Path]:
    """Ten slices of one series, each a valid CT image of zeros at its own position."""
    encoder = get_encoder(JPEG2000Lossless)
    zeros = np.zeros((SIZE, SIZE), dtype=np.int16)
    frame = encoder.encode(
        zeros,
        rows=SIZE,
        columns=SIZE,
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=16,
        pixel_representation=1,
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
    )
    ds = dcmread(template)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = SIZE
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 1
    ds.PixelSpacing = [0.1, 0.1]
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    folder.mkdir()
    paths = []
    for k in range(SLICES):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.SliceLocation = float(k)
        paths.append(folder / f"{k:02d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _memory_kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1))


def _reset_peak(pid: int) -> int:
    """Start measuring the peak resident memory of ``pid`` from now; its current RSS (KiB)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:  # not ours to reset: measure from the peak so far
        return _memory_kib(pid, "VmHWM")
    return _memory_kib(pid, "VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_pixel_bomb_is_refused_before_decoding_and_reception_goes_on(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    clean = write_phantom("ct", tmp_path / "clean", seed=11, spacing=12.0)
    bomb = _bomb(clean.paths[0], tmp_path / "bomb")
    assert sum(p.stat().st_size for p in bomb) < 20_000  # about 1 KiB a slice on the wire
    node = start_node(
        queue={"local_workers": 1, "poll_seconds": 0.2},
        inference={
            "models_dir": str(REPO / "models"),
            "device": "cpu",
            "max_voxels": 100_000_000,  # a site's limit, below the bomb's 167,772,160
        },
        routes=[{"name": "ct", "when": {"Modality": "CT"}, "model": "ct_abdomen_demo"}],
    )
    target = Target(node.settings.node.ae_title, "127.0.0.1", node.receiver.port)

    def warm_worker() -> Worker | None:
        live = [w for w in db_rows(node.database, Worker) if w.stopped_at is None]
        return live[0] if live and "warm" in json.loads(live[0].models).values() else None

    worker = wait_for(warm_worker, timeout=120)
    assert worker.pid != os.getpid()  # jobs run in the supervised worker child process
    # ... which the out-of-memory killer takes before the receiver
    adj = int(Path(f"/proc/{worker.pid}/oom_score_adj").read_text())
    assert adj == OOM_SCORE_ADJ > int(Path("/proc/self/oom_score_adj").read_text())
    baseline_kib = _reset_peak(worker.pid)

    assert push(bomb, target).failed == 0
    assert echo(target) == 0

    def finished(count: int) -> list[Job] | None:
        jobs = db_rows(node.database, Job)
        done = [j for j in jobs if j.status not in (JobStatus.QUEUED, JobStatus.RUNNING)]
        return done if len(done) == count else None

    (refused,) = wait_for(lambda: finished(1), timeout=300)
    assert refused.status is JobStatus.SKIPPED, (refused.status, refused.reason)
    assert refused.reason is not None
    assert "167,772,160 voxels" in refused.reason and "inference.max_voxels" in refused.reason
    assert "it was not decoded" in refused.reason
    growth = (_memory_kib(worker.pid, "VmHWM") - baseline_kib) * 1024
    assert growth < GROWTH_LIMIT < VOLUME_BYTES, f"the worker's peak grew by {growth >> 20} MiB"

    # The receiver stores the next study, and the same worker runs its job.
    assert push(clean.paths, target).failed == 0
    jobs = wait_for(lambda: finished(2), timeout=300)
    (done,) = [job for job in jobs if job.id != refused.id]
    assert done.status is JobStatus.SUCCEEDED, done.reason
    (same,) = [w for w in db_rows(node.database, Worker) if w.stopped_at is None]
    assert same.pid == worker.pid  # the worker was not restarted
    assert echo(target) == 0
