"""Reporting benchmark: encoding a CT job's SEG and SR, and sending them to a PACS.

    .venv/bin/python bench/reporting.py                          # 512x512x300, the issue's size
    .venv/bin/python bench/reporting.py --size 256 --slices 96   # a small CPU

A synthetic CT series (300 slices of 512x512 by default, 0.75 mm pixels, 1 mm slices: realistic
headers only, since no builder reads source pixels), a volume of Hounsfield units and a label map
with 10 abdominal organs as ellipsoid blobs, and a bundle describing those 10 labels with the
built-in codes and colours of :mod:`pacsai.inference.labels`. Timed, each once:

- SEG BINARY, SEG LABELMAP, SR: build with :mod:`pacsai.reporting` and ``dcmwrite`` to bytes;
- the SC overlay series (:func:`pacsai.reporting.build_overlay`): build and write every image;
- delivery to DCMTK ``storescp`` (on a free port, in a temporary folder, ``TCP_NODELAY=1``,
  accepting any SOP class): association, then C-STORE of the SEG and SR files the job would
  have written, then release, with pynetdicom as the job's delivery does; the overlay series
  is sent over its own association.

The share of the job is ``(SEG + SR encoding + their delivery) / job seconds``; ``--job-seconds``
defaults to that sum plus ``--inference-seconds``, whose default of 20 s is a placeholder: replace
it with the "pacsai total" that ``bench/inference.py`` prints on the same machine. The target is
at most 10 % on a GPU node, where inference is short. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from pacsai.inference.bundle import BundleInfo
from pacsai.inference.labels import semantics_for
from pacsai.inference.volume import Volume
from pacsai.reporting import (
    build_measurement_report,
    build_overlay,
    build_segmentation,
    result_uid,
)

LABELS = (
    "liver",
    "spleen",
    "kidney",
    "pancreas",
    "stomach",
    "gallbladder",
    "aorta",
    "esophagus",
    "duodenum",
    "colon",
)
PIXEL_SPACING_MM = 0.75
SLICE_STEP_MM = 1.0


# --- synthetic study --------------------------------------------------------------------------


def make_sources(size: int, slices: int) -> list[Dataset]:
    """CT Image headers (PS3.3 A.3) of one axial series, without pixel data."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    origin = -size * PIXEL_SPACING_MM / 2
    sources = []
    for k in range(slices):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID = "BENCH^REPORTING", "BENCH-0001"
        ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19600101", "F", "064Y"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study, "1", "BENCH0001"
        ds.StudyDate, ds.StudyTime = "20250101", "120000"
        ds.StudyDescription, ds.ReferringPhysicianName = "CT ABDOMEN", ""
        ds.SeriesInstanceUID, ds.SeriesNumber = series, 2
        ds.SeriesDescription, ds.Modality = "ABDOMEN 1.0 B30f", "CT"
        ds.BodyPartExamined, ds.PatientPosition = "ABDOMEN", "HFS"
        ds.Manufacturer, ds.ManufacturerModelName = "BENCH", "SYNTHETIC CT"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.InstanceNumber, ds.AcquisitionNumber = k + 1, 1
        ds.ImagePositionPatient = [origin, origin, k * SLICE_STEP_MM]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
        ds.SliceThickness, ds.SliceLocation = SLICE_STEP_MM, k * SLICE_STEP_MM
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP, ds.ConvolutionKernel = 120, "B30f"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        sources.append(ds)
    return sources


def make_volume(sources: Sequence[Dataset], size: int) -> Volume:
    """Air around a soft-tissue body, with noise; slices in the sources' order (feet first).

    The order along the slice normal, as :func:`pacsai.inference.volume.load_series` gives it.
    """
    slices = len(sources)
    rng = np.random.default_rng(0)
    y, x = np.ogrid[:size, :size]
    body = ((x - size / 2) / (size * 0.42)) ** 2 + ((y - size / 2) / (size * 0.32)) ** 2 < 1
    plane = np.where(body, np.float32(40), np.float32(-1000))
    array = np.empty((slices, size, size), dtype=np.float32)
    for k in range(slices):
        array[k] = plane + rng.normal(0, 10, (size, size)).astype(np.float32)
    first = sources[0]
    affine = np.eye(4)
    affine[:3, 0] = [PIXEL_SPACING_MM, 0, 0]
    affine[:3, 1] = [0, PIXEL_SPACING_MM, 0]
    affine[:3, 2] = [0, 0, SLICE_STEP_MM]
    affine[:3, 3] = [float(v) for v in first.ImagePositionPatient]
    return Volume(
        array=array,
        affine=affine,
        sources=tuple((str(ds.SOPInstanceUID), None) for ds in sources),
        modality="CT",
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        sop_class_uid=str(first.SOPClassUID),
    )


def make_label_map(volume: Volume) -> np.ndarray:
    """One ellipsoid blob per label inside the body, each with its own HU in ``volume``."""
    slices, size, _ = volume.array.shape
    rng = np.random.default_rng(1)
    label_map = np.zeros(volume.array.shape, dtype=np.uint8)
    for value in range(1, len(LABELS) + 1):
        centre = rng.uniform(
            [slices * 0.2, size * 0.35, size * 0.3], [slices * 0.8, 0.65 * size, 0.7 * size]
        )
        radii = rng.uniform(
            [slices * 0.05, size * 0.03, size * 0.03], [slices * 0.2, size * 0.08, size * 0.08]
        )
        lo = np.maximum(np.floor(centre - radii).astype(int), 0)
        hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, volume.array.shape)
        z, y, x = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        inside = (
            ((z - centre[0]) / radii[0]) ** 2
            + ((y - centre[1]) / radii[1]) ** 2
            + ((x - centre[2]) / radii[2]) ** 2
        ) < 1
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        label_map[box][inside] = value
        volume.array[box][inside] += np.float32(rng.uniform(20, 180))
    return label_map


def make_bundle() -> BundleInfo:
    """A segmentation bundle of :data:`LABELS` (no files: the builders read none)."""
    return BundleInfo(
        name="bench_abdomen",
        path=Path("bench_abdomen"),
        version="1.0.0",
        description="benchmark stand-in for a 10-organ abdominal CT model",
        modalities=("CT",),
        task="segmentation",
        spatial_dims=3,
        labels=tuple(semantics_for(v, name, None) for v, name in enumerate(LABELS, start=1)),
        config_file=Path("bench_abdomen/configs/inference.json"),
        weights=Path("bench_abdomen/models/model.pt"),
        weights_sha256="0123456789abcdef" * 4,
    )


# --- timing -----------------------------------------------------------------------------------


def encoded(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_storescp(out: Path) -> tuple[subprocess.Popen[bytes], int]:
    """DCMTK storescp accepting any SOP class (``-pm``) on a free port, storing in ``out``."""
    port = free_port()
    out.mkdir()
    process = subprocess.Popen(
        ["storescp", "-pm", "-aet", "PACS", "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"storescp exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"storescp does not listen on {port} after 30 s")


def deliver(
    port: int, files: Sequence[tuple[str, Path]], *, nodelay: bool
) -> tuple[float, float, float]:
    """Seconds to associate, C-STORE ``files`` ((SOP Class UID, path)) and release.

    pynetdicom leaves Nagle's algorithm on: with the peer's delayed ACK, each C-STORE then
    waits about 40 ms on loopback. ``nodelay`` sets TCP_NODELAY on the association's socket
    (a pynetdicom internal), to show what a delivery that sets it would take.
    """
    ae = AE(ae_title="PACSAI")
    for sop_class in sorted({sop_class for sop_class, _ in files}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    start = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
    if not assoc.is_established:
        raise SystemExit("storescp refused the association")
    if nodelay:
        transport = assoc.dul.socket
        if transport is None or transport.socket is None:
            raise SystemExit("the association has no socket")
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    associated = time.perf_counter()
    for _, path in files:
        status = assoc.send_c_store(path)
        if int(status.get("Status", -1)) != 0:
            raise SystemExit(f"storescp answered C-STORE of {path.name} with {status}")
    stored = time.perf_counter()
    assoc.release()
    released = time.perf_counter()
    return associated - start, stored - associated, released - stored


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512, help="rows and columns (512)")
    parser.add_argument("--slices", type=int, default=300, help="slices (300)")
    parser.add_argument(
        "--inference-seconds",
        type=float,
        default=20.0,
        help="model time of the job; 20 s is a placeholder for bench/inference.py's figure",
    )
    parser.add_argument(
        "--job-seconds",
        type=float,
        default=None,
        help="end-to-end job time (default: encoding + delivery + --inference-seconds)",
    )
    args = parser.parse_args(argv)
    if shutil.which("storescp") is None:
        raise SystemExit("needs DCMTK storescp: apt-get install dcmtk")

    sources = make_sources(args.size, args.slices)
    volume = make_volume(sources, args.size)
    label_map = make_label_map(volume)
    bundle = make_bundle()
    study = str(sources[0].StudyInstanceUID)
    uids = {
        kind: (
            result_uid(study, bundle.display_version, kind, "series"),
            result_uid(study, bundle.display_version, kind),
        )
        for kind in ("seg", "labelmap", "sr")
    }
    print(
        f"CT {args.size}x{args.size}x{args.slices}, {len(LABELS)} labels, "
        f"{int(np.count_nonzero(label_map.any(axis=(1, 2))))} slices with findings, "
        f"{os.cpu_count()} cores"
    )

    seg, seg_seconds = timed(
        lambda: build_segmentation(
            sources=sources,
            volume=volume,
            bundle=bundle,
            label_map=label_map,
            series_instance_uid=uids["seg"][0],
            sop_instance_uid=uids["seg"][1],
        )
    )
    seg_bytes, write_seconds = timed(lambda: encoded(seg))
    seg_seconds += write_seconds

    def labelmap_seg() -> bytes:
        return encoded(
            build_segmentation(
                sources=sources,
                volume=volume,
                bundle=bundle,
                label_map=label_map,
                segmentation_type="LABELMAP",
                series_instance_uid=uids["labelmap"][0],
                sop_instance_uid=uids["labelmap"][1],
            )
        )

    labelmap_bytes, labelmap_seconds = timed(labelmap_seg)

    def report() -> tuple[Dataset, bytes]:
        sr = build_measurement_report(
            sources=sources,
            volume=volume,
            bundle=bundle,
            segmentation=seg,
            label_map=label_map,
            series_instance_uid=uids["sr"][0],
            sop_instance_uid=uids["sr"][1],
        )
        return sr, encoded(sr)

    (sr, sr_bytes), sr_seconds = timed(report)

    def overlay() -> list[bytes]:
        images = build_overlay(
            sources=sources,
            volume=volume,
            bundle=bundle,
            label_map=label_map,
            uid_parts=(study, bundle.display_version),
        )
        return [encoded(image) for image in images]

    overlay_bytes, overlay_seconds = timed(overlay)

    with tempfile.TemporaryDirectory(prefix="bench-reporting-") as temp:
        root = Path(temp)
        results = [(str(seg.SOPClassUID), root / "seg.dcm"), (str(sr.SOPClassUID), root / "sr.dcm")]
        results[0][1].write_bytes(seg_bytes)
        results[1][1].write_bytes(sr_bytes)
        overlay_files = []
        for number, data in enumerate(overlay_bytes):
            path = root / f"overlay{number:04d}.dcm"
            path.write_bytes(data)
            overlay_files.append(("1.2.840.10008.5.1.4.1.1.7", path))
        # As pacsai.scu.push: the files' bytes go out as they are on disk, undecoded.
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
        process, port = start_storescp(root / "pacs")
        try:
            delivery = {
                nodelay: deliver(port, results, nodelay=nodelay) for nodelay in (False, True)
            }
            overlay_delivery = {
                nodelay: sum(deliver(port, overlay_files, nodelay=nodelay))
                for nodelay in (False, True)
            }
        finally:
            process.terminate()
            process.wait(timeout=30)

    mib = 2**20
    rows = [
        ("SEG BINARY build + write", seg_seconds, f"{len(seg_bytes) / mib:.1f} MiB"),
        ("SEG LABELMAP build + write", labelmap_seconds, f"{len(labelmap_bytes) / mib:.1f} MiB"),
        ("SR build + write", sr_seconds, f"{len(sr_bytes) / 1024:.0f} KiB"),
        (
            "SC overlay build + write",
            overlay_seconds,
            f"{len(overlay_bytes)} images, {sum(map(len, overlay_bytes)) / mib:.0f} MiB",
        ),
    ]
    for nodelay, (associate, store, release) in delivery.items():
        how = "TCP_NODELAY" if nodelay else "pynetdicom default"
        rows += [
            ("delivery: associate", associate, f"storescp on loopback, {how}"),
            ("delivery: C-STORE SEG + SR", store, how),
            ("delivery: release", release, how),
            ("delivery: SC overlay series", overlay_delivery[nodelay], f"own association, {how}"),
        ]
    print(f"{'stage':<30}{'seconds':>9}  note")
    for stage, seconds, note in rows:
        print(f"{stage:<30}{seconds:>9.2f}  {note}")

    associate, store, release = delivery[False]
    reporting = seg_seconds + sr_seconds + associate + store + release
    job = args.job_seconds if args.job_seconds is not None else reporting + args.inference_seconds
    source = (
        "given"
        if args.job_seconds is not None
        else f"reporting + {args.inference_seconds:g} s inference (placeholder)"
    )
    print(f"job: {job:.2f} s ({source})")
    print(
        f"encoding + delivery = {reporting / job:.1%} of the job (target <= 10% on a GPU): "
        f"{reporting:.2f} s for the SEG (BINARY) and the SR"
    )
    fast = seg_seconds + sr_seconds + sum(delivery[True])
    print(
        f"the same with TCP_NODELAY on the sending socket: {fast / (job - reporting + fast):.1%} "
        f"({fast:.2f} s)"
    )
    extra = overlay_seconds + overlay_delivery[False]
    print(
        f"with the SC overlay series as well: {(reporting + extra) / (job + extra):.1%} "
        f"({reporting + extra:.2f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
