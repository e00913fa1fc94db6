"""Reporting benchmark: a whole-body result's SEG and SR against the model's own time.

    .venv/bin/python bench/reporting.py                           # 512x512x256, 104 labels
    .venv/bin/python bench/reporting.py --size 256 --slices 128   # a smaller CPU

A synthetic CT series at 0.75 mm (512x512x256 by default; realistic headers, no pixel data: no
builder reads source pixels) with a volume of Hounsfield units, and two label maps with the 104
labels of ``wholeBody_ct_segmentation`` (names from its ``channel_def``, codes and colours of the
built-in table, reused):

- **realistic**: each structure a compact region (an ellipsoid) over its own range of slices, as
  TotalSegmentator produces: a few large organs, many small structures;
- **random**: every voxel a random label (0-104), so that every label is on every slice: the
  worst case for a BINARY SEG (one frame per label and slice).

For each, as a job writes its result (:func:`pacsai.reporting.outputs.write_result_objects`: SEG
and SR built at the same time, written compressed) with ``seg_type`` LABELMAP (the default) and
BINARY, after one warm-up of the libraries (a running worker has loaded them): seconds and file
sizes. Then the BINARY form a delivery makes from the LABELMAP result for a peer that does not
take the Label Map SOP Class, and (with DCMTK) the deliveries themselves: to ``storescp -pm +xa``
(takes the LABELMAP, JPEG-LS) and to a default ``storescp`` (BINARY, re-encoded uncompressed).

The inference it is compared with: the CPU forward pass of ``wholeBody_ct_segmentation``'s
network (its ``network_def``, random weights) on one 96^3 window, measured here, times the number
of windows its sliding-window inferer runs on this study at the bundle's 1.5 mm (overlap 0.25).
That leaves out pre- and postprocessing and the window blending, so the real inference is
longer and the printed share an upper bound. Targets: SEG + SR written in at most 10 % of that,
a realistic SEG under 20 MB. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from _common import free_port
from pacsai.config import Destination
from pacsai.inference.bundle import BundleInfo
from pacsai.inference.labels import semantics_for
from pacsai.inference.volume import Volume
from pacsai.reporting import build_measurement_report, build_segmentation
from pacsai.reporting._common import check_label_map, match_sources
from pacsai.reporting.delivery import Peer, send
from pacsai.reporting.outputs import WrittenObject, write_result_objects
from pacsai.reporting.seg import referenced_segmentation
from pacsai.reporting.transfer import STORED_TRANSFER_SYNTAXES
from pacsai.reporting.variants import binary_variant

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO.parent / "shared" / "zoo" / "wholeBody_ct_segmentation"
SPACING_MM = 0.75
BUNDLE_SPACING_MM = 1.5  # wholeBody_ct_segmentation, highres
ROI = 96
OVERLAP = 0.25
# Codes the built-in table knows, given in turn to the 104 structures (the benchmark measures
# encoding; the meanings only have to be valid codes).
KNOWN = ("liver", "spleen", "kidney", "pancreas", "stomach", "gallbladder", "aorta")
MIB = 2**20


# --- synthetic study --------------------------------------------------------------------------


def make_sources(size: int, slices: int) -> list[Dataset]:
    """CT Image headers (PS3.3 A.3) of one axial series, without pixel data."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    origin = -size * SPACING_MM / 2
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
        ds.StudyDescription, ds.ReferringPhysicianName = "CT WHOLE BODY", ""
        ds.SeriesInstanceUID, ds.SeriesNumber = series, 2
        ds.SeriesDescription, ds.Modality = "BODY 0.75 B30f", "CT"
        ds.BodyPartExamined, ds.PatientPosition = "WHOLEBODY", "HFS"
        ds.Manufacturer, ds.ManufacturerModelName = "BENCH", "SYNTHETIC CT"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.InstanceNumber, ds.AcquisitionNumber = k + 1, 1
        ds.ImagePositionPatient = [origin, origin, k * SPACING_MM]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [SPACING_MM, SPACING_MM]
        ds.SliceThickness, ds.SliceLocation = SPACING_MM, k * SPACING_MM
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP, ds.ConvolutionKernel = 120, "B30f"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        sources.append(ds)
    return sources


def make_volume(sources: Sequence[Dataset], size: int) -> Volume:
    """Air around a soft-tissue body, with noise, in the sources' order."""
    slices = len(sources)
    rng = np.random.default_rng(0)
    y, x = np.ogrid[:size, :size]
    body = ((x - size / 2) / (size * 0.42)) ** 2 + ((y - size / 2) / (size * 0.32)) ** 2 < 1
    plane = np.where(body, np.float32(40), np.float32(-1000))
    array = np.empty((slices, size, size), dtype=np.float32)
    for k in range(slices):
        array[k] = plane + rng.normal(0, 10, (size, size)).astype(np.float32)
    first = sources[0]
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
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


def realistic_label_map(shape: tuple[int, int, int], labels: int, seed: int = 1) -> np.ndarray:
    """Each label an ellipsoid over its own range of slices inside the body: six large organs
    (a quarter to half of the slices, 45-110 mm across), the rest small to medium structures
    (4-25 % of the slices, 6-50 mm across)."""
    slices, size, _ = shape
    rng = np.random.default_rng(seed)
    label_map = np.zeros(shape, dtype=np.uint8)
    for value in range(1, labels + 1):
        large = value <= 6
        span = rng.uniform(0.25, 0.5) if large else rng.uniform(0.04, 0.25)
        half = max(1.0, span * slices / 2)
        centre_z = rng.uniform(half, slices - half)
        radii = rng.uniform(30, 75, 2) if large else rng.uniform(4, 34, 2)
        radii *= size / 512
        centre = rng.uniform([size * 0.3, size * 0.25], [size * 0.7, size * 0.75])
        z0, z1 = int(centre_z - half), math.ceil(centre_z + half)
        r0, r1 = (np.floor(centre - radii).astype(int), np.ceil(centre + radii).astype(int) + 1)
        r0, r1 = np.maximum(r0, 0), np.minimum(r1, size)
        z, y, x = np.ogrid[z0:z1, r0[0] : r1[0], r0[1] : r1[1]]
        inside = (
            ((z - centre_z) / half) ** 2
            + ((y - centre[0]) / radii[0]) ** 2
            + ((x - centre[1]) / radii[1]) ** 2
        ) < 1
        label_map[z0:z1, r0[0] : r1[0], r0[1] : r1[1]][inside] = value
    return label_map


def random_label_map(shape: tuple[int, int, int], labels: int, seed: int = 2) -> np.ndarray:
    """Every voxel a random label from 0 to ``labels``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, labels + 1, size=shape, dtype=np.uint8)


def label_names(labels: int) -> list[str]:
    """The wholeBody bundle's channel names when the zoo is there, else numbered names."""
    metadata = ZOO / "configs" / "metadata.json"
    if metadata.is_file():
        channels = json.loads(metadata.read_text())["network_data_format"]["outputs"]["pred"][
            "channel_def"
        ]
        names = [str(channels[str(value)]) for value in range(1, len(channels))]
        if len(names) >= labels:
            return names[:labels]
    return [f"structure {value}" for value in range(1, labels + 1)]


def make_bundle(labels: int) -> BundleInfo:
    semantics = [
        semantics_for(value, KNOWN[(value - 1) % len(KNOWN)], None)
        for value in range(1, labels + 1)
    ]
    return BundleInfo(
        name="wholeBody_ct_segmentation",
        path=Path("wholeBody_ct_segmentation"),
        version="0.2.4",
        description="benchmark stand-in: the whole-body CT model's 104 labels",
        modalities=("CT",),
        task="segmentation",
        spatial_dims=3,
        labels=tuple(
            type(label)(label.value, name, label.category, label.type, label.color)
            for label, name in zip(semantics, label_names(labels), strict=True)
        ),
        config_file=Path("wholeBody_ct_segmentation/configs/inference.json"),
        weights=Path("wholeBody_ct_segmentation/models/model.pt"),
        weights_sha256="0123456789abcdef" * 4,
    )


# --- the model's time -------------------------------------------------------------------------


def windows(shape: tuple[int, int, int]) -> int:
    """Sliding windows MONAI's inferer runs (roi 96, overlap 0.25) on this study at 1.5 mm."""
    count = 1
    interval = int(ROI * (1 - OVERLAP))
    for size in shape:
        resampled = math.ceil(size * SPACING_MM / BUNDLE_SPACING_MM)
        count *= 1 if resampled <= ROI else math.ceil((resampled - ROI) / interval) + 1
    return count


def forward_seconds(repeat: int) -> float:
    """Median seconds of one forward pass of wholeBody's network on a 96^3 window, CPU."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ZOO / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def").eval()
    window = torch.randn(1, 1, ROI, ROI, ROI)
    times = []
    with torch.inference_mode():
        network(window)  # warm-up
        for _ in range(repeat):
            start = time.perf_counter()
            network(window)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- timing -----------------------------------------------------------------------------------


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def write(
    root: Path,
    name: str,
    sources: list[Dataset],
    volume: Volume,
    bundle: BundleInfo,
    label_map: np.ndarray,
    seg_type: Literal["BINARY", "LABELMAP"],
    outputs: Sequence[str] = ("seg", "sr"),
) -> tuple[list[WrittenObject], float]:
    objects, seconds = timed(
        lambda: write_result_objects(
            results_dir=root,
            folder=Path(name),
            sources=sources,
            volume=volume,
            bundle=bundle,
            route_name="bench",
            label_map=label_map,
            probabilities=None,
            outputs=list(outputs),
            seg_type=seg_type,
        )
    )
    return objects, seconds


def one_by_one(
    sources: list[Dataset], volume: Volume, bundle: BundleInfo, label_map: np.ndarray
) -> tuple[float, float, float]:
    """Seconds to check the inputs, then build and encode the LABELMAP SEG, then the SR, one
    after the other (the job builds the SEG and the SR at the same time)."""
    start = time.perf_counter()
    matched = match_sources(sources, volume)
    counts = check_label_map(label_map, volume, bundle)
    reference = referenced_segmentation(
        label_map=counts,
        bundle=bundle,
        segmentation_type="LABELMAP",
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        study_instance_uid=matched.study_instance_uid,
    )
    checks = time.perf_counter() - start

    def encoded(dataset: Dataset) -> int:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return len(buffer.getvalue())

    _, seg_seconds = timed(
        lambda: encoded(
            build_segmentation(
                sources=matched,
                volume=volume,
                label_map=counts,
                bundle=bundle,
                segmentation_type="LABELMAP",
                series_instance_uid=reference.series_instance_uid,
                sop_instance_uid=reference.sop_instance_uid,
                transfer_syntax_uid=STORED_TRANSFER_SYNTAXES["LABELMAP"],
            )
        )
    )
    _, sr_seconds = timed(
        lambda: encoded(
            build_measurement_report(
                sources=matched,
                volume=volume,
                bundle=bundle,
                segmentation=reference,
                label_map=counts,
            )
        )
    )
    return checks, seg_seconds, sr_seconds


def size_of(root: Path, objects: Sequence[WrittenObject], kind: str) -> int:
    return sum((root / o.path).stat().st_size for o in objects if o.kind == kind)


def start_storescp(out: Path, options: Sequence[str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    out.mkdir(parents=True)
    process = subprocess.Popen(
        ["storescp", *options, "-aet", "PACS", "-od", str(out), str(port)],
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
    root: Path, objects: Sequence[WrittenObject], options: Sequence[str]
) -> tuple[str, float]:
    """Seconds to send ``objects`` to a storescp started with ``options``; the SEG type sent."""
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as temp:
        process, port = start_storescp(Path(temp) / "pacs", options)
        try:
            peer = Peer(
                "pacs",
                Destination(ae_title="PACS", host="127.0.0.1", port=port),
                "PACS",
                "127.0.0.1",
            )
            receipt, seconds = timed(
                lambda: send(peer, [root / o.path for o in objects], calling_ae_title="PACSAI")
            )
        finally:
            process.terminate()
            process.wait(timeout=30)
    return str(receipt.seg_type), seconds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512, help="rows and columns (512)")
    parser.add_argument("--slices", type=int, default=256, help="slices (256)")
    parser.add_argument("--labels", type=int, default=104, help="labels (104)")
    parser.add_argument("--repeat", type=int, default=3, help="forward passes timed (3)")
    parser.add_argument(
        "--forward-seconds",
        type=float,
        default=None,
        help="seconds of one 96^3 forward pass, instead of measuring it (needs no zoo)",
    )
    parser.add_argument(
        "--cases", default="realistic,random", help="label maps: realistic,random (both)"
    )
    parser.add_argument("--no-delivery", action="store_true", help="skip the storescp deliveries")
    args = parser.parse_args(argv)
    cases = [case for case in args.cases.split(",") if case]
    delivery = not args.no_delivery and shutil.which("storescp") is not None

    shape = (args.slices, args.size, args.size)
    print(
        f"CT {args.size}x{args.size}x{args.slices} at {SPACING_MM} mm, {args.labels} labels, "
        f"{os.cpu_count()} cores"
    )
    if args.forward_seconds is None and not (ZOO / "configs" / "inference.json").is_file():
        raise SystemExit(f"{ZOO} not found: pass --forward-seconds")
    forward = (
        args.forward_seconds if args.forward_seconds is not None else forward_seconds(args.repeat)
    )
    count = windows(shape)
    inference = forward * count
    print(
        f"inference (estimate): {forward:.2f} s per 96^3 window (CPU forward of the wholeBody "
        f"network, {'given' if args.forward_seconds is not None else 'measured'}) x {count} "
        f"windows = {inference:.1f} s; 10% = {inference / 10:.1f} s"
    )

    sources = make_sources(args.size, args.slices)
    volume = make_volume(sources, args.size)
    bundle = make_bundle(args.labels)
    with tempfile.TemporaryDirectory(prefix="bench-reporting-") as temp:
        root = Path(temp)
        # Warm-up: highdicom reads the standard's tables once per process, as a worker has.
        small = make_sources(32, 4)
        small_volume = make_volume(small, 32)
        tiny = np.zeros(small_volume.array.shape, dtype=np.uint8)
        tiny[1:3, 4:9, 4:9] = 1
        for seg_type in ("LABELMAP", "BINARY"):
            write(root, f"warm-{seg_type}", small, small_volume, bundle, tiny, seg_type)  # type: ignore[arg-type]

        rows: list[tuple[str, str, str]] = []
        for case in cases:
            make = realistic_label_map if case == "realistic" else random_label_map
            label_map = make(shape, args.labels)
            present = int((np.bincount(label_map.ravel(), minlength=args.labels + 1)[1:] > 0).sum())
            binary_frames = 0
            for k in range(args.slices):
                binary_frames += int(
                    (np.bincount(label_map[k].ravel(), minlength=args.labels + 1)[1:] > 0).sum()
                )
            print(
                f"\n{case}: {present} labels present, {binary_frames} BINARY frames "
                f"(label, slice), {int(label_map.any(axis=(1, 2)).sum())} LABELMAP frames"
            )
            results: dict[str, tuple[list[WrittenObject], float]] = {}
            for seg_type in ("LABELMAP", "BINARY"):
                results[seg_type] = write(
                    root,
                    f"{case}-{seg_type}",
                    sources,
                    volume,
                    bundle,
                    label_map,
                    seg_type,  # type: ignore[arg-type]
                )
            checks, seg_only, sr_only = one_by_one(sources, volume, bundle, label_map)
            labelmap_objects, labelmap_seconds = results["LABELMAP"]
            binary_objects, binary_seconds = results["BINARY"]
            seg = next(root / o.path for o in labelmap_objects if o.kind == "SEG")
            sr = next(root / o.path for o in labelmap_objects if o.kind == "SR")
            variant, variant_seconds = timed(lambda seg=seg, sr=sr: binary_variant(seg, [sr]))
            sizes = {
                "LABELMAP": size_of(root, labelmap_objects, "SEG"),
                "BINARY": size_of(root, binary_objects, "SEG"),
                "SR": size_of(root, labelmap_objects, "SR"),
            }
            share = labelmap_seconds / inference
            rows += [
                (
                    f"{case}: SEG LABELMAP + SR written",
                    f"{labelmap_seconds:.2f}",
                    f"{share:.1%} of inference; SEG {sizes['LABELMAP'] / MIB:.1f} MiB "
                    f"(JPEG-LS), SR {sizes['SR'] / 1024:.0f} KiB",
                ),
                (
                    f"{case}:   the same one after the other",
                    f"{checks + seg_only + sr_only:.2f}",
                    "in memory, no threads: checks, then SEG, then SR",
                ),
                (f"{case}:     checks", f"{checks:.2f}", "sources matched, labels counted"),
                (f"{case}:     SEG LABELMAP", f"{seg_only:.2f}", "built and encoded"),
                (f"{case}:     SR", f"{sr_only:.2f}", "built and encoded"),
                (
                    f"{case}: SEG BINARY + SR written",
                    f"{binary_seconds:.2f}",
                    f"{binary_seconds / inference:.1%} of inference; SEG "
                    f"{sizes['BINARY'] / MIB:.1f} MiB (deflated)",
                ),
                (
                    f"{case}: BINARY form of the LABELMAP result",
                    f"{variant_seconds:.2f}",
                    f"made once, when a peer refuses LABELMAP "
                    f"({variant.seg.stat().st_size / MIB:.1f} MiB)",
                ),
            ]
            if delivery:
                for options, what in ((("-pm", "+xa"), "storescp -pm +xa"), ((), "storescp")):
                    seg_type, seconds = deliver(root, labelmap_objects, options)
                    rows.append(
                        (f"{case}: delivery to {what}", f"{seconds:.2f}", f"{seg_type} sent")
                    )
            shutil.rmtree(root / f"{case}-BINARY", ignore_errors=True)

    width = max(len(stage) for stage, _, _ in rows) + 2
    print(f"\n{'stage':<{width}}{'seconds':>8}  note")
    for stage, seconds, note in rows:
        print(f"{stage:<{width}}{seconds:>8}  {note}")
    print(
        "\ntargets: SEG + SR written <= 10% of the inference estimate; a realistic SEG < 20 MB "
        "(LABELMAP where the destination takes it)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
