"""The demo bundles on DICOM phantoms they were never trained on (training used seeds >= 10000):
accuracy, geometry in patient space, and parity with MONAI's own bundle workflow."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from pacsai.inference.bundle import inspect_bundle
from pacsai.inference.model import LPS_TO_RAS, LoadedModel
from pacsai.inference.volume import Volume, load_series
from pacsai.phantom import write_phantom
from tests.support import REPO

MODELS = REPO / "models"
CT_LABELS = {1: "liver", 2: "spleen", 3: "kidney"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ct_model() -> LoadedModel:
    return LoadedModel(inspect_bundle(MODELS / "ct_abdomen_demo"), torch.device("cpu"))


@pytest.fixture(scope="module")
def mr_model() -> LoadedModel:
    return LoadedModel(inspect_bundle(MODELS / "mr_brain_lesion_demo"), torch.device("cpu"))


@pytest.fixture(scope="module")
def cr_model() -> LoadedModel:
    return LoadedModel(inspect_bundle(MODELS / "cxr_findings_demo"), torch.device("cpu"))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def auc(scores: list[float], truth: list[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count half)."""
    positives = [s for s, t in zip(scores, truth, strict=True) if t]
    negatives = [s for s, t in zip(scores, truth, strict=True) if not t]
    assert positives and negatives
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def segment(
    model: LoadedModel,
    folder: Path,
    kind: str,
    seed: int,
    orientation: str = "axial",
    spacing: float | None = None,
) -> tuple[Volume, np.ndarray, np.ndarray]:
    """Write a phantom as DICOM, load it as pacsai does, run the model.

    Returns the volume, the predicted label map and the ground truth, both in the volume's slice
    order (the files are in acquisition order, which the volume sorts along the normal).
    """
    study = write_phantom(
        kind,
        folder / f"{kind}-{seed}-{orientation}",
        seed=seed,
        orientation=orientation,
        spacing=spacing,
    )
    volume = load_series(study.paths)
    output = model.predict(volume)
    assert output.label_map is not None and study.labels is not None
    slice_of = {
        str(dcmread(path, stop_before_pixels=True).SOPInstanceUID): k
        for k, path in enumerate(study.paths)
    }
    truth = study.labels[[slice_of[uid] for uid, _ in volume.sources]]
    return volume, output.label_map, truth


def test_ct_demo_dice_on_unseen_phantoms(ct_model: LoadedModel, tmp_path: Path) -> None:
    scores: dict[str, list[float]] = {name: [] for name in CT_LABELS.values()}
    for seed in (101, 202, 303):
        _, predicted, truth = segment(ct_model, tmp_path, "ct", seed)
        for value, name in CT_LABELS.items():
            scores[name].append(dice(predicted == value, truth == value))
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    print("CT mean Dice", means)
    assert all(mean >= 0.90 for mean in means.values()), means


def test_mr_demo_dice_on_unseen_phantoms(mr_model: LoadedModel, tmp_path: Path) -> None:
    scores = []
    for seed in (101, 202, 303):
        _, predicted, truth = segment(mr_model, tmp_path, "mr", seed)
        scores.append(dice(predicted == 1, truth == 1))
    print("MR lesion Dice", scores)
    assert float(np.mean(scores)) >= 0.90, scores


def test_cr_demo_auc_on_unseen_phantoms(cr_model: LoadedModel, tmp_path: Path) -> None:
    probabilities: dict[str, list[float]] = {"nodule": [], "effusion": []}
    truth: dict[str, list[bool]] = {"nodule": [], "effusion": []}
    for seed in range(100, 180):
        study = write_phantom("cr", tmp_path / f"cr-{seed}", seed=seed)
        output = cr_model.predict(load_series(study.paths))
        assert output.probabilities is not None and study.findings is not None
        for name in probabilities:
            probabilities[name].append(output.probabilities[name])
            truth[name].append(bool(getattr(study.findings, name)))
    aucs = {name: auc(probabilities[name], truth[name]) for name in probabilities}
    print("CR AUC", aucs)
    assert all(value >= 0.95 for value in aucs.values()), aucs


def to_patient_space(volume: Volume, label_map: np.ndarray, reference: Volume) -> np.ndarray:
    """``label_map`` (on ``volume``'s grid) sampled at the voxel centres of ``reference``
    through patient coordinates, nearest neighbour; -1 where ``volume`` does not cover."""
    k, j, i = np.indices(reference.array.shape)
    voxels = np.stack([i, j, k, np.ones_like(i)], axis=-1).reshape(-1, 4).T
    patient = reference.affine @ voxels
    index = np.rint(np.linalg.inv(volume.affine) @ patient)[:3].astype(int)  # (i, j, k)
    shape = volume.array.shape  # (k, j, i)
    inside = (
        (index[0] >= 0)
        & (index[0] < shape[2])
        & (index[1] >= 0)
        & (index[1] < shape[1])
        & (index[2] >= 0)
        & (index[2] < shape[0])
    )
    out = np.full(index.shape[1], -1, dtype=np.int32)
    out[inside] = label_map[index[2][inside], index[1][inside], index[0][inside]]
    return out.reshape(reference.array.shape)


def test_ct_geometry_is_the_same_in_patient_space_whatever_the_slice_orientation(
    ct_model: LoadedModel, tmp_path: Path
) -> None:
    orientations = ("axial", "axial-reversed", "sagittal", "oblique")
    # 1.5 mm voxels, so that comparing in patient space (nearest neighbour between grids rotated
    # against each other) costs little; the bundle resamples to its own 3 mm anyway.
    runs = {o: segment(ct_model, tmp_path, "ct", 404, o, spacing=1.5) for o in orientations}
    reference = runs["axial"][0]
    truth_dice = {
        o: {name: dice(pred == v, truth == v) for v, name in CT_LABELS.items()}
        for o, (_, pred, truth) in runs.items()
    }
    in_patient = {o: to_patient_space(vol, pred, reference) for o, (vol, pred, _) in runs.items()}
    covered = np.all([m >= 0 for m in in_patient.values()], axis=0)
    assert covered.mean() > 0.9
    print("Dice against truth per orientation", truth_dice)
    for a in orientations:
        for b in orientations:
            if a < b:
                for value, name in CT_LABELS.items():
                    score = dice(
                        (in_patient[a] == value) & covered, (in_patient[b] == value) & covered
                    )
                    assert score >= 0.95, (a, b, name, score)
        for name in CT_LABELS.values():
            assert truth_dice[a][name] >= truth_dice["axial"][name] - 0.02, (a, name, truth_dice)
    # Laterality: the liver is on the patient's right (negative x in LPS), the spleen on the left.
    volume, predicted, _ = runs["oblique"]
    for value, sign in ((1, -1), (2, 1)):
        k, j, i = np.nonzero(predicted == value)
        centroid = volume.affine @ np.array([i.mean(), j.mean(), k.mean(), 1.0])
        assert np.sign(centroid[0]) == sign


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")
def test_mask_equals_monai_bundle_workflow_on_the_same_volume_as_nifti(
    ct_model: LoadedModel, tmp_path: Path
) -> None:
    """The zoo bundle (UNet; Orientationd, Spacingd, ScaleIntensityRanged; Invertd) run by
    MONAI's own ConfigWorkflow on a NIfTI of the volume gives pacsai's mask from the DICOM."""
    nib = pytest.importorskip("nibabel")
    from monai.bundle import ConfigWorkflow

    volume, ours, _ = segment(ct_model, tmp_path, "ct", 505, "sagittal")
    data_dir = tmp_path / "nifti"
    data_dir.mkdir()
    nib.save(
        nib.Nifti1Image(volume.array.transpose(2, 1, 0), LPS_TO_RAS @ volume.affine),
        data_dir / "volume.nii.gz",
    )
    bundle = tmp_path / "bundle"
    shutil.copytree(MODELS / "ct_abdomen_demo", bundle)
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(bundle),
        dataset_dir=str(data_dir),
        output_dir=str(tmp_path / "out"),
        device="$torch.device('cpu')",
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    written = nib.load(next((tmp_path / "out").glob("*.nii.gz")))
    assert np.allclose(written.affine, LPS_TO_RAS @ volume.affine, atol=1e-4)
    theirs = np.asarray(written.dataobj).squeeze().transpose(2, 1, 0)
    assert theirs.shape == ours.shape
    differ = float(np.mean(theirs != ours))
    assert differ <= 0.001, differ
    assert len(np.unique(ours)) == 4  # a real segmentation, not an empty mask on both sides


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to PyTorch")
def test_ct_demo_on_cuda_with_amp_matches_cpu(ct_model: LoadedModel, tmp_path: Path) -> None:
    gpu_model = LoadedModel(ct_model.bundle, torch.device("cuda"), amp=True)
    study = write_phantom("ct", tmp_path / "ct", seed=606)
    volume = load_series(study.paths)
    on_gpu = gpu_model.predict(volume).label_map
    on_cpu = ct_model.predict(volume).label_map
    assert on_gpu is not None and on_cpu is not None
    assert float(np.mean(on_gpu != on_cpu)) < 0.002
    for value in CT_LABELS:
        assert dice(on_gpu == value, study.labels == value) >= 0.90  # type: ignore[operator]
