"""Helpers for tests of the DICOM objects pacsai writes: dciodvfy, phantom cases, demo bundles."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from pacsai.errors import BundleError
from pacsai.inference.bundle import BundleInfo, inspect_bundle
from pacsai.inference.volume import Volume, load_series
from pacsai.phantom import PhantomStudy, write_phantom
from pacsai.reporting.sop_classes import LABEL_MAP_SEGMENTATION_STORAGE
from pacsai.reporting.transfer import reencode

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Verification:
    """What dciodvfy said about one file."""

    errors: list[str]
    warnings: list[str]

    def report(self) -> str:
        return "\n".join(self.errors + self.warnings)


# dicom3tools 2022 predates the Label Map Segmentation IOD (DICOM 2024): it finds no IOD for the
# SOP Class and takes the background segment (number 0, which that IOD has) for a Segmentation
# Storage error. Checks of a LABELMAP SEG allow these two lines and no other error.
LABELMAP_UNKNOWN_TO_DCIODVFY = (
    "Error - Information Object Not found",
    "Error - SegmentNumber not monotonically increasing from one by one - have SegmentSequence "
    "item number 1 (from one) with SegmentNumber of 0",
)
# For the same reason it takes the Referenced Segment Number of an SR's reference to a LABELMAP
# SEG (TID 1411) for an attribute of a reference to an image; an SR referring to a BINARY SEG
# has no error.
SR_OF_LABELMAP_UNKNOWN_TO_DCIODVFY = (
    "Error - Shall not be present for Referenced SOP Class that is not segmentation - attribute "
    "<ReferencedSegmentNumber>",
)


def known_errors(path: Path) -> tuple[str, ...]:
    """The dciodvfy errors that only say dicom3tools 2022 predates the Label Map SEG."""
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    if dataset.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE:
        return LABELMAP_UNKNOWN_TO_DCIODVFY
    referenced = {
        str(item.ReferencedSOPClassUID)
        for study in dataset.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for item in series.get("ReferencedSOPSequence", [])
    }
    if LABEL_MAP_SEGMENTATION_STORAGE in referenced:
        return SR_OF_LABELMAP_UNKNOWN_TO_DCIODVFY
    return ()


def dciodvfy(path: Path) -> Verification:
    """Run dciodvfy (dicom3tools) on ``path``; skip the test when it is not installed.

    Its ``Error -`` lines mean the object does not conform to its IOD; ``Warning -`` lines do
    not. Warnings about attributes only a DICOMDIR needs are dropped.

    dicom3tools as Debian packages it cannot read a deflated data set ("Dicom dataset read
    failed"); the IOD does not depend on the transfer syntax, so a deflated file is checked as
    its inflated copy (Explicit VR Little Endian, the same data elements).
    """
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not found: install dicom3tools (apt install dicom3tools)")
    if read_file_meta_info(path).TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        inflated = path.with_name(f"{path.stem}-inflated{path.suffix}")
        reencode(path, inflated, ExplicitVRLittleEndian)
        path = inflated
    result = subprocess.run(
        [tool, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    return Verification(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[
            line
            for line in lines
            if line.startswith("Warning") and "needed to build DICOMDIR" not in line
        ],
    )


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """A phantom study read the way a job reads it, with its truth as the model output."""

    study: PhantomStudy
    volume: Volume
    datasets: list[Dataset]
    label_map: np.ndarray | None


def phantom_case(kind: str, outdir: Path, *, seed: int, orientation: str = "axial") -> PhantomCase:
    """Write a phantom and load it; ``label_map`` (uint16) is in the volume's slice order.

    The phantom's labels are in file order and the volume sorts its slices along the normal, so
    the labels are mapped to the volume's slices by SOP Instance UID.
    """
    study = write_phantom(kind, outdir, seed=seed, orientation=orientation)
    volume = load_series(list(study.paths))
    datasets: list[Dataset] = [pydicom.dcmread(path) for path in study.paths]
    label_map = None
    if study.labels is not None:
        index = {str(ds.SOPInstanceUID): k for k, ds in enumerate(datasets)}
        label_map = study.labels[[index[uid] for uid, _ in volume.sources]].astype(np.uint16)
    return PhantomCase(study, volume, datasets, label_map)


def demo_bundle(name: str, scratch: Path) -> BundleInfo:
    """The BundleInfo of demo bundle ``models/<name>``.

    The demo weights are trained by ``models/train.py``; while a bundle has none yet, its
    configuration is copied to ``scratch`` with placeholder weights, since what the SEG and SR
    use (name, version, labels and codes) comes from the configuration, and only the checksum
    from the weights.
    """
    path = REPO / "models" / name
    if not (path / "configs").is_dir():
        pytest.skip(f"demo bundle {name} not found in {path.parent}")
    try:
        return inspect_bundle(path)
    except BundleError as exc:
        if [item for item in exc.missing if "model.pt" not in item]:
            raise
    copy = scratch / name
    shutil.copytree(path / "configs", copy / "configs")
    (copy / "models").mkdir()
    (copy / "models" / "model.pt").write_bytes(b"placeholder weights for tests")
    return inspect_bundle(copy)


def to_grid(array: np.ndarray, affine: np.ndarray, volume: Volume) -> np.ndarray:
    """Put ``array`` with highdicom's ``affine`` ((slice, row, column) -> LPS) on ``volume``'s
    voxel grid, zero elsewhere; fails unless its voxels are voxels of that grid.

    A SEG without empty frames gives a volume of only the slices it has frames at, hence a part
    of the grid.
    """
    mapping = np.linalg.inv(volume.affine) @ affine
    assert np.allclose(mapping, np.rint(mapping), atol=1e-3), mapping
    permutation = np.rint(mapping[:3, :3])
    assert np.array_equal(np.abs(permutation).sum(axis=0), np.ones(3)), mapping
    assert array.size <= volume.array.size, (array.shape, volume.array.shape)
    indices = np.indices(array.shape).reshape(3, -1)
    ijk = np.rint(permutation @ indices + mapping[:3, 3:4]).astype(np.intp)
    shape = volume.array.shape
    for axis, size in zip((2, 1, 0), shape, strict=True):  # ijk is (column, row, slice)
        assert ijk[axis].min() >= 0 and ijk[axis].max() < size
    out = np.zeros(shape, dtype=array.dtype)
    out[ijk[2], ijk[1], ijk[0]] = array.ravel()
    return out
