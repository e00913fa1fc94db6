"""Real MONAI Model Zoo bundles, as their authors ship them, with random weights (issue 10).

Each bundle of ``../shared/zoo`` (or ``$PACSAI_TEST_ZOO``) is copied into the test's models folder
with random weights saved where its own config loads them (:mod:`tests.zoo_bundles`), and checked
with the code ``pacsai models check`` runs (:meth:`ModelRegistry.warm_up`: load, then one run on a
synthetic volume of the declared input). It is then either

- run on a phantom study (a small central block of it, which this CPU can afford) to a
  dciodvfy-clean SEG and an SR, with every label coded; or
- refused at check time with a reason that names what is missing.

``test_zoo_outcomes_table`` prints the table the README carries.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pacsai.inference.bundle import BundleInfo
from pacsai.inference.registry import ModelRegistry
from pacsai.inference.volume import Volume, load_datasets
from pacsai.phantom import write_phantom
from pacsai.reporting.outputs import write_result_objects
from tests.dicom_checks import dciodvfy
from tests.zoo_bundles import prepare_bundle, zoo_dir

pytestmark = pytest.mark.slow

#: bundle -> (phantom kind, number of input series) for those that run.
RUNS = {
    "spleen_ct_segmentation": ("ct", 1),
    "wholeBody_ct_segmentation": ("ct", 1),
    "pancreas_ct_dints_segmentation": ("ct", 1),
    "renalStructures_CECT_segmentation": ("ct", 3),
    "prostate_mri_anatomy": ("mr", 1),
    "brats_mri_segmentation": ("mr", 4),
    "ventricular_short_axis_3label": ("mr", 1),
}
#: bundle -> what its refusal must name.
REFUSALS = {
    "swin_unetr_btcv_segmentation": ["'Left Kideny' has no coded meaning", "misspelt"],
    "segmentation_template": ["instead of 'none'", "label 'category 1' has no coded meaning"],
    "classification_template": ["instead of 'none'", "label 'circle' has no coded meaning"],
    "breast_density_classification": ["package torchvision", "built for the installed torch"],
    "pathology_nuclei_classification": ["colour (RGB) images and a mask channel"],
    "endoscopic_inbody_classification": ["colour (RGB) images"],
}


@pytest.fixture(scope="module")
def zoo() -> Path:
    path = zoo_dir()
    if path is None:
        pytest.skip(
            "zoo bundles not found: set PACSAI_TEST_ZOO or put shared/zoo beside the checkout"
        )
    return path


def _crop(datasets: list[Dataset], size: int, slices: int) -> list[Dataset]:
    """A central block of a series: ``size`` x ``size`` pixels of ``slices`` slices, each a
    valid instance at its true position (Image Position moved to the block's first pixel)."""
    ordered = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    start = (len(ordered) - slices) // 2
    block = []
    for ds in ordered[start : start + slices]:
        crop = copy.deepcopy(ds)
        r0, c0 = (int(ds.Rows) - size) // 2, (int(ds.Columns) - size) // 2
        pixels = ds.pixel_array[r0 : r0 + size, c0 : c0 + size]
        row, column = (
            np.asarray(ds.ImageOrientationPatient[:3]),
            np.asarray(ds.ImageOrientationPatient[3:]),
        )
        spacing = [float(v) for v in ds.PixelSpacing]
        origin = np.asarray(ds.ImagePositionPatient, dtype=float)
        origin = origin + row * spacing[1] * c0 + column * spacing[0] * r0
        crop.ImagePositionPatient = [f"{v:.4f}" for v in origin]
        crop.Rows, crop.Columns = size, size
        crop.PixelData = np.ascontiguousarray(pixels).tobytes()
        block.append(crop)
    return block


def _series(kind: str, tmp_path: Path, count: int) -> list[tuple[list[Dataset], Volume]]:
    """``count`` series of one phantom study (as several contrasts or phases: each a new series
    with its own intensities), cropped to what this CPU can afford."""
    study = write_phantom(kind, tmp_path / "phantom", seed=7)
    base = _crop(
        [
            pydicom.dcmread(p)
            for p in study.paths
            if "seg" not in p.name.lower()
            and pydicom.dcmread(p, stop_before_pixels=True).Modality != "SEG"
        ],
        24 if kind == "mr" else 32,
        16,
    )
    result = []
    for index in range(count):
        series_uid = generate_uid()
        datasets = []
        for ds in base:
            copy_ = copy.deepcopy(ds)
            copy_.SeriesInstanceUID = series_uid
            copy_.SOPInstanceUID = generate_uid()
            copy_.SeriesDescription = f"phantom contrast {index}"
            if index:  # another contrast: the same anatomy, other intensities
                pixels = copy_.pixel_array.astype(np.int32)
                pixels = np.clip(pixels.max() - pixels // (index + 1), 0, 65535)
                copy_.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
            datasets.append(copy_)
        result.append((datasets, load_datasets(datasets)))
    return result


def _check_brats(bundle: BundleInfo) -> None:
    """brats reads four MR series (its channels) and its regions overlap (sigmoid outputs):
    label values 1, 2 and 4, learned from its postprocessing."""
    assert [slot.name for slot in bundle.inputs] == ["T1c", "T1", "T2", "FLAIR"]
    assert [(label.name, label.value) for label in bundle.labels] == [
        ("Tumor core", 1),
        ("Whole tumor", 2),
        ("Enhancing tumor", 4),
    ]
    assert bundle.multi_label


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_zoo_bundle_runs_a_phantom_to_seg_and_sr(name: str, zoo: Path, tmp_path: Path) -> None:
    prepare_bundle(name, tmp_path / "models")
    registry = ModelRegistry(tmp_path / "models", device="cpu", amp=False)

    (result,) = registry.warm_up([name])

    assert result.status == "ready", result.reason
    kind, inputs = RUNS[name]
    series = _series(kind, tmp_path, inputs)
    model = registry.load(name)
    if name == "brats_mri_segmentation":  # four MR series as channels, overlapping regions
        _check_brats(model.bundle)
    output = model.predict([volume for _, volume in series])
    bundle = model.bundle
    assert output.label_map is not None
    assert all(label.category.value and label.type.value for label in bundle.labels)
    sources, volume = series[0]
    label_map = output.label_map
    if bundle.multi_label:
        assert label_map.shape == (len(bundle.labels), *volume.array.shape)
    else:
        assert label_map.shape == volume.array.shape
    if not np.any(label_map):  # random weights may find nothing: give the SEG something
        label_map = label_map.copy()
        if label_map.ndim == 4:
            label_map[:, :, :4, :4] = True
        else:
            label_map[:, :4, :4] = bundle.labels[0].value
    written = write_result_objects(
        results_dir=tmp_path / "results",
        folder=Path(name),
        sources=[ds.copy() for ds in sources],
        volume=volume,
        bundle=bundle,
        route_name=name,
        label_map=label_map,
        probabilities=None,
        outputs=["seg", "sr"],
        seg_type="BINARY",  # the form every viewer reads, and dciodvfy knows
    )
    kinds = {obj.kind: tmp_path / "results" / obj.path for obj in written}
    assert set(kinds) == {"SEG", "SR"}
    for path in kinds.values():
        verification = dciodvfy(path)
        assert verification.errors == [], verification.report()
    seg = pydicom.dcmread(kinds["SEG"])
    assert len(seg.SegmentSequence) >= 1
    if bundle.multi_label:
        assert seg.SegmentationType == "BINARY"


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_a_zoo_bundle_is_refused_naming_what_is_missing(
    name: str, zoo: Path, tmp_path: Path
) -> None:
    prepare_bundle(name, tmp_path / "models")
    registry = ModelRegistry(tmp_path / "models", device="cpu", amp=False)

    (result,) = registry.warm_up([name])

    assert result.status == "refused"
    assert result.reason is not None
    for fragment in REFUSALS[name]:
        assert fragment in result.reason
