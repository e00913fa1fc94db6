"""Run the reporting path once before the first job, so that the first study is as fast as the
second.

The first SEG and SR a process writes pay for what is done once: importing highdicom's SEG and
SR modules, loading the standard's module and attribute tables highdicom validates against (a
JSON file it reads on first use), each bundle's segment descriptions and codes, the compressors,
and, on a delivery to a peer without the Label Map Segmentation SOP Class or without compression,
the BINARY form and the uncompressed copy. :func:`warm_up` does all of that on a tiny synthetic
series (four 16 x 16 CT slices), in a temporary directory it removes; a worker calls it after
warming its models (``inference.warm_up``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pacsai.inference.bundle import BundleInfo
from pacsai.inference.volume import Volume, load_datasets

__all__ = ["warm_up"]

log = logging.getLogger(__name__)

_SLICES, _SIZE = 4, 16


def warm_up(bundles: Sequence[BundleInfo]) -> float:
    """Write, and throw away, a LABELMAP SEG (BINARY for a multi-label bundle), its SR, their
    BINARY form and an uncompressed copy for each segmentation bundle (an SR of probabilities
    for a classification bundle); the seconds it took.

    Never raises: a failure is logged (the first job meets it again, and says so) and the
    bundles after it are still tried.
    """
    start = time.perf_counter()
    sources, volume = _synthetic_series()
    with tempfile.TemporaryDirectory(prefix="pacsai-warm-") as scratch:
        for bundle in bundles:
            try:
                _write(Path(scratch) / bundle.name, bundle, sources, volume)
            except Exception as exc:  # a warm-up is best effort: the job reports the real error
                log.warning(
                    "reporting warm-up for model %s failed: %s: %s",
                    bundle.name,
                    type(exc).__name__,
                    exc,
                    exc_info=True,
                    extra={"action": "reporting_warm_failed"},
                )
    return time.perf_counter() - start


def _write(scratch: Path, bundle: BundleInfo, sources: list[Dataset], volume: Volume) -> None:
    from pydicom.uid import ExplicitVRLittleEndian as Uncompressed

    from pacsai.reporting.outputs import write_result_objects
    from pacsai.reporting.sop_classes import LABEL_MAP_SEGMENTATION_STORAGE
    from pacsai.reporting.transfer import reencode
    from pacsai.reporting.variants import binary_variant

    label_map: np.ndarray | None = None
    probabilities: dict[str, float] | None = None
    if bundle.task == "segmentation":
        values = [label.value for label in bundle.labels]
        if bundle.multi_label:
            label_map = np.zeros((len(values), *volume.array.shape), dtype=np.bool_)
            for index in range(len(values)):
                label_map[index].flat[index % volume.array.size] = True
        else:
            label_map = np.zeros(
                volume.array.shape, dtype=np.uint16 if max(values, default=0) > 255 else np.uint8
            )
            label_map.flat[: len(values)] = values[: volume.array.size]
    else:
        probabilities = {label.name: 0.5 for label in bundle.labels}
    written = write_result_objects(
        results_dir=scratch,
        folder=Path("result"),
        sources=sources,
        volume=volume,
        bundle=bundle,
        route_name="warm-up",
        label_map=label_map,
        probabilities=probabilities,
        outputs=["seg", "sr"],
        seg_type="LABELMAP",
    )
    paths = {o.kind: scratch / o.path for o in written}
    labelmap = any(o.sop_class_uid == LABEL_MAP_SEGMENTATION_STORAGE for o in written)
    if labelmap:  # overlapping labels (a multi-label model) are written BINARY already
        variant = binary_variant(paths["SEG"], [p for k, p in paths.items() if k == "SR"])
        reencode(variant.seg, scratch / "binary-uncompressed.dcm", Uncompressed)
    for kind, path in paths.items():
        reencode(path, scratch / f"{kind.lower()}-uncompressed.dcm", Uncompressed)


def _synthetic_series() -> tuple[list[Dataset], Volume]:
    """Four 16 x 16 axial CT slices of one new study (the headers, after their volume is made)."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for k in range(_SLICES):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID = "WARM^UP", "PACSAI-WARM-UP"
        ds.PatientBirthDate, ds.PatientSex = "", ""
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20000101", "000000", "WARMUP"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.Manufacturer = "pacsai"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = _SIZE
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.full((_SIZE, _SIZE), 1024, dtype="<u2").tobytes()
        datasets.append(ds)
    volume = load_datasets(datasets)
    for ds in datasets:  # as a job gives them: headers only
        del ds.PixelData
    return datasets, volume
