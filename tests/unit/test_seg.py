"""SEG from a label map: written, checked by dciodvfy, read back voxel for voxel on its grid."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pacsai.errors import ReportError
from pacsai.inference.bundle import BundleInfo
from pacsai.inference.labels import Code
from pacsai.inference.volume import load_datasets
from pacsai.reporting import EmptySegmentationError, build_segmentation, result_uid
from pacsai.reporting.codes import ALGORITHM_FAMILY
from tests.dicom_checks import (
    LABELMAP_UNKNOWN_TO_DCIODVFY,
    PhantomCase,
    dciodvfy,
    demo_bundle,
    phantom_case,
    to_grid,
)

PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("seg")


def label_map_of(case: PhantomCase) -> np.ndarray:
    assert case.label_map is not None
    return case.label_map


def write_and_read(seg: pydicom.Dataset, path: Path) -> hd.seg.Segmentation:
    seg.save_as(path, enforce_file_format=True)
    return hd.seg.segread(path)


def label_values(seg: hd.seg.Segmentation, bundle: BundleInfo) -> np.ndarray:
    """Segment number -> bundle label value, by the segment's label."""
    by_name = {label.name: label.value for label in bundle.labels}
    lookup = np.zeros(256, dtype=np.uint16)
    for item in seg.SegmentSequence:
        if item.SegmentNumber != 0:
            lookup[item.SegmentNumber] = by_name[item.SegmentLabel]
    return lookup


def read_back(seg: hd.seg.Segmentation, case: PhantomCase, bundle: BundleInfo) -> np.ndarray:
    """The SEG's pixels per source instance, in the volume's slice order, as label values."""
    uids = [uid for uid, _ in case.volume.sources]
    segments = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    result: np.ndarray = label_values(seg, bundle)[segments]
    return result


def assert_conformant(path: Path, known: tuple[str, ...] = ()) -> None:
    verification = dciodvfy(path)
    unexpected = [error for error in verification.errors if error not in known]
    assert not unexpected, verification.report()


# --- CT, BINARY and LABELMAP --------------------------------------------------------------------


@pytest.fixture(scope="module")
def binary_seg(
    ct: PhantomCase, ct_bundle: BundleInfo, scratch: Path
) -> Iterator[tuple[Path, hd.seg.Segmentation]]:
    seg = build_segmentation(
        sources=ct.datasets, volume=ct.volume, label_map=label_map_of(ct), bundle=ct_bundle
    )
    path = scratch / "binary.dcm"
    yield path, write_and_read(seg, path)


def test_binary_seg_passes_dciodvfy(binary_seg: tuple[Path, hd.seg.Segmentation]) -> None:
    path, seg = binary_seg
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert_conformant(path)


def test_binary_seg_reads_back_to_the_label_map(
    binary_seg: tuple[Path, hd.seg.Segmentation], ct: PhantomCase, ct_bundle: BundleInfo
) -> None:
    _, seg = binary_seg
    label_map = label_map_of(ct)
    assert set(np.unique(label_map).tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(read_back(seg, ct, ct_bundle), label_map)

    # and as a volume, wherever highdicom puts its slices, on the same voxels
    volume = seg.get_volume(combine_segments=True)
    on_grid = to_grid(volume.array, volume.affine, ct.volume)
    np.testing.assert_array_equal(label_values(seg, ct_bundle)[on_grid], label_map)


def test_binary_seg_frames_reference_their_source_slice(
    binary_seg: tuple[Path, hd.seg.Segmentation], ct: PhantomCase
) -> None:
    _, seg = binary_seg
    by_uid = {str(ds.SOPInstanceUID): ds for ds in ct.datasets}
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        image = by_uid[source.ReferencedSOPInstanceUID]
        assert source.ReferencedSOPClassUID == image.SOPClassUID
        position = item.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(
            [float(v) for v in position], [float(v) for v in image.ImagePositionPatient]
        )


def test_binary_seg_omits_empty_frames(
    binary_seg: tuple[Path, hd.seg.Segmentation], ct: PhantomCase
) -> None:
    _, seg = binary_seg
    label_map = label_map_of(ct)
    slices_with = [int(np.any(label_map == value, axis=(1, 2)).sum()) for value in (1, 2, 3)]
    assert seg.NumberOfFrames == sum(slices_with)
    assert seg.NumberOfFrames < label_map.shape[0] * 3


def test_binary_seg_segments_carry_codes_colours_and_algorithm(
    binary_seg: tuple[Path, hd.seg.Segmentation], ct_bundle: BundleInfo
) -> None:
    _, seg = binary_seg
    items = list(seg.SegmentSequence)
    assert [item.SegmentNumber for item in items] == [1, 2, 3]
    for item, label in zip(items, ct_bundle.labels, strict=True):
        assert item.SegmentLabel == label.name
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator, category.CodeMeaning) == (
            label.category.value,
            label.category.scheme,
            label.category.meaning,
        )
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == (
            label.type.value,
            label.type.scheme,
            label.type.meaning,
        )
        expected = hd.color.CIELabColor.from_rgb(*label.color).value
        assert tuple(item.RecommendedDisplayCIELabValue) == tuple(expected)
        assert hd.color.CIELabColor.from_dicom_value(
            tuple(item.RecommendedDisplayCIELabValue)
        ).to_rgb() == pytest.approx(label.color, abs=1)
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.TrackingID == label.name
        assert str(item.TrackingUID).startswith("2.25.")
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == ct_bundle.name
        assert algorithm.AlgorithmVersion == ct_bundle.display_version
        assert ct_bundle.weights_sha256[:12] in algorithm.AlgorithmVersion
        assert algorithm.AlgorithmSource == "pacsai"
        assert ct_bundle.weights_sha256 in algorithm.AlgorithmParameters
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
        assert family.CodeValue == ALGORITHM_FAMILY.value


def test_binary_seg_is_a_new_series_of_the_source_study(
    binary_seg: tuple[Path, hd.seg.Segmentation], ct: PhantomCase, ct_bundle: BundleInfo
) -> None:
    _, seg = binary_seg
    source = ct.datasets[0]
    for keyword in PATIENT_AND_STUDY:
        assert seg.get(keyword) == source.get(keyword), keyword
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.Modality == "SEG"
    assert seg.SeriesNumber == 9901
    assert seg.SeriesDescription == "AI SEG ct_abdomen_demo 0.1.0 (not for primary diagnosis)"
    assert len(seg.SeriesDescription) <= 64
    assert seg.ContentLabel == "AI_SEGMENTATION"
    assert seg.Manufacturer == "pacsai"
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in ct.datasets}


def test_labelmap_seg_round_trip(ct: PhantomCase, ct_bundle: BundleInfo, scratch: Path) -> None:
    seg = build_segmentation(
        sources=ct.datasets,
        volume=ct.volume,
        label_map=label_map_of(ct),
        bundle=ct_bundle,
        segmentation_type="LABELMAP",
    )
    path = scratch / "labelmap.dcm"
    read = write_and_read(seg, path)
    assert read.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert read.SegmentationType == "LABELMAP"
    assert_conformant(path, known=LABELMAP_UNKNOWN_TO_DCIODVFY)
    assert [item.SegmentLabel for item in read.SegmentSequence] == [
        "Background",
        "liver",
        "spleen",
        "kidney",
    ]
    np.testing.assert_array_equal(read_back(read, ct, ct_bundle), label_map_of(ct))
    # one frame per slice holding any label
    assert read.NumberOfFrames == int(np.any(label_map_of(ct), axis=(1, 2)).sum())


# --- which labels become segments ---------------------------------------------------------------


def test_absent_label_gets_no_segment(
    ct: PhantomCase, ct_bundle: BundleInfo, tmp_path: Path
) -> None:
    label_map = label_map_of(ct).copy()
    label_map[label_map == 2] = 0  # no spleen
    seg = build_segmentation(
        sources=ct.datasets, volume=ct.volume, label_map=label_map, bundle=ct_bundle
    )
    assert [(item.SegmentNumber, item.SegmentLabel) for item in seg.SegmentSequence] == [
        (1, "liver"),
        (2, "kidney"),
    ]
    read = write_and_read(seg, tmp_path / "seg.dcm")
    np.testing.assert_array_equal(read_back(read, ct, ct_bundle), label_map)


def test_empty_label_map_raises_empty_segmentation_error(
    ct: PhantomCase, ct_bundle: BundleInfo
) -> None:
    empty = np.zeros_like(label_map_of(ct))
    with pytest.raises(EmptySegmentationError, match="no label of 'ct_abdomen_demo' is present"):
        build_segmentation(sources=ct.datasets, volume=ct.volume, label_map=empty, bundle=ct_bundle)
    assert issubclass(EmptySegmentationError, ReportError)


# --- other grids, MR, multi-frame ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("orientation", ["axial-reversed", "sagittal", "oblique"])
def test_seg_round_trip_on_other_grids(
    orientation: str, ct_bundle: BundleInfo, tmp_path: Path
) -> None:
    case = phantom_case("ct", tmp_path / "ct", seed=3, orientation=orientation)
    order = [uid for uid, _ in case.volume.sources]
    files = [str(ds.SOPInstanceUID) for ds in case.datasets]
    if orientation == "axial-reversed":
        assert order == files[::-1]  # the label map really is reordered here
    seg = build_segmentation(
        sources=case.datasets, volume=case.volume, label_map=label_map_of(case), bundle=ct_bundle
    )
    read = write_and_read(seg, tmp_path / "seg.dcm")
    assert_conformant(tmp_path / "seg.dcm")
    np.testing.assert_array_equal(read_back(read, case, ct_bundle), label_map_of(case))
    volume = read.get_volume(combine_segments=True)
    on_grid = to_grid(volume.array, volume.affine, case.volume)
    np.testing.assert_array_equal(label_values(read, ct_bundle)[on_grid], label_map_of(case))


@pytest.mark.slow
def test_mr_seg_round_trip(mr_bundle: BundleInfo, tmp_path: Path) -> None:
    case = phantom_case("mr", tmp_path / "mr", seed=5)
    label_map = label_map_of(case)
    assert label_map.max() == 1
    seg = build_segmentation(
        sources=case.datasets, volume=case.volume, label_map=label_map, bundle=mr_bundle
    )
    read = write_and_read(seg, tmp_path / "seg.dcm")
    assert_conformant(tmp_path / "seg.dcm")
    assert [item.SegmentLabel for item in read.SegmentSequence] == ["lesion"]
    category = read.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0]
    assert category.CodeValue == "49755003"  # Morphologically Abnormal Structure
    np.testing.assert_array_equal(read_back(read, case, mr_bundle), label_map)
    assert read.FrameOfReferenceUID == case.datasets[0].FrameOfReferenceUID


def test_seg_of_a_multiframe_source_maps_each_frame(
    ct: PhantomCase, ct_bundle: BundleInfo, tmp_path: Path
) -> None:
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        ct.datasets,
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    image.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    enhanced = pydicom.dcmread(tmp_path / "enhanced.dcm")
    volume = load_datasets([enhanced])
    frames = [frame for _, frame in volume.sources if frame is not None]
    assert len(frames) == len(volume.sources)
    assert frames != sorted(frames)  # the volume's order is not the frame order
    by_position = {
        tuple(np.round([float(v) for v in ds.ImagePositionPatient], 3)): k
        for k, ds in enumerate(ct.datasets)
    }
    truth = ct.study.labels
    assert truth is not None
    label_map = np.zeros(volume.array.shape, dtype=np.uint16)
    for k, frame in enumerate(frames):
        group = enhanced.PerFrameFunctionalGroupsSequence[frame - 1]
        position = group.PlanePositionSequence[0].ImagePositionPatient
        label_map[k] = truth[by_position[tuple(np.round([float(v) for v in position], 3))]]

    seg = build_segmentation(
        sources=[enhanced], volume=volume, label_map=label_map, bundle=ct_bundle
    )
    read = write_and_read(seg, tmp_path / "seg.dcm")
    assert_conformant(tmp_path / "seg.dcm")
    segments = read.get_pixels_by_source_frame(
        source_sop_instance_uid=enhanced.SOPInstanceUID,
        source_frame_numbers=frames,
        combine_segments=True,
    )
    np.testing.assert_array_equal(label_values(read, ct_bundle)[segments], label_map)


def test_partial_multiframe_source_is_refused(ct_bundle: BundleInfo) -> None:
    from tests.support import make_enhanced_ct

    enhanced = make_enhanced_ct(frames=4)
    volume = load_datasets([enhanced])
    cut = type(volume)(
        array=volume.array[:3],
        affine=volume.affine,
        sources=volume.sources[:3],
        modality=volume.modality,
        series_instance_uid=volume.series_instance_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        sop_class_uid=volume.sop_class_uid,
    )
    label_map = np.ones(cut.array.shape, dtype=np.uint16)
    with pytest.raises(ReportError, match="holds 3 of the 4 frames"):
        build_segmentation(sources=[enhanced], volume=cut, label_map=label_map, bundle=ct_bundle)


# --- UIDs -----------------------------------------------------------------------------------------


def test_same_uids_give_the_same_seg(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    series = result_uid(ct.study.study_instance_uid, ct_bundle.display_version, "seg series")
    instance = result_uid(ct.study.study_instance_uid, ct_bundle.display_version, "seg")

    def build() -> hd.seg.Segmentation:
        return build_segmentation(
            sources=ct.datasets,
            volume=ct.volume,
            label_map=label_map_of(ct),
            bundle=ct_bundle,
            series_instance_uid=series,
            sop_instance_uid=instance,
        )

    first, second = build(), build()
    assert first.SOPInstanceUID == second.SOPInstanceUID == instance
    assert first.SeriesInstanceUID == second.SeriesInstanceUID == series
    assert [item.TrackingUID for item in first.SegmentSequence] == [
        item.TrackingUID for item in second.SegmentSequence
    ]
    assert first.PixelData == second.PixelData
    other = build_segmentation(
        sources=ct.datasets, volume=ct.volume, label_map=label_map_of(ct), bundle=ct_bundle
    )
    assert other.SOPInstanceUID != instance


def test_result_uid_is_a_function_of_its_parts() -> None:
    uid = result_uid("1.2.3", "ct_abdomen_demo", "seg")
    assert uid == result_uid("1.2.3", "ct_abdomen_demo", "seg")
    assert uid != result_uid("1.2.3", "ct_abdomen_demo", "sr")
    assert result_uid("a", "bc") != result_uid("ab", "c")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
    with pytest.raises(ValueError, match="at least one part"):
        result_uid()
    with pytest.raises(ValueError, match="part 1 is empty"):
        result_uid("a", "")
    with pytest.raises(TypeError, match="part 0 must be a str"):
        result_uid(3)  # type: ignore[arg-type]


# --- bad inputs -----------------------------------------------------------------------------------


def test_label_map_of_another_shape_is_refused(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    with pytest.raises(ValueError, match=r"label_map has shape \(63, 128, 128\), the volume"):
        build_segmentation(
            sources=ct.datasets,
            volume=ct.volume,
            label_map=label_map_of(ct)[1:],
            bundle=ct_bundle,
        )


def test_label_values_the_bundle_does_not_define_are_refused(
    ct: PhantomCase, ct_bundle: BundleInfo
) -> None:
    label_map = label_map_of(ct).copy()
    label_map[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"holds values \[7\] that bundle 'ct_abdomen_demo'"):
        build_segmentation(
            sources=ct.datasets, volume=ct.volume, label_map=label_map, bundle=ct_bundle
        )


def test_float_label_map_is_refused(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    with pytest.raises(TypeError, match="label_map must hold integers, not float32"):
        build_segmentation(
            sources=ct.datasets,
            volume=ct.volume,
            label_map=label_map_of(ct).astype(np.float32),
            bundle=ct_bundle,
        )


def test_no_sources_is_refused(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    with pytest.raises(ValueError, match="no source instances"):
        build_segmentation(
            sources=[], volume=ct.volume, label_map=label_map_of(ct), bundle=ct_bundle
        )


def test_missing_source_instance_is_refused(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    with pytest.raises(ValueError, match="1 of the volume's 64 source instances are not among"):
        build_segmentation(
            sources=ct.datasets[1:], volume=ct.volume, label_map=label_map_of(ct), bundle=ct_bundle
        )


def test_source_without_modality_is_refused(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    broken = copy.deepcopy(ct.datasets[0])
    del broken.Modality
    sources = [broken, *ct.datasets[1:]]
    with pytest.raises(ValueError, match="source instance 0 lacks Modality"):
        build_segmentation(
            sources=sources, volume=ct.volume, label_map=label_map_of(ct), bundle=ct_bundle
        )


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"segmentation_type": "FRACTIONAL"}, ValueError, "BINARY or LABELMAP"),
        ({"series_number": 0}, ValueError, "series_number must be between 1"),
        ({"sop_instance_uid": "1.2.03"}, ValueError, "sop_instance_uid '1.2.03' is not a UID"),
        ({"series_instance_uid": 12}, TypeError, "series_instance_uid must be a str"),
    ],
)
def test_bad_arguments_are_refused(
    ct: PhantomCase,
    ct_bundle: BundleInfo,
    arguments: dict[str, object],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        build_segmentation(
            sources=ct.datasets,
            volume=ct.volume,
            label_map=label_map_of(ct),
            bundle=ct_bundle,
            **arguments,  # type: ignore[arg-type]
        )


def test_classification_bundle_has_no_segmentation(ct: PhantomCase, scratch: Path) -> None:
    bundle = demo_bundle("cxr_findings_demo", scratch / "bundles")
    with pytest.raises(ValueError, match="is a classification model: it has no label map"):
        build_segmentation(
            sources=ct.datasets, volume=ct.volume, label_map=label_map_of(ct), bundle=bundle
        )


def test_highdicom_refusal_becomes_a_report_error(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    liver = ct_bundle.labels[0]
    long_meaning = dataclasses.replace(liver, type=Code("10200004", "SCT", "Liver " * 12))
    bundle = dataclasses.replace(ct_bundle, labels=(long_meaning, *ct_bundle.labels[1:]))
    with pytest.raises(ReportError, match="highdicom refused the SEG of 'ct_abdomen_demo'") as info:
        build_segmentation(
            sources=ct.datasets, volume=ct.volume, label_map=label_map_of(ct), bundle=bundle
        )
    assert isinstance(info.value.__cause__, ValueError)
