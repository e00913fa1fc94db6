"""Turn one model result into the DICOM objects a PACS receives, and write them to disk.

The UIDs of every object are derived (:func:`~pacsai.reporting.result_uid`) from what identifies
the result: the study, the exact source instances, the route, the model's weights and the object
kind. Running a job again therefore rewrites the same instances, which a PACS replaces instead
of showing twice; a different input or model gives new UIDs. ``salt`` asks for new UIDs anyway.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset

from pacsai._atomic import write_atomically
from pacsai.errors import ReportError
from pacsai.inference.bundle import BundleInfo
from pacsai.inference.volume import Volume
from pacsai.reporting._common import check_label_map, match_sources
from pacsai.reporting._uids import result_uid
from pacsai.reporting.overlay import build_overlay
from pacsai.reporting.seg import EmptySegmentationError, build_segmentation
from pacsai.reporting.sr import build_measurement_report

__all__ = ["WrittenObject", "write_result_objects"]


@dataclass(frozen=True)
class WrittenObject:
    """One DICOM object written for a result."""

    kind: str  # SEG | SR | OVERLAY
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: Path  # relative to the results directory


def write_result_objects(
    *,
    results_dir: Path,
    folder: Path,
    sources: Sequence[Dataset],
    volume: Volume,
    bundle: BundleInfo,
    route_name: str,
    label_map: np.ndarray | None,
    probabilities: dict[str, float] | None,
    outputs: Sequence[str],
    seg_type: str = "BINARY",
    device_serial_number: str = "PACSAI",
    salt: str = "",
) -> list[WrittenObject]:
    """Build the SEG, SR and overlay asked for in ``outputs`` and write them under
    ``results_dir / folder``.

    A segmentation with no label present gets no SEG (there is nothing to show); its SR says
    that each label is absent.
    """
    if not sources:
        raise ReportError(f"no source instances for series {volume.series_instance_uid}")
    matched = match_sources(sources, volume)  # once for the SEG, the SR and the overlay
    study_uid = matched.study_instance_uid
    inputs = hashlib.sha256("\n".join(uid for uid, _ in volume.sources).encode()).hexdigest()
    identity: tuple[str, ...] = (study_uid, inputs, route_name, bundle.name, bundle.weights_sha256)
    if salt:
        identity = (*identity, salt)

    def uid(*parts: str) -> str:
        return str(result_uid(*identity, *parts))

    written: list[WrittenObject] = []
    checked = None if label_map is None else check_label_map(label_map, volume, bundle)
    segmentation: Dataset | None = None
    if checked is not None and "seg" in outputs:
        try:
            segmentation = build_segmentation(
                sources=matched,
                volume=volume,
                label_map=checked,
                bundle=bundle,
                segmentation_type="LABELMAP" if seg_type == "LABELMAP" else "BINARY",
                series_instance_uid=uid("SEG", "series"),
                sop_instance_uid=uid("SEG", "instance"),
                device_serial_number=device_serial_number,
            )
        except EmptySegmentationError:
            segmentation = None
        if segmentation is not None:
            written.append(_write(results_dir, folder / "seg.dcm", "SEG", segmentation))
    if "sr" in outputs:
        report = build_measurement_report(
            sources=matched,
            volume=volume,
            bundle=bundle,
            segmentation=segmentation,
            label_map=checked,
            probabilities=probabilities,
            series_instance_uid=uid("SR", "series"),
            sop_instance_uid=uid("SR", "instance"),
            device_serial_number=device_serial_number,
        )
        written.append(_write(results_dir, folder / "sr.dcm", "SR", report))
    if checked is not None and "overlay" in outputs and any(checked.counts.values()):
        images = build_overlay(
            sources=matched,
            volume=volume,
            label_map=checked,
            bundle=bundle,
            uid_parts=(*identity, "OVERLAY"),
        )
        for number, image in enumerate(images, start=1):
            path = folder / f"overlay-{number:04d}.dcm"
            written.append(_write(results_dir, path, "OVERLAY", image))
    return written


def _write(results_dir: Path, relative: Path, kind: str, dataset: Dataset) -> WrittenObject:
    """Write atomically (temp file, fsync, rename)."""
    write_atomically(
        results_dir / relative, lambda handle: dataset.save_as(handle, enforce_file_format=True)
    )
    return WrittenObject(
        kind=kind,
        sop_class_uid=str(dataset.SOPClassUID),
        sop_instance_uid=str(dataset.SOPInstanceUID),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        path=relative,
    )
