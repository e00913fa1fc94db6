"""Turn one model result into the DICOM objects a PACS receives, and write them to disk.

The UIDs of every object are derived (:func:`~pacsai.reporting.result_uid`) from what identifies
the result: the study, the exact source instances, the route, the model's weights and the object
kind. Running a job again therefore rewrites the same instances, which a PACS replaces instead
of showing twice; a different input or model gives new UIDs. ``salt`` asks for new UIDs anyway.

The SEG, the SR and the overlay are built at the same time, in threads: the SR refers to the SEG
by what :func:`~pacsai.reporting.seg.referenced_segmentation` says it will be, not by the SEG
itself. Each object is written losslessly compressed where its type allows
(:data:`~pacsai.reporting.transfer.STORED_TRANSFER_SYNTAXES`); a delivery sends it uncompressed
to a peer that does not take that (:func:`~pacsai.reporting.transfer.reencode`).

``seg_type`` LABELMAP (a route's default) writes the Label Map SEG and its SR only: the BINARY
form, for destinations that do not accept the Label Map Segmentation SOP Class, is made from
them when such a destination is first sent to (:func:`pacsai.reporting.variants.binary_variant`),
so a site whose PACS takes LABELMAP never pays for BINARY frames. BINARY writes the BINARY SEG
(and the SR referencing it) for every destination.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom import Dataset

from pacsai._atomic import write_atomically
from pacsai.errors import ReportError
from pacsai.inference.bundle import BundleInfo
from pacsai.inference.volume import Volume
from pacsai.reporting._common import (
    check_label_map,
    match_sources,
    source_person_names,
)
from pacsai.reporting._uids import result_uid
from pacsai.reporting.overlay import build_overlay
from pacsai.reporting.seg import (
    EmptySegmentationError,
    ReferencedSegmentation,
    build_segmentation,
    referenced_segmentation,
)
from pacsai.reporting.sr import build_measurement_report
from pacsai.reporting.transfer import STORED_TRANSFER_SYNTAXES, save

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
    seg_type: Literal["BINARY", "LABELMAP"] = "LABELMAP",
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
    if seg_type not in ("BINARY", "LABELMAP"):
        raise ValueError(f"seg_type must be BINARY or LABELMAP, got {seg_type!r}")
    matched = match_sources(sources, volume)  # once for the SEG, the SR and the overlay
    study_uid = matched.study_instance_uid
    inputs = hashlib.sha256("\n".join(uid for uid, _ in volume.sources).encode()).hexdigest()
    identity: tuple[str, ...] = (study_uid, inputs, route_name, bundle.name, bundle.weights_sha256)
    if salt:
        identity = (*identity, salt)

    def uid(*parts: str) -> str:
        return str(result_uid(*identity, *parts))

    checked = None if label_map is None else check_label_map(label_map, volume, bundle)
    segmentation: ReferencedSegmentation | None = None
    if checked is not None and "seg" in outputs:
        try:
            segmentation = referenced_segmentation(
                label_map=checked,
                bundle=bundle,
                segmentation_type=seg_type,
                sop_instance_uid=uid("SEG", "instance"),
                series_instance_uid=uid("SEG", "series"),
                study_instance_uid=study_uid,
            )
        except EmptySegmentationError:
            segmentation = None

    def write_seg(pool: ThreadPoolExecutor) -> list[WrittenObject]:
        assert checked is not None and segmentation is not None
        seg = build_segmentation(
            sources=matched,
            volume=volume,
            label_map=checked,
            bundle=bundle,
            segmentation_type=seg_type,
            series_instance_uid=segmentation.series_instance_uid,
            sop_instance_uid=segmentation.sop_instance_uid,
            device_serial_number=device_serial_number,
            transfer_syntax_uid=STORED_TRANSFER_SYNTAXES[seg_type],
            executor=pool,
        )
        return [_write(results_dir, folder / "seg.dcm", "SEG", seg)]

    def write_sr() -> list[WrittenObject]:
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
        return [_write(results_dir, folder / "sr.dcm", "SR", report)]

    def write_overlay() -> list[WrittenObject]:
        assert checked is not None
        images = build_overlay(
            sources=matched,
            volume=volume,
            label_map=checked,
            bundle=bundle,
            uid_parts=(*identity, "OVERLAY"),
        )
        return [
            _write(results_dir, folder / f"overlay-{number:04d}.dcm", "OVERLAY", image)
            for number, image in enumerate(images, start=1)
        ]

    side: list[Callable[[], list[WrittenObject]]] = []
    if "sr" in outputs:
        side.append(write_sr)
    if checked is not None and "overlay" in outputs and any(checked.counts.values()):
        side.append(write_overlay)
    # The SEG in this thread (its BINARY bits packed in `pool`), the SR and overlay beside it.
    # The person-name filter is set here, around all of them: warnings filters are process-wide.
    with source_person_names(), ThreadPoolExecutor(max_workers=_threads()) as pool:
        futures: list[Future[list[WrittenObject]]] = [pool.submit(task) for task in side]
        written = write_seg(pool) if segmentation is not None else []
        for future in futures:
            written += future.result()
    return written


def _threads() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def _write(results_dir: Path, relative: Path, kind: str, dataset: Dataset) -> WrittenObject:
    """Write atomically (temp file, fsync, rename)."""
    write_atomically(results_dir / relative, lambda handle: save(dataset, handle))
    return WrittenObject(
        kind=kind,
        sop_class_uid=str(dataset.SOPClassUID),
        sop_instance_uid=str(dataset.SOPInstanceUID),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        path=relative,
    )
