"""BINARY and LABELMAP SEGs and their SRs with 1 and 100 segments: dciodvfy, highdicom round
trips, the BINARY rewritten from the LABELMAP equal to highdicom's own BINARY, an SR made for
one SEG type retargeted to the other, and objects re-encoded for a peer that wants another
transfer syntax."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    SegmentationStorage,
)

from pacsai.inference.bundle import BundleInfo
from pacsai.inference.labels import LabelSemantics
from pacsai.reporting import (
    build_measurement_report,
    build_segmentation,
    read_measurements,
    result_uid,
)
from pacsai.reporting._common import check_label_map, match_sources
from pacsai.reporting.binary_seg import binary_from_labelmap
from pacsai.reporting.seg import referenced_segmentation
from pacsai.reporting.sop_classes import LABEL_MAP_SEGMENTATION_STORAGE
from pacsai.reporting.sr import retarget_report
from pacsai.reporting.transfer import reencode
from pacsai.reporting.variants import binary_variant
from tests.dicom_checks import PhantomCase, dciodvfy, known_errors

SEG_TYPES = ("BINARY", "LABELMAP")
SEGMENTS = (1, pytest.param(100, marks=pytest.mark.slow))
# Attributes that differ between two builds of the same SEG: creation times and the UIDs
# highdicom makes up for the dimension organisation and its own contribution.
VOLATILE = {
    "ContentTime",
    "ContentDate",
    "InstanceCreationTime",
    "InstanceCreationDate",
    "ContributingEquipmentSequence",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
    "PerFrameFunctionalGroupsSequence",
    "PixelData",
}


def many_labels(bundle: BundleInfo, count: int) -> BundleInfo:
    """``bundle`` with ``count`` labels (the meanings of its own, repeated under new names)."""
    labels = tuple(
        dataclasses.replace(
            bundle.labels[index % len(bundle.labels)],
            value=index + 1,
            name=f"structure {index + 1}",
        )
        for index in range(count)
    )
    return dataclasses.replace(bundle, labels=labels)


def compact_label_map(shape: tuple[int, ...], count: int) -> np.ndarray:
    """Each label a box over its own range of slices, as a whole-body model's organs are."""
    slices, rows, columns = shape
    label_map = np.zeros(shape, dtype=np.uint8)
    for value in range(1, count + 1):
        first = (value * 7) % max(1, slices - 8)
        row = (value * 13) % (rows - 12)
        column = (value * 29) % (columns - 12)
        label_map[first : first + 8, row : row + 10, column : column + 10] = value
    return label_map


@pytest.fixture(scope="module", params=SEGMENTS, ids=["1-segment", "100-segments"])
def case(
    request: pytest.FixtureRequest, ct: PhantomCase, ct_bundle: BundleInfo
) -> tuple[BundleInfo, np.ndarray]:
    count: int = request.param
    label_map = compact_label_map(ct.volume.array.shape, count)
    assert len(np.unique(label_map)) == count + 1  # every label present
    return many_labels(ct_bundle, count), label_map


def written(dataset: pydicom.Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def assert_conformant(path: Path) -> None:
    verification = dciodvfy(path)
    known = known_errors(path)
    assert not [error for error in verification.errors if error not in known], verification.report()


def label_values(seg: pydicom.Dataset, bundle: BundleInfo) -> np.ndarray:
    by_name = {label.name: label.value for label in bundle.labels}
    lookup = np.zeros(max(256, len(bundle.labels) + 1), dtype=np.uint16)
    for item in seg.SegmentSequence:
        if item.SegmentNumber != 0:
            lookup[item.SegmentNumber] = by_name[item.SegmentLabel]
    return lookup


@pytest.mark.parametrize("seg_type", SEG_TYPES)
def test_seg_round_trips_through_highdicom_and_dciodvfy(
    seg_type: str,
    case: tuple[BundleInfo, np.ndarray],
    ct: PhantomCase,
    tmp_path: Path,
) -> None:
    bundle, label_map = case
    syntax = JPEGLSLossless if seg_type == "LABELMAP" else DeflatedExplicitVRLittleEndian
    seg = build_segmentation(
        sources=ct.datasets,
        volume=ct.volume,
        label_map=label_map,
        bundle=bundle,
        segmentation_type=seg_type,  # type: ignore[arg-type]
        transfer_syntax_uid=syntax,
    )
    path = written(seg, tmp_path / "seg.dcm")
    assert_conformant(path)
    read = hd.seg.segread(path)
    assert read.SegmentationType == seg_type
    assert read.file_meta.TransferSyntaxUID == syntax
    assert len([item for item in read.SegmentSequence if item.SegmentNumber]) == len(bundle.labels)
    uids = [uid for uid, _ in ct.volume.sources]
    pixels = read.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(label_values(read, bundle)[pixels], label_map)
    if seg_type == "BINARY":  # one frame per segment and slice holding it, no other
        frames = sum(int(np.any(label_map == value, axis=(1, 2)).sum()) for value in range(1, 101))
        assert read.NumberOfFrames == frames


def test_binary_from_the_labelmap_is_highdicoms_binary_seg(
    case: tuple[BundleInfo, np.ndarray], ct: PhantomCase, tmp_path: Path
) -> None:
    """The rewrite gives, element for element and bit for bit, what highdicom's own BINARY
    path gives for the same segments (but for creation times and made-up dimension UIDs)."""
    bundle, label_map = case
    arguments = {
        "sources": ct.datasets,
        "volume": ct.volume,
        "label_map": label_map,
        "bundle": bundle,
        "series_instance_uid": "1.2.3",
        "sop_instance_uid": "1.2.3.4",
    }
    labelmap = build_segmentation(segmentation_type="LABELMAP", **arguments)  # type: ignore[arg-type]
    rewritten = binary_from_labelmap(labelmap, sop_instance_uid="1.2.3.4")

    matched = match_sources(ct.datasets, ct.volume)
    numbers = np.zeros(len(bundle.labels) + 1, dtype=np.uint8)
    numbers[1:] = np.arange(1, len(bundle.labels) + 1)
    theirs = hd.seg.Segmentation(
        source_images=list(matched.datasets),
        pixel_array=numbers[label_map],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription.from_dataset(item)
            for item in labelmap.SegmentSequence
            if item.SegmentNumber != 0
        ],
        series_instance_uid="1.2.3",
        series_number=labelmap.SeriesNumber,
        sop_instance_uid="1.2.3.4",
        instance_number=labelmap.InstanceNumber,
        manufacturer=labelmap.Manufacturer,
        manufacturer_model_name=labelmap.ManufacturerModelName,
        software_versions=labelmap.SoftwareVersions,
        device_serial_number=labelmap.DeviceSerialNumber,
        content_label=labelmap.ContentLabel,
        content_description=labelmap.ContentDescription,
        series_description=labelmap.SeriesDescription,
    )
    ours = pydicom.dcmread(written(rewritten, tmp_path / "ours.dcm"))
    theirs = pydicom.dcmread(written(theirs, tmp_path / "theirs.dcm"))

    assert {e.keyword for e in ours} == {e.keyword for e in theirs}
    for element in theirs:
        if element.keyword not in VOLATILE:
            assert ours[element.tag] == element, element.keyword
    assert ours.PixelData == theirs.PixelData
    assert ours.PerFrameFunctionalGroupsSequence == theirs.PerFrameFunctionalGroupsSequence
    pointers = [
        (item.DimensionIndexPointer, item.FunctionalGroupPointer)
        for item in theirs.DimensionIndexSequence
    ]
    assert [
        (item.DimensionIndexPointer, item.FunctionalGroupPointer)
        for item in ours.DimensionIndexSequence
    ] == pointers
    assert ours.file_meta.MediaStorageSOPClassUID == SegmentationStorage
    assert labelmap.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE  # left as it was


@pytest.mark.parametrize("seg_type", SEG_TYPES)
def test_sr_of_each_seg_type_round_trips(
    seg_type: str, case: tuple[BundleInfo, np.ndarray], ct: PhantomCase, tmp_path: Path
) -> None:
    bundle, label_map = case
    seg = build_segmentation(
        sources=ct.datasets,
        volume=ct.volume,
        label_map=label_map,
        bundle=bundle,
        segmentation_type=seg_type,  # type: ignore[arg-type]
    )
    sr = build_measurement_report(
        sources=ct.datasets, volume=ct.volume, bundle=bundle, segmentation=seg, label_map=label_map
    )
    path = written(sr, tmp_path / "sr.dcm")
    assert_conformant(path)
    groups = read_measurements(pydicom.dcmread(path))
    assert len(groups) == len(bundle.labels)
    voxel_ml = abs(np.linalg.det(ct.volume.affine[:3, :3])) / 1000.0
    tracking = {
        item.SegmentNumber: item.TrackingUID for item in seg.SegmentSequence if item.SegmentNumber
    }
    for number, (group, label) in enumerate(zip(groups, bundle.labels, strict=True), start=1):
        assert group["template"] == "1411"
        assert group["referenced_sop_instance_uid"] == seg.SOPInstanceUID
        assert group["referenced_segment_number"] == number
        assert group["tracking_uid"] == tracking[number]
        mask = label_map == label.value
        values = ct.volume.array[mask].astype(np.float64)
        measured = group["measurements"]
        assert measured["Volume"]["value"] == pytest.approx(mask.sum() * voxel_ml, rel=1e-12)
        mean = measured["Attenuation Coefficient (Mean)"]["value"]
        assert mean == pytest.approx(values.mean(), rel=1e-9)
        std = measured["Attenuation Coefficient (Standard Deviation)"]["value"]
        assert std == pytest.approx(values.std(), rel=1e-9, abs=1e-9)


def test_sr_for_a_seg_not_built_yet_is_the_sr_for_the_seg(
    case: tuple[BundleInfo, np.ndarray], ct: PhantomCase
) -> None:
    """Built at the same time as its SEG, from what the SEG will be, the SR says the same."""
    bundle, label_map = case
    counts = check_label_map(label_map, ct.volume, bundle)
    seg = build_segmentation(
        sources=ct.datasets,
        volume=ct.volume,
        label_map=counts,
        bundle=bundle,
        segmentation_type="LABELMAP",
        series_instance_uid="1.2.3",
        sop_instance_uid="1.2.3.4",
    )
    planned = referenced_segmentation(
        label_map=counts,
        bundle=bundle,
        segmentation_type="LABELMAP",
        sop_instance_uid="1.2.3.4",
        series_instance_uid="1.2.3",
        study_instance_uid=str(ct.datasets[0].StudyInstanceUID),
    )

    def report(segmentation: object) -> pydicom.Dataset:
        return build_measurement_report(
            sources=ct.datasets,
            volume=ct.volume,
            bundle=bundle,
            segmentation=segmentation,  # type: ignore[arg-type]
            label_map=counts,
            sop_instance_uid="1.2.3.5",
            series_instance_uid="1.2.3.6",
        )

    from_seg, from_plan = report(seg), report(planned)
    assert from_plan.ContentSequence == from_seg.ContentSequence
    assert (
        from_plan.CurrentRequestedProcedureEvidenceSequence
        == from_seg.CurrentRequestedProcedureEvidenceSequence
    )


def test_sr_retargeted_to_the_binary_seg_is_the_sr_of_the_binary_seg(
    case: tuple[BundleInfo, np.ndarray], ct: PhantomCase, tmp_path: Path
) -> None:
    bundle, label_map = case
    arguments = {"sources": ct.datasets, "volume": ct.volume, "bundle": bundle}
    labelmap = build_segmentation(
        label_map=label_map,
        segmentation_type="LABELMAP",
        series_instance_uid="1.2.3",
        sop_instance_uid="1.2.3.4",
        **arguments,  # type: ignore[arg-type]
    )
    binary = build_segmentation(
        label_map=label_map,
        segmentation_type="BINARY",
        series_instance_uid="1.2.3",  # both forms in one series
        sop_instance_uid="1.2.3.7",
        **arguments,  # type: ignore[arg-type]
    )
    for item_l, item_b in zip(
        labelmap.SegmentSequence[1:], binary.SegmentSequence, strict=True
    ):  # Tracking UIDs are derived from the SOP Instance UID: make them the same here
        item_b.TrackingUID = item_l.TrackingUID
    sr_l = build_measurement_report(
        segmentation=labelmap,
        label_map=label_map,
        sop_instance_uid="1.2.3.5",
        **arguments,  # type: ignore[arg-type]
    )
    sr_b = build_measurement_report(
        segmentation=binary,
        label_map=label_map,
        sop_instance_uid="1.2.3.8",
        **arguments,  # type: ignore[arg-type]
    )
    copy = pydicom.dcmread(written(sr_l, tmp_path / "sr-l.dcm"))
    retarget_report(
        copy,
        segmentation="1.2.3.4",
        replacement_sop_class_uid=SegmentationStorage,
        replacement_sop_instance_uid="1.2.3.7",
        sop_instance_uid="1.2.3.8",
    )
    path = written(copy, tmp_path / "sr-b.dcm")
    assert known_errors(path) == ()
    assert_conformant(path)
    read = pydicom.dcmread(path)
    assert read.SOPInstanceUID == "1.2.3.8"
    assert read.file_meta.MediaStorageSOPInstanceUID == "1.2.3.8"
    assert read_measurements(read) == read_measurements(sr_b)
    assert (
        read.CurrentRequestedProcedureEvidenceSequence
        == sr_b.CurrentRequestedProcedureEvidenceSequence
    )
    with pytest.raises(ValueError, match=r"does not refer to SEG 9\.9"):
        retarget_report(
            pydicom.dcmread(path),
            segmentation="9.9",
            replacement_sop_class_uid=SegmentationStorage,
            replacement_sop_instance_uid="1.2.3.7",
            sop_instance_uid="1.2.3.9",
        )


@pytest.mark.parametrize("seg_type", SEG_TYPES)
@pytest.mark.parametrize("target", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_compressed_seg_reencoded_is_the_same_object(
    seg_type: str, target: str, case: tuple[BundleInfo, np.ndarray], ct: PhantomCase, tmp_path: Path
) -> None:
    bundle, label_map = case
    syntax = JPEGLSLossless if seg_type == "LABELMAP" else DeflatedExplicitVRLittleEndian
    seg = build_segmentation(
        sources=ct.datasets,
        volume=ct.volume,
        label_map=label_map,
        bundle=bundle,
        segmentation_type=seg_type,  # type: ignore[arg-type]
        transfer_syntax_uid=syntax,
    )
    stored = written(seg, tmp_path / "stored.dcm")
    copy = tmp_path / "copy.dcm"
    reencode(stored, copy, target)  # type: ignore[arg-type]
    before, after = hd.seg.segread(stored), hd.seg.segread(copy)
    assert after.file_meta.TransferSyntaxUID == target
    assert after.SOPInstanceUID == before.SOPInstanceUID  # a transfer syntax is no new instance
    np.testing.assert_array_equal(after.pixel_array, before.pixel_array)
    assert after.PerFrameFunctionalGroupsSequence == before.PerFrameFunctionalGroupsSequence
    assert_conformant(copy)


def test_the_binary_variant_is_written_once_beside_the_labelmap(
    ct: PhantomCase, ct_bundle: BundleInfo, tmp_path: Path
) -> None:
    assert ct.label_map is not None
    arguments = {"sources": ct.datasets, "volume": ct.volume, "bundle": ct_bundle}
    labelmap = build_segmentation(
        label_map=ct.label_map,
        segmentation_type="LABELMAP",
        transfer_syntax_uid=JPEGLSLossless,
        **arguments,  # type: ignore[arg-type]
    )
    report = build_measurement_report(
        segmentation=labelmap,
        label_map=ct.label_map,
        **arguments,  # type: ignore[arg-type]
    )
    seg_path = written(labelmap, tmp_path / "seg.dcm")
    sr_path = written(report, tmp_path / "sr.dcm")

    variant = binary_variant(seg_path, [sr_path])
    assert (variant.seg, variant.reports) == (
        tmp_path / "seg-binary.dcm",
        {sr_path: tmp_path / "sr-binary.dcm"},
    )
    binary = hd.seg.segread(variant.seg)
    assert binary.SOPInstanceUID == result_uid(str(labelmap.SOPInstanceUID), "BINARY")
    assert binary.SeriesInstanceUID == labelmap.SeriesInstanceUID
    assert binary.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    uids = [uid for uid, _ in ct.volume.sources]
    np.testing.assert_array_equal(
        binary.get_pixels_by_source_instance(uids, combine_segments=True),
        hd.seg.segread(seg_path).get_pixels_by_source_instance(uids, combine_segments=True),
    )
    sr = pydicom.dcmread(variant.reports[sr_path])
    assert sr.SOPInstanceUID == result_uid(str(report.SOPInstanceUID), "BINARY")
    assert {group["referenced_sop_instance_uid"] for group in read_measurements(sr)} == {
        binary.SOPInstanceUID
    }
    assert_conformant(variant.seg)
    assert_conformant(variant.reports[sr_path])

    made = variant.seg.stat().st_mtime_ns
    assert binary_variant(seg_path, [sr_path]) == variant
    assert variant.seg.stat().st_mtime_ns == made  # found, not made again


def test_only_a_monochrome_labelmap_with_segments_from_one_is_rewritten(
    ct: PhantomCase, ct_bundle: BundleInfo
) -> None:
    assert ct.label_map is not None
    binary = build_segmentation(
        sources=ct.datasets, volume=ct.volume, label_map=ct.label_map, bundle=ct_bundle
    )
    with pytest.raises(ValueError, match="not a Label Map Segmentation"):
        binary_from_labelmap(binary, sop_instance_uid="1.2.3")
    labelmap = build_segmentation(
        sources=ct.datasets,
        volume=ct.volume,
        label_map=ct.label_map,
        bundle=ct_bundle,
        segmentation_type="LABELMAP",
    )
    labelmap.SegmentSequence[2].SegmentNumber = 7
    with pytest.raises(ValueError, match=r"numbered \[1, 7, 3\]; a BINARY SEG needs 1, 2"):
        binary_from_labelmap(labelmap, sop_instance_uid="1.2.3")


def test_a_seg_type_writes_only_its_own_transfer_syntaxes(
    ct: PhantomCase, ct_bundle: BundleInfo
) -> None:
    assert ct.label_map is not None
    with pytest.raises(ValueError, match=r"a BINARY SEG is written in .* not JPEG-LS Lossless"):
        build_segmentation(
            sources=ct.datasets,
            volume=ct.volume,
            label_map=ct.label_map,
            bundle=ct_bundle,
            transfer_syntax_uid=JPEGLSLossless,
        )


def test_labels_of_one_label_map_are_counted_per_slice(
    ct: PhantomCase, ct_bundle: BundleInfo
) -> None:
    label_map = compact_label_map(ct.volume.array.shape, 100)
    bundle = many_labels(ct_bundle, 100)
    counts = check_label_map(label_map, ct.volume, bundle)
    for value in (1, 50, 100):
        assert counts.counts[value] == int((label_map == value).sum())
        assert (
            counts.slices_with(value)
            == np.flatnonzero((label_map == value).any(axis=(1, 2))).tolist()
        )
    assert isinstance(bundle.labels[0], LabelSemantics)
