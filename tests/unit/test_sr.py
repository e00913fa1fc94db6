"""TID 1500 SR from a model output: written, checked by dciodvfy, read back and compared."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from pacsai.errors import ReportError
from pacsai.inference.bundle import BundleInfo
from pacsai.reporting import (
    FindingRecord,
    build_measurement_report,
    build_segmentation,
    read_measurements,
    result_uid,
)
from tests.dicom_checks import PhantomCase, dciodvfy

PROBABILITIES = {"nodule": 0.93, "effusion": 0.04}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sr")


@pytest.fixture(scope="module")
def seg(ct: PhantomCase, ct_bundle: BundleInfo, scratch: Path) -> hd.seg.Segmentation:
    assert ct.label_map is not None
    built = build_segmentation(
        sources=ct.datasets, volume=ct.volume, label_map=ct.label_map, bundle=ct_bundle
    )
    built.save_as(scratch / "seg.dcm", enforce_file_format=True)
    return hd.seg.segread(scratch / "seg.dcm")


def label_map_of(case: PhantomCase) -> np.ndarray:
    assert case.label_map is not None
    return case.label_map


def write_and_check(sr: hd.sr.Comprehensive3DSR, path: Path) -> pydicom.Dataset:
    """Save, run dciodvfy (no Error line allowed), read back."""
    sr.save_as(path, enforce_file_format=True)
    verification = dciodvfy(path)
    assert not verification.errors, verification.report()
    return pydicom.dcmread(path)


# --- segmentation model: CT with a SEG ------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_report(
    ct: PhantomCase, ct_bundle: BundleInfo, seg: hd.seg.Segmentation, scratch: Path
) -> pydicom.Dataset:
    sr = build_measurement_report(
        sources=ct.datasets,
        volume=ct.volume,
        bundle=ct_bundle,
        segmentation=seg,
        label_map=label_map_of(ct),
    )
    return write_and_check(sr, scratch / "ct_sr.dcm")


def test_ct_report_has_one_volumetric_group_per_segment(
    ct_report: pydicom.Dataset, seg: hd.seg.Segmentation, ct_bundle: BundleInfo
) -> None:
    groups = read_measurements(ct_report)
    assert [group["template"] for group in groups] == ["1411", "1411", "1411"]
    for group, item, label in zip(groups, seg.SegmentSequence, ct_bundle.labels, strict=True):
        assert group["referenced_sop_instance_uid"] == seg.SOPInstanceUID
        assert group["referenced_segment_number"] == item.SegmentNumber
        assert group["tracking_uid"] == item.TrackingUID
        assert group["tracking_identifier"] == label.name
        assert group["finding"] == label.type
        assert group["finding_category"] == label.category
        assert group["evaluations"] == {label.type.meaning: "Present"}


def test_ct_report_measures_volume_and_hounsfield_units(
    ct_report: pydicom.Dataset, ct: PhantomCase, ct_bundle: BundleInfo
) -> None:
    label_map = label_map_of(ct)
    voxel_ml = abs(np.linalg.det(ct.volume.affine[:3, :3])) / 1000.0
    assert voxel_ml == pytest.approx(0.027)  # 3 mm voxels
    for group, label in zip(read_measurements(ct_report), ct_bundle.labels, strict=True):
        mask = label_map == label.value
        values = ct.volume.array[mask].astype(np.float64)
        assert group["measurements"] == {
            "Volume": {"value": pytest.approx(mask.sum() * voxel_ml, rel=1e-12), "unit": "cm3"},
            "Attenuation Coefficient (Mean)": {
                "value": pytest.approx(np.mean(values), rel=1e-12),
                "unit": "[hnsf'U]",
            },
            "Attenuation Coefficient (Standard Deviation)": {
                "value": pytest.approx(np.std(values), rel=1e-12),
                "unit": "[hnsf'U]",
            },
        }


def test_ct_report_header_and_observer(
    ct_report: pydicom.Dataset, ct: PhantomCase, ct_bundle: BundleInfo, seg: hd.seg.Segmentation
) -> None:
    source = ct.datasets[0]
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID"):
        assert ct_report.get(keyword) == source.get(keyword), keyword
    assert ct_report.SeriesInstanceUID not in (source.SeriesInstanceUID, seg.SeriesInstanceUID)
    assert ct_report.Modality == "SR"
    assert ct_report.VerificationFlag == "UNVERIFIED"
    assert ct_report.CompletionFlag == "COMPLETE"
    assert ct_report.PreliminaryFlag == "PRELIMINARY"
    assert ct_report.SeriesNumber == 9902
    assert ct_report.SeriesDescription == "AI SR ct_abdomen_demo 0.1.0 (not for primary diagnosis)"

    document = hd.sr.Comprehensive3DSR.from_dataset(ct_report)
    report = hd.sr.MeasurementReport.from_sequence([document])
    (observer,) = report.get_observer_contexts()
    assert observer.observer_type == codes.DCM.Device
    device = observer.observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.name == ct_bundle.name
    assert device.manufacturer_name == "pacsai"
    assert device.model_name == "pacsai"
    procedure = ct_report.ContentSequence
    reported = [
        item.ConceptCodeSequence[0].CodeValue
        for item in procedure
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"  # Procedure reported
    ]
    assert reported == ["25045-6"]  # CT unspecified body region

    evidence = {
        item.ReferencedSOPInstanceUID
        for study in ct_report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {seg.SOPInstanceUID} | {str(ds.SOPInstanceUID) for ds in ct.datasets}


def test_ct_report_with_an_absent_label(
    ct: PhantomCase, ct_bundle: BundleInfo, tmp_path: Path
) -> None:
    label_map = label_map_of(ct).copy()
    label_map[label_map == 3] = 0  # no kidney
    seg = build_segmentation(
        sources=ct.datasets, volume=ct.volume, label_map=label_map, bundle=ct_bundle
    )
    sr = build_measurement_report(
        sources=ct.datasets,
        volume=ct.volume,
        bundle=ct_bundle,
        segmentation=seg,
        label_map=label_map,
    )
    groups = read_measurements(write_and_check(sr, tmp_path / "sr.dcm"))
    assert [(group["template"], group["referenced_segment_number"]) for group in groups] == [
        ("1411", 1),
        ("1411", 2),
        ("1501", None),
    ]
    kidney = groups[2]
    assert kidney["finding"] is not None and kidney["finding"].meaning == "Kidney"
    assert kidney["evaluations"] == {"Kidney": "Absent"}
    assert kidney["measurements"] == {}


def test_empty_label_map_reports_every_label_absent(
    ct: PhantomCase, ct_bundle: BundleInfo, tmp_path: Path
) -> None:
    sr = build_measurement_report(
        sources=ct.datasets,
        volume=ct.volume,
        bundle=ct_bundle,
        label_map=np.zeros_like(label_map_of(ct)),
    )
    groups = read_measurements(write_and_check(sr, tmp_path / "sr.dcm"))
    assert [group["evaluations"] for group in groups] == [
        {"Liver": "Absent"},
        {"Spleen": "Absent"},
        {"Kidney": "Absent"},
    ]


def test_report_without_seg_measures_in_tid_1501_groups(
    ct: PhantomCase, ct_bundle: BundleInfo, tmp_path: Path
) -> None:
    sr = build_measurement_report(
        sources=ct.datasets, volume=ct.volume, bundle=ct_bundle, label_map=label_map_of(ct)
    )
    dataset = write_and_check(sr, tmp_path / "sr.dcm")
    groups = read_measurements(dataset)
    assert [group["template"] for group in groups] == ["1501", "1501", "1501"]
    assert all(group["referenced_sop_instance_uid"] is None for group in groups)
    liver_ml = float((label_map_of(ct) == 1).sum()) * 0.027
    assert groups[0]["measurements"]["Volume"]["value"] == pytest.approx(liver_ml)
    assert groups[0]["evaluations"] == {"Liver": "Present"}


# --- classification model: CR -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cr_report(cr: PhantomCase, cxr_bundle: BundleInfo, scratch: Path) -> pydicom.Dataset:
    sr = build_measurement_report(
        sources=cr.datasets, volume=cr.volume, bundle=cxr_bundle, probabilities=PROBABILITIES
    )
    return write_and_check(sr, scratch / "cr_sr.dcm")


def test_cr_report_reads_back_probabilities_and_presence(
    cr_report: pydicom.Dataset, cr: PhantomCase
) -> None:
    groups = read_measurements(cr_report)
    summary = [
        (
            group["tracking_identifier"],
            group["finding"].meaning if group["finding"] else None,
            group["measurements"],
            group["evaluations"],
        )
        for group in groups
    ]
    assert summary == [
        (
            "nodule",
            "Nodule",
            {"Certainty of Finding": {"value": pytest.approx(93.0), "unit": "%"}},
            {"Nodule": "Present"},
        ),
        (
            "effusion",
            "Pleural effusion",
            {"Certainty of Finding": {"value": pytest.approx(4.0), "unit": "%"}},
            {"Pleural effusion": "Absent"},
        ),
    ]
    assert all(group["template"] == "1501" for group in groups)
    assert (
        cr_report.SeriesDescription == "AI SR cxr_findings_demo 0.1.0 (not for primary diagnosis)"
    )


def test_cr_report_references_the_radiograph(cr_report: pydicom.Dataset, cr: PhantomCase) -> None:
    document = hd.sr.Comprehensive3DSR.from_dataset(cr_report)
    report = hd.sr.MeasurementReport.from_sequence([document])
    groups = report.get_image_measurement_groups()
    assert len(groups) == 2
    for group in groups:
        (image,) = group.source_images
        assert image.referenced_sop_instance_uid == cr.datasets[0].SOPInstanceUID
    procedure = [
        item.ConceptCodeSequence[0].CodeValue
        for item in cr_report.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert procedure == ["43468-8"]  # XR unspecified body region


def test_threshold_decides_presence(cr: PhantomCase, cxr_bundle: BundleInfo) -> None:
    sr = build_measurement_report(
        sources=cr.datasets,
        volume=cr.volume,
        bundle=cxr_bundle,
        probabilities={"nodule": 0.5, "effusion": 0.49},
    )
    evaluations = [group["evaluations"] for group in read_measurements(sr)]
    assert evaluations == [{"Nodule": "Present"}, {"Pleural effusion": "Absent"}]


def test_study_procedure_code_is_reported_when_present(
    cr: PhantomCase, cxr_bundle: BundleInfo
) -> None:
    source = copy.deepcopy(cr.datasets[0])
    procedure = pydicom.Dataset()
    procedure.CodeValue = "RPID16"
    procedure.CodingSchemeDesignator = "RADLEX"
    procedure.CodeMeaning = "XR Chest PA"
    source.ProcedureCodeSequence = [procedure]
    sr = build_measurement_report(
        sources=[source], volume=cr.volume, bundle=cxr_bundle, probabilities=PROBABILITIES
    )
    reported = [
        item.ConceptCodeSequence[0].CodeValue
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert reported == ["RPID16"]


# --- UIDs -----------------------------------------------------------------------------------------


def test_same_uids_give_the_same_report(cr: PhantomCase, cxr_bundle: BundleInfo) -> None:
    series = result_uid(cr.study.study_instance_uid, cxr_bundle.display_version, "sr series")
    instance = result_uid(cr.study.study_instance_uid, cxr_bundle.display_version, "sr")

    def build() -> list[FindingRecord]:
        sr = build_measurement_report(
            sources=cr.datasets,
            volume=cr.volume,
            bundle=cxr_bundle,
            probabilities=PROBABILITIES,
            series_instance_uid=series,
            sop_instance_uid=instance,
        )
        assert (sr.SOPInstanceUID, sr.SeriesInstanceUID) == (instance, series)
        return read_measurements(sr)

    first, second = build(), build()
    assert [group["tracking_uid"] for group in first] == [group["tracking_uid"] for group in second]
    assert first == second


# --- bad inputs -----------------------------------------------------------------------------------


def test_probabilities_missing_a_class_are_refused(cr: PhantomCase, cxr_bundle: BundleInfo) -> None:
    with pytest.raises(ValueError, match=r"probabilities lack class\(es\) \['effusion'\]"):
        build_measurement_report(
            sources=cr.datasets, volume=cr.volume, bundle=cxr_bundle, probabilities={"nodule": 0.9}
        )


@pytest.mark.parametrize(
    ("probabilities", "error", "message"),
    [
        ({**PROBABILITIES, "mass": 0.1}, ValueError, r"class\(es\) \['mass'\] that"),
        ({"nodule": 1.2, "effusion": 0.1}, ValueError, r"'nodule' must lie in \[0, 1\]"),
        ({"nodule": float("nan"), "effusion": 0.1}, ValueError, "'nodule' must lie in"),
        ({"nodule": "high", "effusion": 0.1}, TypeError, "'nodule' must be a number"),
        (None, ValueError, "is a classification model: its probabilities are required"),
    ],
)
def test_bad_probabilities_are_refused(
    cr: PhantomCase,
    cxr_bundle: BundleInfo,
    probabilities: dict[str, object] | None,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        build_measurement_report(
            sources=cr.datasets,
            volume=cr.volume,
            bundle=cxr_bundle,
            probabilities=probabilities,  # type: ignore[arg-type]
        )


def test_label_map_of_another_shape_is_refused(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    with pytest.raises(ValueError, match=r"label_map has shape \(64, 128, 127\)"):
        build_measurement_report(
            sources=ct.datasets,
            volume=ct.volume,
            bundle=ct_bundle,
            label_map=label_map_of(ct)[:, :, 1:],
        )


def test_no_sources_are_refused(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    with pytest.raises(ValueError, match="no source instances"):
        build_measurement_report(
            sources=[], volume=ct.volume, bundle=ct_bundle, label_map=label_map_of(ct)
        )


def test_seg_of_another_label_map_is_refused(
    ct: PhantomCase, ct_bundle: BundleInfo, seg: hd.seg.Segmentation
) -> None:
    label_map = label_map_of(ct).copy()
    label_map[label_map == 2] = 0
    with pytest.raises(ValueError, match="segmentation has 3 segments, the label map 2 labels"):
        build_measurement_report(
            sources=ct.datasets,
            volume=ct.volume,
            bundle=ct_bundle,
            segmentation=seg,
            label_map=label_map,
        )


def test_segmentation_model_needs_its_label_map(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    with pytest.raises(ValueError, match="segmentation model: its label_map is required"):
        build_measurement_report(sources=ct.datasets, volume=ct.volume, bundle=ct_bundle)
    with pytest.raises(ValueError, match="pass label_map, not probabilities"):
        build_measurement_report(
            sources=ct.datasets,
            volume=ct.volume,
            bundle=ct_bundle,
            label_map=label_map_of(ct),
            probabilities=PROBABILITIES,
        )


def test_classification_model_takes_no_label_map(cr: PhantomCase, cxr_bundle: BundleInfo) -> None:
    with pytest.raises(ValueError, match="classification model: pass probabilities, not a label"):
        build_measurement_report(
            sources=cr.datasets,
            volume=cr.volume,
            bundle=cxr_bundle,
            probabilities=PROBABILITIES,
            label_map=np.zeros(cr.volume.array.shape, dtype=np.uint16),
        )


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5])
def test_threshold_out_of_range_is_refused(
    cr: PhantomCase, cxr_bundle: BundleInfo, threshold: float
) -> None:
    with pytest.raises(ValueError, match="threshold must lie strictly between 0 and 1"):
        build_measurement_report(
            sources=cr.datasets,
            volume=cr.volume,
            bundle=cxr_bundle,
            probabilities=PROBABILITIES,
            threshold=threshold,
        )


def test_reading_a_non_sr_is_a_report_error(ct: PhantomCase) -> None:
    with pytest.raises(ReportError, match="not a Comprehensive 3D SR"):
        read_measurements(ct.datasets[0])
