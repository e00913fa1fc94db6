"""A model's findings as a TID 1500 Measurement Report in a Comprehensive 3D SR (PS3.3 A.35.13).

Content tree (PS3.16 TID 1500 Measurement Report):

- Observation context (TID 1001): the observer is a device (TID 1004): Device Observer Name is
  the model's name, Manufacturer and Model Name pacsai's, and the Device Observer UID is derived
  from those and the model version, so it is the same for every report of one model version.
- Procedure Reported: the items of the source study's Procedure Code Sequence (0008,1032) when
  it has any, else the modality's code from CID 100 (see :mod:`pacsai.reporting.codes`).
- Imaging Measurements, one measurement group per bundle label, in the bundle's order:

  segmentation model, label present, SEG given
      TID 1411 Volumetric ROI Measurements: Tracking Identifier and Tracking UID of the SEG
      segment (so SR group and SEG segment name one finding), Finding Category and Finding
      (the segment's property category and type), the Referenced Segment (TID 1411 row 8) with
      the Source Series for Segmentation (the SEG itself references the source image of each
      of its frames), the qualitative evaluation "<finding> = Present", and the
      measurements: Volume in cm3 (= ml), the voxel count times the voxel volume
      ``|det(affine[:3, :3])|``; for CT also the mean and the (population, ddof=0) standard
      deviation of the Hounsfield units inside the segment, as Attenuation Coefficient with
      Derivation Mean / Standard Deviation.
  segmentation model, label present, no SEG
      TID 1501 Measurement Group with the same measurements and the slices holding the label as
      source images (Source of Measurement).
  segmentation model, label absent
      TID 1501 Measurement Group: "<finding> = Absent", every slice the model read as source.
  classification model
      TID 1501 Measurement Group: Certainty of Finding in percent (the class probability times
      100) and "<finding> = Present" when the probability is at least ``threshold`` (default
      0.5), else "Absent"; the image(s) the model read as source.

The SEG may be given as the data set or, so that both can be built at once, as the
:class:`~pacsai.reporting.seg.ReferencedSegmentation` it will have. The measurements of all labels
come from one pass over the label map and the volume (:func:`_label_statistics`), not one per
label.

Every group carries the Algorithm Identification (TID 4019: model name, version with weights
checksum, family Artificial Intelligence). A projection image has no physical volume, so its
groups carry presence only.

Header: Completion Flag COMPLETE (the report holds everything the model states), Preliminary Flag
PRELIMINARY and Verification Flag UNVERIFIED (nobody accountable has read it: it is not for
primary diagnosis until a radiologist has), Series Description "AI SR <model> <version> (not for
primary diagnosis)".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypedDict

import highdicom as hd
import numpy as np
from highdicom.sr import (
    CodedConcept,
    Comprehensive3DSR,
    Measurement,
    MeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    SourceSeriesForSegmentation,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

import pacsai
from pacsai.errors import ReportError
from pacsai.inference.bundle import BundleInfo
from pacsai.inference.labels import Code, LabelSemantics
from pacsai.inference.volume import Volume
from pacsai.reporting._common import (
    DEFAULT_DEVICE_SERIAL_NUMBER,
    LabelCounts,
    MatchedSources,
    check_label_map,
    check_positive_int,
    check_uid,
    lo,
    match_sources,
    series_description,
    source_person_names,
)
from pacsai.reporting._highdicom_compat import comprehensive_3d_sr
from pacsai.reporting._uids import result_uid
from pacsai.reporting.codes import (
    ABSENT,
    ALGORITHM_FAMILY,
    ATTENUATION_COEFFICIENT,
    CERTAINTY_OF_FINDING,
    CUBIC_CENTIMETER,
    DEVICE_OBSERVER,
    HOUNSFIELD_UNIT,
    MEAN,
    PERCENT,
    PRESENT,
    STANDARD_DEVIATION,
    VOLUME,
    coded_concept,
    procedure_code,
)
from pacsai.reporting.seg import SEGMENTATION_SOP_CLASSES, ReferencedSegmentation

__all__ = [
    "FindingRecord",
    "MeasuredValue",
    "build_measurement_report",
    "read_measurements",
    "retarget_report",
]

_SEGMENTATION_CLASSES = frozenset(str(uid) for uid in SEGMENTATION_SOP_CLASSES.values())

_REFERENCED_SOP_INSTANCE_UID = 0x00081155

# CONTAINS CODE items of a measurement group that are not qualitative evaluations.
_NOT_EVALUATIONS = (
    CodedConcept("276214006", "SCT", "Finding category"),
    CodedConcept("121071", "DCM", "Finding"),
)


class _Segment(NamedTuple):
    """A SEG segment that an SR group refers to."""

    number: int
    tracking_uid: str | None
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class _LabelStatistics:
    """Voxel count, and for CT the mean and standard deviation (ddof=0) of the Hounsfield
    units, of one label."""

    count: int
    mean: float | None
    std: float | None


_Group = MeasurementsAndQualitativeEvaluations | VolumetricROIMeasurementsAndQualitativeEvaluations


class MeasuredValue(TypedDict):
    """A numeric measurement read back from a report: value and UCUM unit code."""

    value: float
    unit: str


class FindingRecord(TypedDict):
    """One measurement group of a TID 1500 report, as :func:`read_measurements` returns it.

    ``measurements`` maps the concept name's meaning, followed by `` (<derivation>)`` when the
    measurement has a Derivation, to its value; ``evaluations`` maps a qualitative evaluation's
    concept name meaning to its value's meaning (``{"Nodule": "Present"}``).
    """

    template: str
    tracking_identifier: str | None
    tracking_uid: str | None
    finding: Code | None
    finding_category: Code | None
    referenced_sop_instance_uid: str | None
    referenced_segment_number: int | None
    measurements: dict[str, MeasuredValue]
    evaluations: dict[str, str]


def build_measurement_report(
    *,
    sources: Sequence[Dataset] | MatchedSources,
    volume: Volume,
    bundle: BundleInfo,
    segmentation: Dataset | ReferencedSegmentation | None = None,
    label_map: np.ndarray | LabelCounts | None = None,
    probabilities: Mapping[str, float] | None = None,
    series_number: int = 9902,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    threshold: float = 0.5,
    manufacturer: str = "pacsai",
    manufacturer_model_name: str = "pacsai",
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    software_versions: str = pacsai.__version__,
) -> Dataset:
    """Build the TID 1500 Measurement Report of a model's output.

    Parameters
    ----------
    sources : sequence of pydicom.dataset.Dataset
        The source instances, in any order; every instance a slice of ``volume`` comes from must
        be among them.
    volume : pacsai.inference.volume.Volume
        The volume the model read.
    bundle : pacsai.inference.bundle.BundleInfo
        The model.
    segmentation : pydicom.dataset.Dataset or ReferencedSegmentation or None
        Segmentation models: the SEG built from ``label_map``
        (:func:`pacsai.reporting.seg.build_segmentation`), or what
        :func:`pacsai.reporting.seg.referenced_segmentation` says it will be, or None when there
        is none (no label present, or no SEG written). Its segments must be the labels present
        in ``label_map``.
    label_map : numpy.ndarray or None
        Segmentation models: the label map (see :func:`~pacsai.reporting.seg.build_segmentation`).
    probabilities : mapping of str to float or None
        Classification models: the probability of each class, keyed by label name; every class
        of the bundle and no other.
    series_number, instance_number : int
        Series Number (0020,0011) and Instance Number (0020,0013).
    series_instance_uid, sop_instance_uid : str or None
        UIDs to give the SR (see :func:`pacsai.reporting.result_uid`); new ones when None.
        Tracking UIDs of groups without a SEG segment are derived from the SOP Instance UID.
    threshold : float
        Classification: a class is reported Present when its probability is at least this.
    manufacturer, manufacturer_model_name, device_serial_number, software_versions : str
        General Equipment module (PS3.3 C.7.5.1) and the device observer (TID 1004).

    Returns
    -------
    pydicom.dataset.Dataset
        The Comprehensive 3D SR document, to write (read it back with
        ``highdicom.sr.Comprehensive3DSR.from_dataset`` to walk its content).

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If the model's output, the volume, the sources, the SEG and the bundle do not fit
        together, or a value is out of range.
    pacsai.errors.ReportError
        If highdicom refuses the report (the message is highdicom's).
    """
    if not isinstance(bundle, BundleInfo):
        raise TypeError(f"bundle must be a BundleInfo, not {type(bundle).__name__}")
    check_positive_int(series_number, "series_number")
    check_positive_int(instance_number, "instance_number")
    series_uid = check_uid(series_instance_uid, "series_instance_uid") or hd.UID()
    sop_uid = check_uid(sop_instance_uid, "sop_instance_uid") or hd.UID()
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise TypeError(f"threshold must be a number, not {type(threshold).__name__}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    matched = match_sources(sources, volume)

    counts: LabelCounts | None = None
    segments: dict[int, _Segment] | None = None
    checked: dict[str, float] = {}
    if bundle.task == "segmentation":
        if probabilities is not None:
            raise ValueError(
                f"{bundle.name!r} is a segmentation model: pass label_map, not probabilities"
            )
        if label_map is None:
            raise ValueError(f"{bundle.name!r} is a segmentation model: its label_map is required")
        counts = check_label_map(label_map, volume, bundle)
        if isinstance(segmentation, ReferencedSegmentation):
            segments = _referenced_segments(
                segmentation, counts.present(bundle), matched.study_instance_uid
            )
        elif segmentation is not None:
            segments = _segments_of(
                segmentation, counts.present(bundle), matched.study_instance_uid
            )
    else:
        if label_map is not None or segmentation is not None:
            raise ValueError(
                f"{bundle.name!r} is a classification model: pass probabilities, not a label "
                "map or SEG"
            )
        checked = _check_probabilities(probabilities, bundle)

    evidence: list[Dataset] = list(matched.datasets)
    if isinstance(segmentation, ReferencedSegmentation):
        evidence.append(segmentation.evidence())
    elif segmentation is not None:
        evidence.append(segmentation)
    try:
        algorithm = hd.sr.AlgorithmIdentification(
            name=lo(bundle.name),
            version=lo(bundle.display_version),
            family=ALGORITHM_FAMILY,
            parameters=[f"threshold={threshold:g}"] if bundle.task == "classification" else None,
        )
        groups = (
            _segmentation_groups(volume, bundle, counts, matched, segments, algorithm, sop_uid)
            if counts is not None
            else _classification_groups(
                volume, bundle, checked, threshold, matched, algorithm, sop_uid
            )
        )
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid(
                "device observer",
                manufacturer,
                manufacturer_model_name,
                device_serial_number,
                bundle.name,
                bundle.display_version,
            ),
            name=lo(bundle.name),
            manufacturer_name=lo(manufacturer),
            model_name=lo(manufacturer_model_name),
            serial_number=lo(device_serial_number),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(
                observer_device_context=hd.sr.ObserverContext(
                    observer_type=DEVICE_OBSERVER, observer_identifying_attributes=device
                )
            ),
            procedure_reported=_procedures(matched.datasets[0], volume.modality),
            imaging_measurements=groups,
        )
        with source_person_names():
            return comprehensive_3d_sr(
                evidence=evidence,
                content=report[0],
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=sop_uid,
                instance_number=instance_number,
                manufacturer=manufacturer,
                is_complete=True,
                is_final=False,
                is_verified=False,
                series_description=series_description("SR", bundle),
                manufacturer_model_name=manufacturer_model_name,
                software_versions=software_versions,
                device_serial_number=device_serial_number,
            )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise ReportError(f"highdicom refused the SR of {bundle.name!r}: {exc}") from exc


def read_measurements(sr: Dataset) -> list[FindingRecord]:
    """The measurement groups of a TID 1500 Comprehensive 3D SR, in document order.

    Parameters
    ----------
    sr : pydicom.dataset.Dataset
        A Comprehensive 3D SR holding a TID 1500 Measurement Report (as read from a file).

    Returns
    -------
    list of FindingRecord
        One per measurement group (TID 1411 or TID 1501; other groups are skipped).

    Raises
    ------
    TypeError
        If ``sr`` is not a dataset.
    pacsai.errors.ReportError
        If it is not a Comprehensive 3D SR with a TID 1500 report highdicom can parse.
    """
    if not isinstance(sr, Dataset):
        raise TypeError(f"sr must be a pydicom Dataset, not {type(sr).__name__}")
    if str(sr.get("SOPClassUID", "")) != Comprehensive3DSRStorage:
        raise ReportError(f"not a Comprehensive 3D SR (SOP Class {sr.get('SOPClassUID')})")
    try:
        document = Comprehensive3DSR.from_dataset(sr, copy=True)
        report = hd.sr.MeasurementReport.from_sequence([document])
        containers = hd.sr.utils.find_content_items(
            report[0], name=codes.DCM.ImagingMeasurements, value_type="CONTAINER"
        )
        items = (
            hd.sr.utils.find_content_items(
                containers[0], name=codes.DCM.MeasurementGroup, value_type="CONTAINER"
            )
            if containers
            else []
        )
        return [record for item in items if (record := _read_group(item)) is not None]
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise ReportError(f"cannot read the measurement report: {exc}") from exc


# --- building -------------------------------------------------------------------------------------


def _check_probabilities(
    probabilities: Mapping[str, float] | None, bundle: BundleInfo
) -> dict[str, float]:
    if probabilities is None:
        raise ValueError(
            f"{bundle.name!r} is a classification model: its probabilities are required"
        )
    if not isinstance(probabilities, Mapping):
        raise TypeError(
            f"probabilities must be a mapping of class name to probability, not "
            f"{type(probabilities).__name__}"
        )
    names = [label.name for label in bundle.labels]
    missing = [name for name in names if name not in probabilities]
    if missing:
        raise ValueError(f"probabilities lack class(es) {missing} of {bundle.name!r}")
    unknown = sorted(str(name) for name in probabilities if name not in names)
    if unknown:
        raise ValueError(
            f"probabilities name class(es) {unknown} that {bundle.name!r} does not have"
        )
    checked: dict[str, float] = {}
    for name in names:
        value = probabilities[name]
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
            raise TypeError(f"probability of {name!r} must be a number, not {type(value).__name__}")
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"probability of {name!r} must lie in [0, 1], got {value}")
        checked[name] = float(value)
    return checked


def _segments_of(
    segmentation: Dataset, present: list[LabelSemantics], study_instance_uid: str
) -> dict[int, _Segment]:
    """Label value -> the segment of ``segmentation`` made from it; ``ValueError`` unless the
    SEG's segments are exactly the present labels, numbered 1, 2, ... in the bundle's order."""
    if not isinstance(segmentation, Dataset):
        raise TypeError(
            f"segmentation must be a pydicom Dataset, not {type(segmentation).__name__}"
        )
    if str(segmentation.get("SOPClassUID", "")) not in _SEGMENTATION_CLASSES:
        raise ValueError(f"segmentation is not a SEG (SOP Class {segmentation.get('SOPClassUID')})")
    if str(segmentation.get("StudyInstanceUID", "")) != study_instance_uid:
        raise ValueError("segmentation is not in the study of the sources")
    items = [item for item in segmentation.get("SegmentSequence", []) if item.SegmentNumber != 0]
    if len(items) != len(present):
        raise ValueError(
            f"segmentation has {len(items)} segments, the label map {len(present)} labels present "
            f"({', '.join(label.name for label in present) or 'none'})"
        )
    segments: dict[int, _Segment] = {}
    for number, (item, label) in enumerate(zip(items, present, strict=True), start=1):
        try:
            found = (
                int(item.SegmentNumber),
                str(item.SegmentLabel),
                str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue),
            )
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(
                f"segment item {number} of the segmentation is malformed: {exc}"
            ) from exc
        if found != (number, lo(label.name), label.type.value):
            raise ValueError(
                f"segment {item.SegmentNumber} ({item.SegmentLabel!r}) of the segmentation is not "
                f"label {label.name!r}: the SEG was not made from this label map"
            )
        tracking_uid = item.get("TrackingUID")
        segments[label.value] = _Segment(
            number=number,
            tracking_uid=str(tracking_uid) if tracking_uid else None,
            sop_class_uid=str(segmentation.SOPClassUID),
            sop_instance_uid=str(segmentation.SOPInstanceUID),
        )
    return segments


def _referenced_segments(
    segmentation: ReferencedSegmentation, present: list[LabelSemantics], study_instance_uid: str
) -> dict[int, _Segment]:
    """Label value -> segment, as :func:`_segments_of` for a SEG not built yet."""
    if segmentation.study_instance_uid != study_instance_uid:
        raise ValueError("segmentation is not in the study of the sources")
    if segmentation.sop_class_uid not in _SEGMENTATION_CLASSES:
        raise ValueError(f"segmentation is not a SEG (SOP Class {segmentation.sop_class_uid})")
    found = [(segment.label_value, segment.segment_label) for segment in segmentation.segments]
    if found != [(label.value, lo(label.name)) for label in present]:
        raise ValueError(
            f"segmentation has segments {[label for _, label in found]}, the label map the labels "
            f"{[label.name for label in present]} present: it was not made from this label map"
        )
    return {
        segment.label_value: _Segment(
            number=segment.segment_number,
            tracking_uid=segment.tracking_uid,
            sop_class_uid=segmentation.sop_class_uid,
            sop_instance_uid=segmentation.sop_instance_uid,
        )
        for segment in segmentation.segments
    }


def _image_references(
    matched: MatchedSources, volume: Volume, slices: Sequence[int] | None = None
) -> list[tuple[str, str, list[int] | None]]:
    """(SOP Class UID, SOP Instance UID, frame numbers or None) of the given slices (default:
    all), one entry per instance."""
    frames: dict[str, tuple[str, list[int]]] = {}
    for index in range(len(volume.sources)) if slices is None else slices:
        ds, frame = matched.slice_reference(index, volume)
        entry = frames.setdefault(str(ds.SOPInstanceUID), (str(ds.SOPClassUID), []))
        if frame is not None:
            entry[1].append(frame)
    return [(cls, uid, sorted(numbers) or None) for uid, (cls, numbers) in frames.items()]


def _source_images(
    matched: MatchedSources, volume: Volume, slices: Sequence[int] | None = None
) -> list[SourceImageForMeasurementGroup]:
    """Source of Measurement items (TID 1501) for the given volume slices (default: all)."""
    return [
        SourceImageForMeasurementGroup(cls, uid, frames)
        for cls, uid, frames in _image_references(matched, volume, slices)
    ]


def _label_statistics(volume: Volume, counts: LabelCounts) -> dict[int, _LabelStatistics]:
    """Voxel count, and for CT the HU mean and standard deviation, of every label present.

    Two passes over the slices that hold a label, one ``bincount`` per slice each: the sums
    per label, then the squared deviations from each label's mean (as ``numpy.std`` computes
    it, without the cancellation of a sum of squares). Comparing the map with every label
    instead would read it once per label (104 times for a whole-body model).
    """
    present = [value for value, count in counts.counts.items() if count > 0]
    voxels = counts.slice_counts.sum(axis=0)
    if volume.modality != "CT" or volume.frame_of_reference_uid is None or not present:
        return {value: _LabelStatistics(int(voxels[value]), None, None) for value in present}
    if counts.overlapping:  # one mask per label: a voxel may belong to several labels
        statistics = {}
        for value in present:
            inside = volume.array[counts.label_map[counts.channels[value]]]  # type: ignore[index]
            statistics[value] = _LabelStatistics(
                int(inside.size), float(inside.mean()), float(inside.std())
            )
        return statistics
    width = counts.slice_counts.shape[1]
    holding = np.flatnonzero(counts.slice_counts[:, 1:].any(axis=1)).tolist()
    label_map = counts.label_map
    sums = np.zeros(width, dtype=np.float64)
    for index in holding:
        labels = label_map[index].ravel().astype(np.intp, copy=False)
        sums += np.bincount(labels, weights=volume.array[index].ravel(), minlength=width)
    means = sums / np.maximum(voxels, 1)
    squares = np.zeros(width, dtype=np.float64)
    for index in holding:
        labels = label_map[index].ravel().astype(np.intp, copy=False)
        deviations = volume.array[index].ravel().astype(np.float64) - means[labels]
        squares += np.bincount(labels, weights=deviations * deviations, minlength=width)
    return {
        value: _LabelStatistics(
            int(voxels[value]),
            float(means[value]),
            float(math.sqrt(squares[value] / voxels[value])),
        )
        for value in present
    }


def _region_measurements(volume: Volume, statistics: _LabelStatistics) -> list[Measurement]:
    """Volume (and for CT the HU mean and SD) of one label."""
    if volume.frame_of_reference_uid is None:
        return []  # a projection image: its pixels have no volume in the patient
    voxel_mm3 = abs(float(np.linalg.det(volume.affine[:3, :3])))
    measurements = [
        Measurement(name=VOLUME, value=statistics.count * voxel_mm3 / 1000.0, unit=CUBIC_CENTIMETER)
    ]
    if statistics.mean is not None and statistics.std is not None:
        measurements += [
            Measurement(
                name=ATTENUATION_COEFFICIENT,
                value=statistics.mean,
                unit=HOUNSFIELD_UNIT,
                derivation=MEAN,
            ),
            Measurement(
                name=ATTENUATION_COEFFICIENT,
                value=statistics.std,
                unit=HOUNSFIELD_UNIT,
                derivation=STANDARD_DEVIATION,
            ),
        ]
    return measurements


def _segmentation_groups(
    volume: Volume,
    bundle: BundleInfo,
    counts: LabelCounts,
    matched: MatchedSources,
    segments: dict[int, _Segment] | None,
    algorithm: hd.sr.AlgorithmIdentification,
    sop_uid: str,
) -> list[_Group]:
    groups: list[_Group] = []
    statistics = _label_statistics(volume, counts)
    every_slice: list[SourceImageForMeasurementGroup] | None = None
    for label in bundle.labels:
        finding = coded_concept(label.type)
        category = coded_concept(label.category)
        own_tracking = TrackingIdentifier(
            uid=result_uid(sop_uid, "finding", str(label.value)), identifier=lo(label.name)
        )
        if label.value not in statistics:
            if every_slice is None:  # the same items for every absent label
                every_slice = _source_images(matched, volume)
            groups.append(
                MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=own_tracking,
                    finding_type=finding,
                    finding_category=category,
                    algorithm_id=algorithm,
                    qualitative_evaluations=[QualitativeEvaluation(finding, ABSENT)],
                    source_images=every_slice,
                )
            )
            continue
        measurements = _region_measurements(volume, statistics[label.value])
        present = [QualitativeEvaluation(finding, PRESENT)]
        if segments is None:
            groups.append(
                MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=own_tracking,
                    finding_type=finding,
                    finding_category=category,
                    algorithm_id=algorithm,
                    measurements=measurements,
                    qualitative_evaluations=present,
                    source_images=_source_images(matched, volume, counts.slices_with(label.value)),
                )
            )
            continue
        segment = segments[label.value]
        # Built here rather than with ReferencedSegment.from_segmentation, which fails on a
        # LABELMAP SEG in highdicom 0.28 (it looks for per-frame Segment Identification).
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=segment.sop_class_uid,
            sop_instance_uid=segment.sop_instance_uid,
            segment_number=segment.number,
            source_series=SourceSeriesForSegmentation(volume.series_instance_uid),
        )
        groups.append(
            VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=(
                    TrackingIdentifier(uid=segment.tracking_uid, identifier=lo(label.name))
                    if segment.tracking_uid
                    else own_tracking
                ),
                referenced_segment=referenced,
                finding_type=finding,
                finding_category=category,
                algorithm_id=algorithm,
                measurements=measurements,
                qualitative_evaluations=present,
            )
        )
    return groups


def _classification_groups(
    volume: Volume,
    bundle: BundleInfo,
    probabilities: dict[str, float],
    threshold: float,
    matched: MatchedSources,
    algorithm: hd.sr.AlgorithmIdentification,
    sop_uid: str,
) -> list[_Group]:
    groups: list[_Group] = []
    for label in bundle.labels:
        finding = coded_concept(label.type)
        probability = probabilities[label.name]
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=result_uid(sop_uid, "finding", str(label.value)),
                    identifier=lo(label.name),
                ),
                finding_type=finding,
                finding_category=coded_concept(label.category),
                algorithm_id=algorithm,
                measurements=[
                    Measurement(name=CERTAINTY_OF_FINDING, value=probability * 100.0, unit=PERCENT)
                ],
                qualitative_evaluations=[
                    QualitativeEvaluation(finding, PRESENT if probability >= threshold else ABSENT)
                ],
                source_images=_source_images(matched, volume),
            )
        )
    return groups


def _procedures(first: Dataset, modality: str) -> list[CodedConcept]:
    """The study's Procedure Code Sequence items, else the modality's CID 100 code."""
    procedures: list[CodedConcept] = []
    for item in first.get("ProcedureCodeSequence") or []:
        try:
            procedures.append(CodedConcept.from_dataset(item))
        except (AttributeError, TypeError, ValueError):
            continue  # a malformed code in the source: fall back to the modality's code
    return procedures or [procedure_code(modality)]


# --- reading --------------------------------------------------------------------------------------


def _code(concept: CodedConcept | None) -> Code | None:
    if concept is None:
        return None
    return Code(str(concept.value), str(concept.scheme_designator), str(concept.meaning))


def _read_group(item: Dataset) -> FindingRecord | None:
    templates = item.get("ContentTemplateSequence") or []
    template = str(templates[0].TemplateIdentifier) if templates else ""
    if not template:
        names = {
            str(child.ConceptNameCodeSequence[0].CodeValue)
            for child in item.get("ContentSequence", [])
            if "ConceptNameCodeSequence" in child
        }
        template = "1411" if "121191" in names else "1501"  # 121191: Referenced Segment
    group: _Group
    if template == "1411":
        group = VolumetricROIMeasurementsAndQualitativeEvaluations.from_sequence([item])
    elif template == "1501":
        group = MeasurementsAndQualitativeEvaluations.from_sequence([item])
    else:
        return None

    segment_uid: str | None = None
    segment_number: int | None = None
    if isinstance(group, VolumetricROIMeasurementsAndQualitativeEvaluations):
        referenced = group.referenced_segment
        if referenced is not None:
            segment_item = referenced[0]
            segment_uid = str(segment_item.referenced_sop_instance_uid)
            numbers = segment_item.referenced_segment_numbers
            segment_number = int(numbers[0]) if numbers else None

    measurements: dict[str, MeasuredValue] = {}
    for measurement in group.get_measurements():
        key = str(measurement.name.meaning)
        if measurement.derivation is not None:
            key += f" ({measurement.derivation.meaning})"
        measurements[key] = {
            "value": float(measurement.value),
            "unit": str(measurement.unit.value),
        }
    # TID 1501 row 13 / TID 1411 row 14 qualitative evaluations: CONTAINS CODE items other than
    # Finding and Finding category. Not group.get_qualitative_evaluations(): in highdicom 0.28 it
    # also returns the Finding category and the Algorithm Family (a TID 4019 concept modifier).
    evaluations = {
        str(item.ConceptNameCodeSequence[0].CodeMeaning): str(
            item.ConceptCodeSequence[0].CodeMeaning
        )
        for item in hd.sr.utils.find_content_items(
            group[0], value_type="CODE", relationship_type="CONTAINS"
        )
        if hd.sr.utils.get_coded_name(item) not in _NOT_EVALUATIONS
    }
    tracking_uid = group.tracking_uid
    return {
        "template": template,
        "tracking_identifier": group.tracking_identifier,
        "tracking_uid": str(tracking_uid) if tracking_uid is not None else None,
        "finding": _code(group.finding_type),
        "finding_category": _code(group.finding_category),
        "referenced_sop_instance_uid": segment_uid,
        "referenced_segment_number": segment_number,
        "measurements": measurements,
        "evaluations": evaluations,
    }


# --- another SEG ----------------------------------------------------------------------------------


def retarget_report(
    report: Dataset,
    *,
    segmentation: str,
    replacement_sop_class_uid: str,
    replacement_sop_instance_uid: str,
    sop_instance_uid: str,
) -> None:
    """Make a report refer to another encoding of its SEG, as a new SR instance (in place).

    The BINARY form of a LABELMAP SEG has the same segments, numbered the same, with the same
    Tracking UIDs; only its SOP Class and Instance differ. The report that goes with it is the
    same report with those references (Referenced Segment items, the evidence) changed, and its
    own SOP Instance UID; it stays in the same series.

    Parameters
    ----------
    report : pydicom.dataset.Dataset
        A report as read from its file (changed in place: read a copy for this).
    segmentation : str
        SOP Instance UID of the SEG the report refers to now.
    replacement_sop_class_uid, replacement_sop_instance_uid : str
        The SEG it is to refer to instead.
    sop_instance_uid : str
        SOP Instance UID of the changed report.

    Raises
    ------
    ValueError
        If the report does not refer to ``segmentation``.
    """
    replaced = 0

    def visit(dataset: Dataset, element: DataElement) -> None:
        nonlocal replaced
        if element.tag == _REFERENCED_SOP_INSTANCE_UID and element.value == segmentation:
            element.value = replacement_sop_instance_uid
            dataset.ReferencedSOPClassUID = replacement_sop_class_uid
            replaced += 1

    report.walk(visit)
    if not replaced:
        raise ValueError(f"the report does not refer to SEG {segmentation}")
    report.SOPInstanceUID = sop_instance_uid
    meta = getattr(report, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = sop_instance_uid
