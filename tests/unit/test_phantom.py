"""The synthetic phantoms: grids, anatomy, reproducibility, orientation independence, DICOM."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.sr.codedict import codes

from pacsai.phantom import (
    OBLIQUE_ANGLES_DEG,
    ChestFindings,
    ChestRadiograph,
    CTAbdomen,
    Grid,
    MRBrain,
    PhantomStudy,
    default_grid,
    write_phantom,
)
from tests.support import require_tool

CT_FOV = (384.0, 384.0, 192.0)


# --- helpers ------------------------------------------------------------------------------------


def resample_nearest(
    labels: npt.NDArray[np.uint8], grid: Grid, points: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """``labels`` (on ``grid``) at LPS ``points``, nearest neighbour via the inverse affine."""
    homogeneous = np.concatenate([points, np.ones((*points.shape[:-1], 1))], axis=-1)
    ijk = homogeneous @ np.linalg.inv(grid.affine()).T  # (column i, row j, slice k, 1)
    index = np.rint(ijk[..., [2, 1, 0]]).astype(int)
    shape = np.array(grid.shape)
    inside = np.all((index >= 0) & (index < shape), axis=-1)
    index = np.clip(index, 0, shape - 1)
    return labels[index[..., 0], index[..., 1], index[..., 2]], inside


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def centroid(labels: npt.NDArray[np.uint8], grid: Grid, label: int) -> npt.NDArray[np.float64]:
    return grid.points()[labels == label].mean(axis=0)  # type: ignore[no-any-return]


def dciodvfy_errors(path: Path) -> list[str]:
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


def position_of_pixel(ds: pydicom.Dataset, row: int, column: int) -> npt.NDArray[np.float64]:
    """PS3.3 C.7.6.2.1.1: the LPS centre of pixel (row, column) from IPP, IOP and PixelSpacing."""
    origin = np.array(ds.ImagePositionPatient, dtype=float)
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return origin + column * column_spacing * orientation[:3] + row * row_spacing * orientation[3:]


# --- Grid -----------------------------------------------------------------------------------------


def test_axial_grid_is_centred_and_follows_the_standard_display() -> None:
    grid = Grid.axial(CT_FOV, 3.0)
    assert grid.shape == (64, 128, 128)
    assert grid.spacing == (3.0, 3.0, 3.0)
    np.testing.assert_array_equal(grid.row_direction, [1, 0, 0])
    np.testing.assert_array_equal(grid.column_direction, [0, 1, 0])
    np.testing.assert_array_equal(grid.slice_direction, [0, 0, 1])
    points = grid.points()
    assert points.shape == (64, 128, 128, 3)
    assert points.dtype == np.float64
    np.testing.assert_allclose(points.mean(axis=(0, 1, 2)), 0.0, atol=1e-9)
    np.testing.assert_allclose(points[0, 0, 0], [-190.5, -190.5, -94.5])
    # columns run right -> left (+x), rows anterior -> posterior (+y), slices inferior -> superior
    assert points[0, 0, 1, 0] > points[0, 0, 0, 0]
    assert points[0, 1, 0, 1] > points[0, 0, 0, 1]
    assert points[1, 0, 0, 2] > points[0, 0, 0, 2]


def test_affine_maps_column_row_slice_to_the_voxel_centres() -> None:
    grid = Grid.oblique(CT_FOV, (2.5, 3.0, 3.5), angles_deg=(10.0, 20.0, -30.0))
    points = grid.points()
    affine = grid.affine()
    for k, j, i in [(0, 0, 0), (3, 7, 11), (grid.shape[0] - 1, grid.shape[1] - 1, 5)]:
        np.testing.assert_allclose(affine @ [i, j, k, 1], [*points[k, j, i], 1.0], atol=1e-9)
        np.testing.assert_allclose(grid.continuous_index(points[k, j, i]), [k, j, i], atol=1e-9)


def test_reversed_axial_starts_at_the_top() -> None:
    grid = Grid.axial(CT_FOV, 3.0, reverse=True)
    np.testing.assert_array_equal(grid.slice_direction, [0, 0, -1])
    points = grid.points()
    assert points[0, 0, 0, 2] == pytest.approx(94.5)
    np.testing.assert_allclose(points, Grid.axial(CT_FOV, 3.0).points()[::-1])


@pytest.mark.parametrize(
    ("make", "orientation"),
    [(Grid.sagittal, [0, 1, 0, 0, 0, -1]), (Grid.coronal, [1, 0, 0, 0, 0, -1])],
)
def test_sagittal_and_coronal_cover_the_axial_voxel_centres(
    make: Callable[[tuple[float, float, float], float], Grid], orientation: list[int]
) -> None:
    grid = make(CT_FOV, 3.0)
    np.testing.assert_array_equal([*grid.row_direction, *grid.column_direction], orientation)
    assert abs(float(grid.slice_direction @ grid.normal)) == pytest.approx(1.0)
    assert np.prod(grid.shape) == 64 * 128 * 128
    axial = Grid.axial(CT_FOV, 3.0).points().reshape(-1, 3)
    mine = grid.points().reshape(-1, 3)
    order = np.lexsort(axial.T)
    np.testing.assert_allclose(mine[np.lexsort(mine.T)], axial[order], atol=1e-9)


def test_oblique_grid_is_rotated_and_covers_the_axial_box() -> None:
    grid = Grid.oblique(CT_FOV, 3.0, angles_deg=OBLIQUE_ANGLES_DEG)
    basis = np.stack([grid.row_direction, grid.column_direction, grid.slice_direction])
    np.testing.assert_allclose(basis @ basis.T, np.eye(3), atol=1e-12)
    assert np.all(np.abs(basis - np.eye(3)).max(axis=1) > 0.05)  # every axis is tilted
    index = grid.continuous_index(Grid.axial(CT_FOV, 3.0).points())
    assert np.all(index >= -0.5)
    assert np.all(index <= np.array(grid.shape) - 0.5)
    np.testing.assert_allclose(grid.points().mean(axis=(0, 1, 2)), 0.0, atol=1e-9)
    assert Grid.oblique(CT_FOV, 3.0, angles_deg=(0, 0, 0)) == Grid.axial(CT_FOV, 3.0)


def test_grid_rejects_sheared_directions_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="orthonormal"):
        Grid(
            (2, 2, 2),
            (1, 1, 1),
            np.array([1, 0, 0]),
            np.array([0.1, 1, 0]),
            np.eye(3)[2],
            0 * np.eye(3)[0],
        )
    with pytest.raises(ValueError, match="spacing"):
        Grid.axial(CT_FOV, 0.0)
    with pytest.raises(ValueError, match="fov_mm"):
        Grid.axial((100.0, -1.0, 100.0), 1.0)


# --- CT abdomen ---------------------------------------------------------------------------------


def test_ct_same_seed_same_arrays_and_other_seeds_other_bodies() -> None:
    grid = Grid.axial(CT_FOV, 3.0)
    hu, labels = CTAbdomen(5).render(grid)
    hu_again, labels_again = CTAbdomen(5).render(grid)
    np.testing.assert_array_equal(hu, hu_again)
    np.testing.assert_array_equal(labels, labels_again)
    assert hu.dtype == np.float32 and labels.dtype == np.uint8
    assert hu.shape == labels.shape == grid.shape
    other_hu, other_labels = CTAbdomen(6).render(grid)
    assert np.count_nonzero(other_labels != labels) > 1000
    assert not np.array_equal(other_hu, hu)


def test_ct_organ_volumes_and_intensities_are_plausible() -> None:
    grid = Grid.axial(CT_FOV, 3.0)
    millilitres = 27 / 1000
    for seed in range(4):
        phantom = CTAbdomen(seed)
        hu, labels = phantom.render(grid, noise=False)
        x = grid.points()[..., 0]
        liver = np.count_nonzero(labels == 1) * millilitres
        spleen = np.count_nonzero(labels == 2) * millilitres
        kidneys = [np.count_nonzero((labels == 3) & side) * millilitres for side in (x < 0, x > 0)]
        assert 600 < liver < 1500, seed
        assert 120 < spleen < 450, seed
        assert all(50 < kidney < 200 for kidney in kidneys), (seed, kidneys)
        assert liver > spleen > max(kidneys), (seed, liver, spleen, kidneys)
        # deep inside each organ the clean image has exactly the documented value
        for label, value in {1: 100.0, 2: 140.0, 3: 200.0}.items():
            assert np.median(hu[labels == label]) == pytest.approx(value, abs=0.5)
        assert hu[0, 0, 0] == pytest.approx(CTAbdomen.AIR_HU)
        assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_ct_organs_never_touch_over_many_seeds() -> None:
    for seed in range(40):
        phantom = CTAbdomen(seed)
        shapes = [organ.shape for organ in phantom.organs]
        for n, first in enumerate(shapes):
            for second in shapes[n + 1 :]:
                assert not np.any(second.contains(first.surface_points(2000)))
            assert np.all(phantom.soft_tissue.contains(first.surface_points(2000)))


def test_ct_laterality_in_lps() -> None:
    grid = Grid.axial(CT_FOV, 3.0)
    for seed in range(3):
        _, labels = CTAbdomen(seed).render(grid, noise=False)
        liver, spleen = centroid(labels, grid, 1), centroid(labels, grid, 2)
        assert liver[0] < -20, "the liver is on the patient's right (negative x in LPS)"
        assert spleen[0] > 20, "the spleen is on the patient's left (positive x in LPS)"
        assert spleen[1] > liver[1], "the spleen is posterior to the liver"
        kidney_points = grid.points()[labels == 3]
        assert np.count_nonzero(kidney_points[:, 0] < 0) > 100
        assert np.count_nonzero(kidney_points[:, 0] > 0) > 100
        assert kidney_points[:, 1].mean() > 20, "the kidneys are posterior"


def test_ct_noise_is_seeded_by_phantom_and_grid() -> None:
    phantom = CTAbdomen(2)
    grid = Grid.axial(CT_FOV, 3.0)
    clean, labels = phantom.render(grid, noise=False)
    noisy, noisy_labels = phantom.render(grid)
    np.testing.assert_array_equal(labels, noisy_labels)
    liver = labels == 1
    assert np.std(noisy[liver] - clean[liver]) == pytest.approx(CTAbdomen.NOISE_SIGMA, rel=0.1)
    assert abs(float(np.mean(noisy[liver] - clean[liver]))) < 1.0
    shifted = Grid.axial(CT_FOV, 3.0, reverse=True)
    assert not np.array_equal(phantom.render(shifted)[0][::-1], noisy)
    assert noisy.min() >= -1024.0 and noisy.max() <= 3071.0


def test_ct_renders_agree_exactly_on_grids_sharing_voxel_centres() -> None:
    phantom = CTAbdomen(4)
    axial_hu, axial = phantom.render(Grid.axial(CT_FOV, 3.0), noise=False)
    reversed_hu, reversed_labels = phantom.render(
        Grid.axial(CT_FOV, 3.0, reverse=True), noise=False
    )
    np.testing.assert_array_equal(reversed_labels[::-1], axial)
    np.testing.assert_allclose(reversed_hu[::-1], axial_hu, atol=1e-3)
    # sagittal (x, -z, y) and coronal (y, -z, x) hold the same voxels, permuted
    sagittal_hu, sagittal = phantom.render(Grid.sagittal(CT_FOV, 3.0), noise=False)
    np.testing.assert_array_equal(sagittal.transpose(1, 2, 0)[::-1], axial)
    np.testing.assert_allclose(sagittal_hu.transpose(1, 2, 0)[::-1], axial_hu, atol=1e-3)
    coronal_hu, coronal = phantom.render(Grid.coronal(CT_FOV, 3.0), noise=False)
    np.testing.assert_array_equal(coronal.transpose(1, 0, 2)[::-1], axial)
    np.testing.assert_allclose(coronal_hu.transpose(1, 0, 2)[::-1], axial_hu, atol=1e-3)


@pytest.mark.slow
def test_ct_labels_agree_in_patient_space_across_orientations() -> None:
    # 1.5 mm, so that nearest-neighbour resampling itself costs less than 2 % Dice.
    fov, spacing = (300.0, 240.0, 192.0), 1.5
    phantom = CTAbdomen(7)
    axial_grid = Grid.axial(fov, spacing)
    reference = phantom.render(axial_grid, noise=False)[1]
    points = axial_grid.points()
    variants = {
        "axial-reversed": Grid.axial(fov, spacing, reverse=True),
        "sagittal": Grid.sagittal(fov, spacing),
        "oblique": Grid.oblique(fov, spacing, angles_deg=OBLIQUE_ANGLES_DEG),
    }
    for name, grid in variants.items():
        labels = phantom.render(grid, noise=False)[1]
        sampled, inside = resample_nearest(labels, grid, points)
        assert inside.all(), name
        for label in CTAbdomen.LABELS:
            score = dice((reference == label) & inside, (sampled == label) & inside)
            assert score >= 0.97, (name, CTAbdomen.LABELS[label], score)
            if name != "oblique":
                assert score == 1.0, (name, label)
        liver, spleen = centroid(labels, grid, 1), centroid(labels, grid, 2)
        assert liver[0] < 0 < spleen[0], name


# --- MR brain -----------------------------------------------------------------------------------


def test_mr_is_reproducible_and_lesions_are_plausible() -> None:
    grid = default_grid("mr")
    signal, labels = MRBrain(3).render(grid)
    again, labels_again = MRBrain(3).render(grid)
    np.testing.assert_array_equal(signal, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert signal.dtype == np.float32
    assert signal.min() >= 0.0 and signal.max() < 1600.0
    counts = set()
    for seed in range(12):
        phantom = MRBrain(seed)
        counts.add(len(phantom.lesions))
        assert 1 <= len(phantom.lesions) <= 4
        for lesion in phantom.lesions:
            radius = float(lesion.semi_axes[0])
            assert 6.0 <= radius <= 14.0
            surface = lesion.surface_points(500)
            assert np.all(phantom.brain.signed_distance(surface) < 0)
            for ventricle in phantom.ventricles:
                assert not np.any(ventricle.contains(surface))
    assert len(counts) >= 3
    assert not np.array_equal(MRBrain(4).render(grid)[1], labels)


def test_mr_intensities_and_bias_field() -> None:
    phantom = MRBrain(1)
    grid = default_grid("mr")
    clean, labels = phantom.render(grid, noise=False)
    points = grid.points()
    bias = phantom.bias_field(points)
    assert bias.min() >= 0.9 and bias.max() <= 1.1
    assert bias.max() - bias.min() > 0.02
    lesion = labels == 1
    cores = [other.signed_distance(points) < -6 for other in phantom.lesions]
    assert any(core.any() for core in cores)
    for core in cores:
        np.testing.assert_allclose(clean[core] / bias[core], MRBrain.LESION_SIGNAL, rtol=1e-3)
        assert np.all(labels[core] == 1)
    # 6 mm from every surface, beyond the reach of the soft edges
    brain = (phantom.brain.signed_distance(points) < -6) & ~lesion
    for ventricle in phantom.ventricles:
        brain &= ventricle.signed_distance(points) > 6
    for other in phantom.lesions:
        brain &= other.signed_distance(points) > 6
    np.testing.assert_allclose(clean[brain] / bias[brain], MRBrain.BRAIN_SIGNAL, rtol=1e-3)
    assert clean[0, 0, 0] == 0.0
    noisy = phantom.render(grid)[0]
    assert np.std(noisy[brain] - clean[brain]) == pytest.approx(MRBrain.NOISE_SIGMA, rel=0.1)


# --- chest radiograph ---------------------------------------------------------------------------


def test_chest_findings_follow_the_argument() -> None:
    for nodule in (False, True):
        for effusion in (False, True):
            findings = ChestFindings(nodule=nodule, effusion=effusion)
            assert ChestRadiograph(3, findings).findings == findings
    assert ChestFindings.FINDINGS == ("nodule", "effusion")
    with pytest.raises(TypeError):
        ChestFindings(nodule=1, effusion=False)  # type: ignore[arg-type]


def test_chest_seed_draws_both_states_of_each_finding() -> None:
    drawn = [ChestRadiograph(seed).findings for seed in range(50)]
    assert {f.nodule for f in drawn} == {False, True}
    assert {f.effusion for f in drawn} == {False, True}
    assert 10 <= sum(f.nodule for f in drawn) <= 40
    assert drawn == [ChestRadiograph(seed).findings for seed in range(50)]


def test_chest_image_is_reproducible_and_in_range() -> None:
    image = ChestRadiograph(8).render()
    assert image.shape == (256, 256) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 4095.0
    np.testing.assert_array_equal(image, ChestRadiograph(8).render())
    assert not np.array_equal(image, ChestRadiograph(9).render())
    assert ChestRadiograph(8).render(rows=64, columns=80, pixel_spacing=5.0).shape == (64, 80)
    # bright = dense: the mediastinum is brighter than the lung fields, air is darkest
    column_of_lung = 256 // 2 - int(75 / 1.4)
    assert image[100, 128] > image[100, column_of_lung] > image[100, 2]


def test_chest_nodule_changes_the_image_only_where_it_is() -> None:
    for seed in range(6):
        without = ChestRadiograph(seed, ChestFindings(nodule=False, effusion=False)).render()
        with_nodule = ChestRadiograph(seed, ChestFindings(nodule=True, effusion=False)).render()
        changed = np.argwhere(with_nodule != without)
        assert len(changed) > 0
        centre = changed.mean(axis=0)
        radius = np.abs(changed - centre).max()
        assert 4 <= radius <= 13, (seed, radius)  # 5-12 pixels
        assert len(changed) <= np.pi * (radius + 1) ** 2
        r, c = np.rint(centre).astype(int)
        assert with_nodule[r, c] - without[r, c] > 400  # a clear opacity...
        assert without[r, c] < np.median(without[:, 100:156])  # ...in a dark lung field


def test_chest_effusion_fills_the_base_of_one_lung() -> None:
    for seed in range(6):
        without = ChestRadiograph(seed, ChestFindings(nodule=False, effusion=False)).render()
        with_fluid = ChestRadiograph(seed, ChestFindings(nodule=False, effusion=True)).render()
        changed = np.argwhere(np.abs(with_fluid - without) > 50)
        assert len(changed) > 300, seed
        assert changed[:, 0].min() > 256 * 0.45, "the fluid lies in the lower chest"
        sides = {bool(c > 128) for c in changed[:, 1]}
        assert len(sides) == 1, "in one lung only"
        assert (with_fluid - without)[tuple(changed.T)].mean() > 300


# --- DICOM ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_axial(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return write_phantom("ct", tmp_path_factory.mktemp("ct"), seed=11)


@pytest.fixture(scope="module")
def ct_oblique(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return write_phantom("ct", tmp_path_factory.mktemp("ct"), seed=11, orientation="oblique")


@pytest.fixture(scope="module")
def mr_reversed(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return write_phantom("mr", tmp_path_factory.mktemp("mr"), seed=2, orientation="axial-reversed")


@pytest.fixture(scope="module")
def cr_study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return write_phantom("cr", tmp_path_factory.mktemp("cr"), seed=5, patient_id="MY-PATIENT")


def check_geometry(study: PhantomStudy) -> Sequence[pydicom.Dataset]:
    """IPP, IOP, PixelSpacing and InstanceNumber against the study's Grid; returns the files."""
    grid = study.grid
    assert grid is not None
    datasets = [pydicom.dcmread(path) for path in study.paths]
    assert len(datasets) == grid.shape[0]
    points = grid.points()
    for k, ds in enumerate(datasets):
        assert ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns) == grid.shape[1:]
        np.testing.assert_allclose(
            [float(v) for v in ds.ImageOrientationPatient],
            [*grid.row_direction, *grid.column_direction],
            atol=1e-9,
        )
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], grid.spacing[1:])
        for row, column in [(0, 0), (0, grid.shape[2] - 1), (grid.shape[1] - 1, 3)]:
            np.testing.assert_allclose(
                position_of_pixel(ds, row, column), points[k, row, column], atol=1e-6
            )
    return datasets


def check_header(ds: pydicom.Dataset, study: PhantomStudy) -> None:
    assert ds.StudyInstanceUID == study.study_instance_uid
    assert ds.SeriesInstanceUID == study.series_instance_uid
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Manufacturer == "pacsai phantom"
    assert ds.BitsStored == 12 and ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    for keyword in (
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "SeriesNumber",
        "SeriesDescription",
        "WindowCenter",
        "ImageType",
    ):
        assert ds.get(keyword) not in (None, ""), keyword


def check_segmentation(
    study: PhantomStudy, datasets: Sequence[pydicom.Dataset]
) -> hd.seg.Segmentation:
    seg = hd.seg.segread(study.truth_path)
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == study.study_instance_uid
    assert seg.SeriesInstanceUID != study.series_instance_uid
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    labels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in datasets], combine_segments=True
    )
    np.testing.assert_array_equal(labels, study.labels)
    for number in seg.get_segment_numbers():
        description = seg.get_segment_description(number)
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = description.algorithm_identification
        assert algorithm is not None
        assert algorithm[0].AlgorithmName == "pacsai phantom ground truth"
    return seg


def test_write_ct_axial(ct_axial: PhantomStudy) -> None:
    study = ct_axial
    assert study.kind == "ct" and study.findings is None
    assert study.grid == default_grid("ct")
    assert [p.name for p in study.paths[:2]] == ["IMG0001.dcm", "IMG0002.dcm"]
    assert study.paths[0].parent.name == "CT_AXIAL"
    datasets = check_geometry(study)
    first = datasets[0]
    check_header(first, study)
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.Modality == "CT" and first.BodyPartExamined == "ABDOMEN"
    assert first.StudyDescription == "CT ABDOMEN PHANTOM"
    assert str(first.PatientName) == "PHANTOM^CT^S11" and first.PatientID == "PACSAI-PH-CT-11"
    assert (float(first.RescaleIntercept), float(first.RescaleSlope)) == (-1024.0, 1.0)
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    hu, labels = CTAbdomen(11).render(study.grid)
    np.testing.assert_array_equal(labels, study.labels)
    stored = np.stack([ds.pixel_array for ds in datasets]).astype(np.float64)
    np.testing.assert_allclose(stored * 1.0 - 1024.0, hu, atol=0.5 + 1e-3)
    assert first.SliceThickness == 3.0


def test_write_ct_axial_segmentation(ct_axial: PhantomStudy) -> None:
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in ct_axial.paths]
    seg = check_segmentation(ct_axial, datasets)
    assert seg.get_segment_numbers() == [1, 2, 3]
    for number, code in zip(
        [1, 2, 3], [codes.SCT.Liver, codes.SCT.Spleen, codes.SCT.Kidney], strict=True
    ):
        assert seg.get_segment_description(number).segmented_property_type == code
    category = seg.get_segment_description(1).segmented_property_category
    assert category == codes.cid7150.AnatomicalStructure


def test_write_ct_oblique(ct_oblique: PhantomStudy) -> None:
    grid = ct_oblique.grid
    assert grid == default_grid("ct", "oblique")
    datasets = check_geometry(ct_oblique)
    hu = CTAbdomen(11).render(grid)[0]
    stored = np.stack([ds.pixel_array for ds in datasets]).astype(np.float64)
    np.testing.assert_allclose(stored - 1024.0, hu, atol=0.5 + 1e-3)
    check_segmentation(ct_oblique, datasets)


def test_write_mr_reversed(mr_reversed: PhantomStudy) -> None:
    datasets = check_geometry(mr_reversed)
    first = datasets[0]
    check_header(first, mr_reversed)
    assert first.SOPClassUID == pydicom.uid.MRImageStorage
    assert first.Modality == "MR" and first.BodyPartExamined == "BRAIN"
    assert first.StudyDescription == "MR BRAIN PHANTOM"
    assert "RescaleIntercept" not in first
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z == sorted(z, reverse=True), "instance 1 is the most superior slice"
    signal = MRBrain(2).render(mr_reversed.grid)[0]  # type: ignore[arg-type]
    stored = np.stack([ds.pixel_array for ds in datasets]).astype(np.float64)
    np.testing.assert_allclose(stored, signal, atol=0.5 + 1e-3)
    seg = check_segmentation(mr_reversed, datasets)
    description = seg.get_segment_description(1)
    assert description.segmented_property_type == codes.SCT.Lesion
    assert description.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure


def test_write_cr(cr_study: PhantomStudy) -> None:
    assert cr_study.grid is None and cr_study.labels is None
    assert cr_study.findings == ChestRadiograph(5).findings
    assert json.loads(cr_study.truth_path.read_text()) == cr_study.findings.as_dict()
    (path,) = cr_study.paths
    ds = pydicom.dcmread(path)
    check_header(ds, cr_study)
    assert ds.SOPClassUID == pydicom.uid.ComputedRadiographyImageStorage
    assert ds.Modality == "CR" and ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA"
    assert ds.PatientID == "MY-PATIENT"
    assert ds.StudyDescription == "CHEST PA PHANTOM"
    np.testing.assert_allclose(ds.pixel_array, ChestRadiograph(5).render(), atol=0.5 + 1e-3)


@pytest.mark.parametrize("fixture", ["ct_axial", "mr_reversed", "cr_study"])
def test_dciodvfy_finds_no_errors(fixture: str, request: pytest.FixtureRequest) -> None:
    study: PhantomStudy = request.getfixturevalue(fixture)
    assert dciodvfy_errors(study.paths[0]) == []
    if study.truth_path.suffix == ".dcm":
        assert dciodvfy_errors(study.truth_path) == []


def test_each_write_is_a_new_study_of_the_same_patient(tmp_path: Path) -> None:
    first = write_phantom("cr", tmp_path / "a", seed=1)
    second = write_phantom("cr", tmp_path / "b", seed=1)
    assert first.study_instance_uid != second.study_instance_uid
    a, b = (pydicom.dcmread(s.paths[0]) for s in (first, second))
    assert (a.PatientID, a.PatientBirthDate, a.PatientSex) == (
        b.PatientID,
        b.PatientBirthDate,
        b.PatientSex,
    )
    np.testing.assert_array_equal(a.pixel_array, b.pixel_array)


def test_write_phantom_refuses_bad_arguments_and_used_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        write_phantom("pet", tmp_path)
    with pytest.raises(ValueError, match="orientation"):
        write_phantom("ct", tmp_path, orientation="diagonal")
    with pytest.raises(ValueError, match="seed"):
        write_phantom("cr", tmp_path, seed=-1)
    with pytest.raises(ValueError, match="patient_id"):
        write_phantom("cr", tmp_path, patient_id="A\\B")
    write_phantom("cr", tmp_path)
    with pytest.raises(FileExistsError, match="empty"):
        write_phantom("cr", tmp_path)
