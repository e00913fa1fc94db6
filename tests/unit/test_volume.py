"""Series to volume: geometry, ordering, decoding and every reason to refuse a series."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from pacsai.errors import UnusableSeriesError
from pacsai.inference.volume import Volume, load_datasets, load_series
from tests.support import (
    make_ct_series,
    make_ct_slice,
    make_dx_image,
    make_enhanced_ct,
    write_datasets,
)

PHILIPS_CT = "dcm_qa_ct/In/Philips/S21570/S2010"
GE_TILTED_CT = "dcm_qa_ct/In/GE"
SAGITTAL_MR = "dcm_qa_decubitus/In/HFS/3_t1_fl2d_sag"
FMRI_4D = "dcm_qa_nih/In/20180918GE/mr_0004"
PYDICOM_DATA = "pydicom-data/data_store/data"
EMRI = ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm"]
EMRI += ["emri_small_jpeg_ls_lossless.dcm"]
COMPRESSED_MR = [f"dicom2nifti/tests/data/generic/compressed_{kind}/001" for kind in
                 ("j2k", "jpeg", "jpegls", "rle")]  # fmt: skip
LEGACY_CT = "dcmqi/data/segmentations/23x38x3"
TRANSFER_SYNTAXES = "orthanc-tests/Database/TransferSyntaxes"


def series_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix != ".txt")


def normal_of(ds: Dataset) -> np.ndarray:
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def sorted_along_normal(datasets: list[Dataset]) -> list[Dataset]:
    normal = normal_of(datasets[0])
    return sorted(datasets, key=lambda ds: float(np.array(ds.ImagePositionPatient, float) @ normal))


def refusal(datasets: list[Dataset], **kwargs: float) -> str:
    with pytest.raises(UnusableSeriesError) as caught:
        load_datasets(datasets, **kwargs)
    return str(caught.value)


# --- real single-frame series -------------------------------------------------------------------


@pytest.mark.shared_data
def test_philips_ct_geometry_comes_from_the_positions(shared_dicom: Path) -> None:
    paths = series_files(shared_dicom / PHILIPS_CT)
    volume = load_series(paths)

    datasets = sorted_along_normal([pydicom.dcmread(p) for p in paths])
    first, last = datasets[0], datasets[-1]
    first_ipp = np.array(first.ImagePositionPatient, dtype=float)
    last_ipp = np.array(last.ImagePositionPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    expected_step = (last_ipp - first_ipp) / 27
    assert volume.array.shape == (28, 512, 512)
    assert volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx(
        (column_spacing, row_spacing, float(np.linalg.norm(expected_step)))
    )
    assert volume.spacing[2] == pytest.approx(5.0)
    np.testing.assert_allclose(volume.affine[:3, 2], expected_step)
    np.testing.assert_allclose(volume.affine @ [0, 0, 0, 1], [*first_ipp, 1])
    orientation = np.array(first.ImageOrientationPatient, dtype=float)
    last_pixel = (
        last_ipp + 511 * orientation[:3] * column_spacing + 511 * orientation[3:] * row_spacing
    )
    np.testing.assert_allclose(volume.affine @ [511, 511, 27, 1], [*last_pixel, 1])

    assert volume.sources[0] == (first.SOPInstanceUID, None)
    assert volume.sources[-1] == (last.SOPInstanceUID, None)
    assert [uid for uid, _ in volume.sources] == [ds.SOPInstanceUID for ds in datasets]
    slope, intercept = float(datasets[13].RescaleSlope), float(datasets[13].RescaleIntercept)
    np.testing.assert_array_equal(volume.array[13], datasets[13].pixel_array * slope + intercept)
    assert volume.array.min() == pytest.approx(-1024)
    assert np.percentile(volume.array, 5) < -950  # air around the phantom
    assert volume.array.max() < 3000
    assert volume.modality == "CT"
    assert volume.series_instance_uid == first.SeriesInstanceUID
    assert volume.frame_of_reference_uid == first.FrameOfReferenceUID
    assert volume.sop_class_uid == first.SOPClassUID
    assert not volume.is_2d


@pytest.mark.shared_data
def test_philips_ct_does_not_depend_on_file_order(shared_dicom: Path) -> None:
    paths = series_files(shared_dicom / PHILIPS_CT)
    shuffled = list(paths)
    random.Random(7).shuffle(shuffled)
    assert shuffled != paths

    reference = load_series(paths)
    for order in (shuffled, list(reversed(paths))):
        volume = load_series(order)
        np.testing.assert_array_equal(volume.array, reference.array)
        np.testing.assert_array_equal(volume.affine, reference.affine)
        assert volume.sources == reference.sources


@pytest.mark.shared_data
def test_sagittal_mr_stacks_along_patient_x(shared_dicom: Path) -> None:
    paths = series_files(shared_dicom / SAGITTAL_MR)
    volume = load_series(paths)

    datasets = sorted_along_normal([pydicom.dcmread(p) for p in paths])
    first_ipp = np.array(datasets[0].ImagePositionPatient, dtype=float)
    last_ipp = np.array(datasets[-1].ImagePositionPatient, dtype=float)
    assert volume.array.shape == (35, 256, 256)
    assert volume.spacing == pytest.approx(
        (1.015625, 1.015625, float(np.linalg.norm(last_ipp - first_ipp)) / 34)
    )
    assert volume.spacing[2] == pytest.approx(4.8, abs=1e-5)
    direction = volume.affine[:3, 2] / volume.spacing[2]
    np.testing.assert_allclose(np.abs(direction), [1, 0, 0], atol=1e-9)  # sagittal
    np.testing.assert_allclose(volume.affine[:3, 3], first_ipp)
    assert volume.modality == "MR"


@pytest.mark.shared_data
def test_ge_ct_with_gantry_tilt_is_refused(shared_dicom: Path) -> None:
    paths = series_files(shared_dicom / GE_TILTED_CT)
    datasets = sorted_along_normal([pydicom.dcmread(p) for p in paths[:2]])
    step = np.subtract(datasets[1].ImagePositionPatient, datasets[0].ImagePositionPatient)
    cosine = abs(float(step @ normal_of(datasets[0]))) / float(np.linalg.norm(step))
    tilt = math.degrees(math.acos(cosine))
    assert tilt == pytest.approx(18.5, abs=0.05)

    with pytest.raises(UnusableSeriesError) as caught:
        load_series(paths)
    message = str(caught.value)
    assert "tilt" in message
    assert f"{tilt:.1f} degrees" in message
    assert "refuses tilted stacks" in message
    assert datasets[0].SeriesInstanceUID in message


@pytest.mark.shared_data
def test_fmri_with_ten_time_points_is_refused(shared_dicom: Path) -> None:
    paths = series_files(shared_dicom / FMRI_4D)
    assert len(paths) == 150
    with pytest.raises(UnusableSeriesError) as caught:
        load_series(paths)
    message = str(caught.value)
    assert "temporal positions" in message
    assert "150 images lie at only 15 slice positions, 10 time points at each" in message


@pytest.mark.shared_data
@pytest.mark.parametrize("directory", COMPRESSED_MR)
def test_compressed_mr_decodes_like_the_uncompressed_reference(
    shared_dicom: Path, directory: str
) -> None:
    reference = load_series(series_files(shared_dicom / COMPRESSED_MR[-1]))  # RLE
    volume = load_series(series_files(shared_dicom / directory))
    assert volume.array.shape == (4, 256, 256)
    assert volume.spacing == pytest.approx((1.0, 1.0, 1.0))
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_array_equal(volume.affine, reference.affine)
    assert volume.sources == reference.sources
    assert volume.array.max() > 100  # not an empty image decoded as zeros


@pytest.mark.shared_data
def test_series_without_sop_instance_uids_is_refused(shared_dicom: Path) -> None:
    directory = shared_dicom / "TotalSegmentator/tests/reference_files/example_ct_dicom"
    with pytest.raises(UnusableSeriesError, match="20 of its instances have no SOP Instance UID"):
        load_series(series_files(directory))


# --- real multi-frame images --------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize("name", EMRI)
def test_enhanced_mr_without_functional_groups_is_refused(shared_dicom: Path, name: str) -> None:
    """emri_small* carry no functional groups at all: no frame position, no pixel spacing."""
    ds = pydicom.dcmread(shared_dicom / PYDICOM_DATA / name)
    assert "PerFrameFunctionalGroupsSequence" not in ds
    assert "SharedFunctionalGroupsSequence" not in ds
    message = refusal([ds])
    assert "holds 10 frames but no Per-Frame Functional Groups Sequence" in message
    assert ds.SeriesInstanceUID in message


def with_plane_geometry(ds: Dataset, *, step: float = 1.2) -> Dataset:
    """Give a multi-frame image a stack of frames along +z (the groups it lacks)."""
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures = Dataset()
    measures.PixelSpacing = [0.9, 0.9]
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for index in range(int(ds.NumberOfFrames)):
        position = Dataset()
        position.ImagePositionPatient = [0, 0, index * step]
        item = Dataset()
        item.PlanePositionSequence = Sequence([position])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    return ds


@pytest.mark.shared_data
def test_enhanced_mr_frames_decode_identically_in_every_lossless_syntax(
    shared_dicom: Path,
) -> None:
    volumes = [
        load_datasets([with_plane_geometry(pydicom.dcmread(shared_dicom / PYDICOM_DATA / name))])
        for name in EMRI
    ]
    reference = volumes[0]
    assert reference.array.shape == (10, 64, 64)
    assert reference.spacing == pytest.approx((0.9, 0.9, 1.2))
    # Enhanced MR without Pixel Value Transformation: the stored values themselves.
    stored = pydicom.dcmread(shared_dicom / PYDICOM_DATA / EMRI[0]).pixel_array
    np.testing.assert_array_equal(reference.array, stored)
    uid = pydicom.dcmread(shared_dicom / PYDICOM_DATA / EMRI[0]).SOPInstanceUID
    assert reference.sources == tuple((uid, n) for n in range(1, 11))
    for volume in volumes[1:]:
        np.testing.assert_array_equal(volume.array, reference.array)


@pytest.mark.shared_data
def test_truncated_enhanced_mr_is_refused(shared_dicom: Path) -> None:
    path = shared_dicom / PYDICOM_DATA / "emri_small_jpeg_2k_lossless_too_short.dcm"
    with (
        pytest.warns(UserWarning, match="End of file"),
        pytest.raises(UnusableSeriesError, match="empty or truncated"),
    ):
        load_series([path])


@pytest.mark.shared_data
def test_enhanced_ct_frames_are_sorted_along_the_normal(shared_dicom: Path) -> None:
    """eCT_Supplemental: 2 frames, IOP [-1,0,0,0,1,0], so the normal points to -z (feet)."""
    path = shared_dicom / PYDICOM_DATA / "eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    volume = load_series([path])

    shared = ds.SharedFunctionalGroupsSequence[0]
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    positions = [
        np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        for item in ds.PerFrameFunctionalGroupsSequence
    ]
    assert positions[0][2] == -159 and positions[1][2] == -149
    assert volume.array.shape == (2, 512, 512)
    assert volume.spacing == pytest.approx((column_spacing, row_spacing, 10.0))
    # Along the normal (0, 0, -1), frame 2 (z = -149) is at 149 and frame 1 (z = -159) at 159.
    assert volume.sources == ((ds.SOPInstanceUID, 2), (ds.SOPInstanceUID, 1))
    np.testing.assert_allclose(volume.affine[:3, 3], positions[1])
    np.testing.assert_allclose(volume.affine[:3, 2], positions[0] - positions[1])
    np.testing.assert_allclose(volume.affine[:3, 0], [-column_spacing, 0, 0])
    transformation = shared.PixelValueTransformationSequence[0]
    assert float(transformation.RescaleIntercept) == -1024
    np.testing.assert_array_equal(volume.array[0], ds.pixel_array[1] - 1024.0)
    assert volume.sop_class_uid == ds.SOPClassUID


@pytest.mark.shared_data
def test_legacy_converted_ct_equals_its_single_frame_sources(shared_dicom: Path) -> None:
    multiframe_path = shared_dicom / LEGACY_CT / "multiframe/mf.dcm"
    multiframe = load_series([multiframe_path])
    single = load_series(series_files(shared_dicom / LEGACY_CT / "image"))

    uid = pydicom.dcmread(multiframe_path, stop_before_pixels=True).SOPInstanceUID
    assert multiframe.array.shape == (3, 38, 23)
    assert multiframe.spacing == pytest.approx((0.7, 0.7, 2.5))
    assert multiframe.sources == ((uid, 1), (uid, 2), (uid, 3))
    np.testing.assert_array_equal(multiframe.array, single.array)
    np.testing.assert_allclose(multiframe.affine, single.affine)
    assert multiframe.frame_of_reference_uid == single.frame_of_reference_uid


# --- real projection images and one file per transfer syntax ------------------------------------


@pytest.mark.shared_data
def test_monochrome1_dx_is_inverted_and_keeps_its_spacing(shared_dicom: Path) -> None:
    path = shared_dicom / "highdicom/data/test_files/dx_image.dcm"
    ds = pydicom.dcmread(path)
    volume = load_series([path])
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert volume.array.shape == (1, 169, 211)
    assert volume.is_2d
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    assert volume.spacing == pytest.approx((column_spacing, row_spacing, 1.0))
    np.testing.assert_array_equal(volume.affine[:3, 3], [0, 0, 0])
    top = 2**ds.BitsStored - 1
    np.testing.assert_array_equal(volume.array[0], top - ds.pixel_array.astype(np.float64))


@pytest.mark.shared_data
def test_cr_with_zero_pixel_spacing_gets_pixel_units(shared_dicom: Path) -> None:
    path = shared_dicom / PYDICOM_DATA / "RG1_J2KI.dcm"
    ds = pydicom.dcmread(path)
    assert [float(v) for v in ds.PixelSpacing] == [0.0, 0.0]
    assert "ImagerPixelSpacing" not in ds
    volume = load_series([path])
    assert volume.array.shape == (1, 1955, 1841)
    assert volume.spacing == (1.0, 1.0, 1.0)
    assert volume.modality == "CR"
    np.testing.assert_array_equal(volume.array[0], 2**15 - 1 - ds.pixel_array.astype(np.float64))


@pytest.mark.shared_data
def test_secondary_capture_chest_radiograph(shared_dicom: Path) -> None:
    paths = sorted((shared_dicom / "covid-chest-imaging-database").rglob("*.dcm"))
    assert len(paths) == 1
    volume = load_series(paths)
    assert volume.array.shape == (1, 1024, 1024)
    assert volume.modality == "DX"
    np.testing.assert_array_equal(volume.array[0], pydicom.dcmread(paths[0]).pixel_array)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("1.2.840.10008.1.2.1.99.dcm", (1, 358, 512)),  # deflated CT
        ("1.2.840.10008.1.2.4.57.dcm", (1, 1024, 1024)),  # JPEG lossless MR
        ("1.2.840.10008.1.2.4.70.dcm", (1, 400, 512)),  # JPEG lossless SV1 CT
        ("1.2.840.10008.1.2.4.80.dcm", (1, 1024, 256)),  # JPEG-LS NM secondary capture
        ("1.2.840.10008.1.2.4.81.dcm", (1, 512, 512)),  # JPEG-LS near-lossless CT
        ("1.2.840.10008.1.2.4.90.dcm", (1, 1024, 256)),  # JPEG 2000 lossless NM
        ("1.2.840.10008.1.2.4.91.dcm", (1, 512, 512)),  # JPEG 2000 CT
        ("1.2.840.10008.1.2.5.dcm", (1, 1024, 256)),  # RLE NM
        ("1.2.840.10008.1.2.1.dcm", "colour images (Samples per Pixel 3"),
        ("1.2.840.10008.1.2.4.50.dcm", "Photometric Interpretation YBR_FULL_422"),
        ("1.2.840.10008.1.2.4.51.dcm", "transfer syntax JPEG Extended (Process 2 and 4)"),
        ("1.2.840.10008.1.2.dcm", "could not be read as DICOM"),  # no file meta
    ],
)
def test_one_file_per_transfer_syntax(
    shared_dicom: Path, name: str, expected: tuple[int, ...] | str
) -> None:
    path = shared_dicom / TRANSFER_SYNTAXES / name
    if isinstance(expected, str):
        with pytest.raises(UnusableSeriesError) as caught:
            load_series([path])
        assert expected in str(caught.value)
        return
    volume = load_series([path])
    assert volume.array.shape == expected
    assert np.all(np.isfinite(volume.array))
    assert volume.array.max() > volume.array.min()


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("1.2.840.10008.1.2.4.57.dcm", 6.6),  # Spacing Between Slices 6.6, Slice Thickness 6.0
        ("1.2.840.10008.1.2.1.99.dcm", 0.75),  # Slice Thickness only
    ],
)
def test_single_slice_steps_by_spacing_between_slices_else_thickness(
    shared_dicom: Path, name: str, step: float
) -> None:
    path = shared_dicom / TRANSFER_SYNTAXES / name
    ds = pydicom.dcmread(path)
    volume = load_series([path])
    np.testing.assert_allclose(volume.affine[:3, 2], normal_of(ds) * step)
    np.testing.assert_allclose(volume.affine[:3, 3], np.array(ds.ImagePositionPatient, float))
    np.testing.assert_allclose(
        volume.array[0],
        ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
        rtol=1e-6,
    )


# --- synthetic single-frame series ----------------------------------------------------------------


def test_reversed_series_gives_the_same_volume() -> None:
    series = make_ct_series(5)
    forward = load_datasets(series)
    backward = load_datasets(list(reversed(series)))
    np.testing.assert_array_equal(forward.array, backward.array)
    np.testing.assert_array_equal(forward.affine, backward.affine)
    assert forward.sources == tuple((ds.SOPInstanceUID, None) for ds in series)
    assert forward.spacing == pytest.approx((0.7, 0.7, 2.5))


def test_instance_number_does_not_decide_the_order() -> None:
    series = make_ct_series(4)
    for ds, number in zip(series, (3, 1, 4, 2), strict=True):
        ds.InstanceNumber = number
    volume = load_datasets(series)
    assert [uid for uid, _ in volume.sources] == [ds.SOPInstanceUID for ds in series]


def test_missing_slice_is_refused_with_the_steps_found() -> None:
    series = make_ct_series(6)
    del series[3]
    message = refusal(series)
    assert "slices are missing or irregularly spaced" in message
    assert "2.50 mm (3 times), 5.00 mm (1 time)" in message
    assert series[0].SeriesInstanceUID in message


def test_spacing_tolerance_decides_what_is_irregular() -> None:
    series = make_ct_series(5)
    for ds, z in zip(series, (0.0, 2.5, 5.08, 7.5, 10.0), strict=True):
        ds.ImagePositionPatient = [0.0, 0.0, z]
    volume = load_datasets(series)  # 2.58 and 2.42 are within 5% of 2.5
    assert volume.spacing[2] == pytest.approx(2.5)
    message = refusal(series, spacing_tolerance=0.01)
    assert "2.42 mm (1 time), 2.50 mm (2 times), 2.58 mm (1 time)" in message


def test_negative_spacing_tolerance_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="spacing_tolerance"):
        load_datasets(make_ct_series(2), spacing_tolerance=-0.1)


def test_rescale_is_applied_per_slice() -> None:
    series = make_ct_series(3)
    series[1].RescaleSlope = 2.5
    series[1].RescaleIntercept = -500
    volume = load_datasets(series)
    stored = [np.frombuffer(ds.PixelData, dtype=np.int16).reshape(64, 64) for ds in series]
    np.testing.assert_array_equal(volume.array[0], stored[0] - 1024.0)
    np.testing.assert_array_equal(volume.array[1], stored[1] * 2.5 - 500.0)
    np.testing.assert_array_equal(volume.array[2], stored[2] - 1024.0)


def test_ct_without_rescale_is_refused() -> None:
    series = make_ct_series(2)
    del series[1].RescaleSlope
    del series[1].RescaleIntercept
    assert "Hounsfield units are unknown" in refusal(series)


def test_mixed_orientations_are_refused() -> None:
    series = make_ct_series(4)
    series[2].ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.9998, -0.02]
    message = refusal(series)
    assert "2 different orientations" in message


def test_orientation_noise_below_tolerance_is_one_orientation() -> None:
    series = make_ct_series(3)
    series[1].ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.9999998, 0.0005]
    assert load_datasets(series).array.shape == (3, 64, 64)


def test_sheared_stack_is_refused_as_tilt() -> None:
    series = make_ct_series(4)
    for index, ds in enumerate(series):
        ds.ImagePositionPatient = [0.0, index * 1.0, index * 2.5]
    message = refusal(series)
    angle = math.degrees(math.atan2(1.0, 2.5))
    assert f"gantry tilt of {angle:.1f} degrees" in message
    assert "refuses tilted stacks" in message


def test_one_displaced_slice_is_refused_as_a_sheared_stack() -> None:
    series = make_ct_series(6)
    series[3].ImagePositionPatient = [3.0, 0.0, 7.5]
    message = refusal(series)
    assert "sheared stack" in message
    assert "refuses tilted stacks" in message


def test_oblique_orientation_gives_the_exact_affine() -> None:
    row = np.array([math.cos(0.4), math.sin(0.4), 0.0])
    column = np.array(
        [-math.sin(0.4) * math.cos(0.3), math.cos(0.4) * math.cos(0.3), math.sin(0.3)]
    )
    normal = np.cross(row, column)
    origin = np.array([10.0, -20.0, 30.0])
    series = make_ct_series(5)
    for index, ds in enumerate(series):
        ds.ImageOrientationPatient = [*(f"{v:.10f}" for v in (*row, *column))]
        ds.ImagePositionPatient = [f"{v:.8f}" for v in origin + index * 3.0 * normal]
        ds.PixelSpacing = [0.8, 0.6]
    random.Random(3).shuffle(series)
    volume = load_datasets(series)

    iop = np.array(series[0].ImageOrientationPatient, dtype=float)
    np.testing.assert_array_equal(volume.affine[:3, 0], iop[:3] * 0.6)
    np.testing.assert_array_equal(volume.affine[:3, 1], iop[3:] * 0.8)
    np.testing.assert_allclose(volume.affine[:3, 2], normal * 3.0, atol=1e-7)
    np.testing.assert_allclose(volume.affine[:3, 3], origin, atol=1e-7)
    assert volume.spacing == pytest.approx((0.6, 0.8, 3.0))
    np.testing.assert_array_equal(volume.affine[3], [0, 0, 0, 1])


def test_two_instances_at_each_position_are_refused() -> None:
    first = make_ct_series(4)
    second = [copy.deepcopy(ds) for ds in first]
    for ds in second:
        ds.SOPInstanceUID = generate_uid()
        ds.AcquisitionNumber = 2
    message = refusal(first + second)
    assert "temporal positions" in message
    assert "8 images lie at only 4 slice positions, 2 time points at each" in message


def test_the_same_instance_twice_is_refused() -> None:
    series = make_ct_series(3)
    message = refusal([*series, series[1]])
    assert "the same instance was given more than once" in message
    assert series[1].SOPInstanceUID in message


def test_single_slice_step_falls_back_from_spacing_to_thickness_to_one() -> None:
    (ds,) = make_ct_series(1)
    ds.SpacingBetweenSlices = 4.0
    assert load_datasets([ds]).affine[:3, 2] == pytest.approx([0, 0, 4.0])
    del ds.SpacingBetweenSlices
    assert load_datasets([ds]).affine[:3, 2] == pytest.approx([0, 0, 2.5])
    del ds.SliceThickness
    volume = load_datasets([ds])
    assert volume.affine[:3, 2] == pytest.approx([0, 0, 1.0])
    assert volume.is_2d


def test_no_instances_are_refused() -> None:
    assert "No instances" in refusal([])
    with pytest.raises(UnusableSeriesError, match="No instances"):
        load_series([])


def test_instances_of_two_series_are_refused() -> None:
    study = generate_uid()
    message = refusal(make_ct_series(2, study_uid=study) + make_ct_series(2, study_uid=study))
    assert "belong to 2 different series" in message


def test_different_sop_classes_are_refused() -> None:
    series = make_ct_series(2)
    series[1].SOPClassUID = MRImageStorage
    series[1].Modality = "MR"
    message = refusal(series)
    assert "2 different SOP classes" in message
    assert "MR Image Storage" in message


def test_different_image_sizes_are_refused() -> None:
    series = make_ct_series(2)
    series.append(
        make_ct_slice(
            study_uid=series[0].StudyInstanceUID,
            series_uid=series[0].SeriesInstanceUID,
            index=2,
            rows=32,
        )
    )
    assert "rows x columns 32x64, 64x64" in refusal(series)


def test_different_pixel_spacings_are_refused() -> None:
    series = make_ct_series(3)
    series[2].PixelSpacing = [0.8, 0.8]
    assert "2 different pixel spacings (0.7 x 0.7 mm, 0.8 x 0.8 mm)" in refusal(series)


def test_missing_position_is_refused() -> None:
    series = make_ct_series(3)
    del series[1].ImagePositionPatient
    message = refusal(series)
    assert "has no valid Image Position (Patient)" in message
    assert series[1].SOPInstanceUID in message


def test_colour_images_are_refused() -> None:
    series = make_ct_series(2)
    for ds in series:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
    assert "colour images (Samples per Pixel 3, Photometric Interpretation RGB)" in refusal(series)


def test_truncated_pixel_data_is_refused_naming_the_transfer_syntax(tmp_path: Path) -> None:
    series = make_ct_series(3)
    series[1].PixelData = series[1].PixelData[:-1000]
    paths = write_datasets(series, tmp_path)
    with pytest.raises(UnusableSeriesError) as caught:
        load_series(paths)
    message = str(caught.value)
    assert "Explicit VR Little Endian (1.2.840.10008.1.2.1)" in message
    assert series[1].SOPInstanceUID in message
    assert "could not be decoded" in message


def test_truncated_rle_fragment_is_refused_naming_the_transfer_syntax() -> None:
    series = make_ct_series(2)
    series[0].compress(RLELossless)
    fragment = pydicom.encaps.generate_fragments(series[0].PixelData)
    data = next(iter(fragment))
    series[0].PixelData = pydicom.encaps.encapsulate([data[: len(data) // 3]])
    message = refusal(series)
    assert "RLE Lossless (1.2.840.10008.1.2.5)" in message


def test_unknown_transfer_syntax_is_refused_by_name() -> None:
    series = make_ct_series(2)
    series[0].file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2
    series[0].PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    assert "transfer syntax MPEG2 Main Profile / Main Level" in refusal(series)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_lossless_syntaxes_decode_to_the_uncompressed_values(syntax: str) -> None:
    series = make_ct_series(3)
    reference = load_datasets(copy.deepcopy(series))
    for ds in series:
        ds.compress(syntax)
    volume = load_datasets(series)
    np.testing.assert_array_equal(volume.array, reference.array)


# --- synthetic enhanced multi-frame ---------------------------------------------------------------


def test_enhanced_ct_with_shuffled_frames_and_per_frame_rescale() -> None:
    ds = make_enhanced_ct(4)
    frames = list(ds.PerFrameFunctionalGroupsSequence)
    order = [2, 0, 3, 1]  # frame f now lies at z = order[f] * 2
    for frame, z_index in zip(frames, order, strict=True):
        frame.PlanePositionSequence[0].ImagePositionPatient = [-4.0, -4.8, z_index * 2.0]
    transformation = Dataset()
    transformation.RescaleSlope = 2
    transformation.RescaleIntercept = -100
    frames[3].PixelValueTransformationSequence = Sequence([transformation])

    volume = load_datasets([ds])
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(4, 16, 16)
    assert volume.array.shape == (4, 16, 16)
    assert volume.spacing == pytest.approx((0.6, 0.5, 2.0))
    assert volume.sources == tuple((ds.SOPInstanceUID, f) for f in (2, 4, 1, 3))
    np.testing.assert_array_equal(volume.array[0], stored[1] - 1024.0)
    np.testing.assert_array_equal(volume.array[1], stored[3] * 2.0 - 100.0)
    np.testing.assert_allclose(volume.affine[:3, 3], [-4.0, -4.8, 0.0])


def test_enhanced_ct_with_two_temporal_positions_is_refused() -> None:
    ds = make_enhanced_ct(4)
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        frame.PlanePositionSequence[0].ImagePositionPatient = [-4.0, -4.8, (index % 2) * 2.0]
        frame.FrameContentSequence[0].TemporalPositionIndex = index // 2 + 1
    message = refusal([ds])
    assert "several temporal positions" in message
    assert "4 frames hold 2 time points (Temporal Position Index) at 2 slice positions" in message


def test_enhanced_ct_with_two_stacks_is_refused() -> None:
    ds = make_enhanced_ct(4)
    ds.PerFrameFunctionalGroupsSequence[3].FrameContentSequence[0].StackID = "2"
    assert "2 stacks (Stack ID 1, 2)" in refusal([ds])


def test_enhanced_ct_with_repeated_positions_is_refused() -> None:
    ds = make_enhanced_ct(4)
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        frame.PlanePositionSequence[0].ImagePositionPatient = [-4.0, -4.8, (index % 2) * 2.0]
    assert "4 images lie at only 2 slice positions" in refusal([ds])


def test_enhanced_ct_without_plane_position_is_refused() -> None:
    ds = make_enhanced_ct(3)
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    message = refusal([ds])
    assert f"frame 2 of instance {ds.SOPInstanceUID} has no valid Plane Position Sequence" in (
        message
    )


def test_enhanced_ct_frame_count_must_match_the_groups() -> None:
    ds = make_enhanced_ct(3)
    ds.NumberOfFrames = 4
    assert "says it holds 4 frames but describes 3" in refusal([ds])


# --- synthetic projection images ------------------------------------------------------------------


def test_monochrome1_is_inverted_within_the_stored_range() -> None:
    ds = make_dx_image(photometric="MONOCHROME1", bits_stored=12)
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(24, 32)
    volume = load_datasets([ds])
    np.testing.assert_array_equal(volume.array[0], 4095.0 - stored)
    assert volume.array.shape == (1, 24, 32)
    assert volume.spacing == pytest.approx((0.2, 0.15, 1.0))
    np.testing.assert_array_equal(volume.affine[:3, :3], np.diag([0.2, 0.15, 1.0]))
    assert volume.frame_of_reference_uid is None
    assert volume.is_2d


def test_monochrome2_keeps_its_values_and_rescale() -> None:
    ds = make_dx_image(photometric="MONOCHROME2", bits_stored=10)
    ds.RescaleSlope = 0.5
    ds.RescaleIntercept = 10
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(24, 32)
    np.testing.assert_array_equal(load_datasets([ds]).array[0], stored * 0.5 + 10.0)


def test_monochrome1_with_rescale_is_inverted_within_the_rescaled_range() -> None:
    ds = make_dx_image(photometric="MONOCHROME1", bits_stored=8)
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -10
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(24, 32)
    values = stored * 2.0 - 10.0
    np.testing.assert_array_equal(load_datasets([ds]).array[0], (-10.0 + 500.0) - values)


def test_modality_lut_is_applied_to_a_projection_image() -> None:
    ds = make_dx_image(photometric="MONOCHROME2", bits_stored=8)
    del ds.RescaleSlope
    del ds.RescaleIntercept
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 16]
    lut.LUTData = [3 * v + 7 for v in range(256)]
    ds.ModalityLUTSequence = Sequence([lut])
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(24, 32)
    np.testing.assert_array_equal(load_datasets([ds]).array[0], stored * 3.0 + 7.0)
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(
        load_datasets([ds]).array[0], (7.0 + 772.0) - (stored * 3.0 + 7.0)
    )


def test_pixel_spacing_wins_over_imager_pixel_spacing_and_none_means_pixel_units() -> None:
    ds = make_dx_image(pixel_spacing=(0.15, 0.2))
    ds.PixelSpacing = [0.1, 0.12]
    assert load_datasets([ds]).spacing == pytest.approx((0.12, 0.1, 1.0))
    unknown = make_dx_image(pixel_spacing=None)
    assert load_datasets([unknown]).spacing == (1.0, 1.0, 1.0)


def test_two_radiographs_in_one_series_are_refused() -> None:
    first = make_dx_image()
    second = make_dx_image(seed=1)
    second.SeriesInstanceUID = first.SeriesInstanceUID
    assert "2 projection images without patient positions" in refusal([first, second])


# --- the Volume object ----------------------------------------------------------------------------


def test_volume_rejects_inconsistent_parts() -> None:
    good = {
        "array": np.zeros((2, 3, 4), dtype=np.float32),
        "affine": np.eye(4),
        "sources": (("1.2.3", None), ("1.2.4", None)),
        "modality": "CT",
        "series_instance_uid": "1.2",
        "frame_of_reference_uid": None,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
    }
    assert Volume(**good).spacing == (1.0, 1.0, 1.0)  # type: ignore[arg-type]
    for change in (
        {"array": np.zeros((2, 3, 4), dtype=np.float64)},
        {"array": np.zeros((3, 4), dtype=np.float32)},
        {"affine": np.eye(3)},
        {"sources": (("1.2.3", None),)},
    ):
        with pytest.raises(ValueError, match="Volume"):
            Volume(**{**good, **change})  # type: ignore[arg-type]
