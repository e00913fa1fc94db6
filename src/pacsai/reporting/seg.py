"""A model's label map as a DICOM Segmentation (PS3.3 A.51) or Label Map Segmentation (A.51.2).

The SEG is a new series in the source study: highdicom copies the Patient, General Study and
Patient Study modules and the Frame of Reference from the source images, and references, frame by
frame, the source image each segmentation frame was derived from (Derivation Image Functional
Group, PS3.3 C.7.6.16.2.6). The label map's slice ``k`` belongs to ``volume.sources[k]``; the
source images are handed to highdicom in that order (single-frame sources), or the label map is
put in the frame order of the one multi-frame source, so that every frame lands on its source.

One segment per bundle label that has at least one voxel (Segment Description, PS3.3 C.8.20.2):
label, Segmented Property Category and Type (CID 7150/7151) from the bundle, with its laterality
as Segmented Property Type Modifier when it has one, Recommended Display
CIELab Value from its RGB colour, algorithm type AUTOMATIC and the Segmentation Algorithm
Identification (family DCM 123110 Artificial Intelligence, name and version of the model, the
version carrying the weights checksum). Segments are numbered 1, 2, ... in the bundle's label
order, skipping absent labels, in both segmentation types: segment numbers are not label values.

A multi-label model's masks (overlapping labels) always give a BINARY SEG, one segment per mask.
A label map with no label at all gives no SEG: :func:`build_segmentation` raises
:class:`EmptySegmentationError`, and the caller writes only the SR, which reports every label
absent (:func:`pacsai.reporting.sr.build_measurement_report`).

highdicom builds the LABELMAP; a BINARY SEG is that LABELMAP rewritten
(:func:`pacsai.reporting.binary_seg.binary_from_labelmap`), which gives the same object as
highdicom's BINARY path several times faster for many segments. :func:`referenced_segmentation`
says, before the SEG is built, what an SR needs to reference it (SOP Class and Instance, the
segment numbers and Tracking UIDs), so that the SEG and the SR can be built at the same time.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
from highdicom.seg import (
    Segmentation,
    SegmentationTypeValues,
    SegmentDescription,
)
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    SegmentationStorage,
)

import pacsai
from pacsai.errors import ReportError
from pacsai.inference.bundle import BundleInfo
from pacsai.inference.labels import LabelSemantics
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
from pacsai.reporting._uids import result_uid
from pacsai.reporting.binary_seg import binary_from_labelmap
from pacsai.reporting.codes import ALGORITHM_FAMILY, coded_concept
from pacsai.reporting.sop_classes import LABEL_MAP_SEGMENTATION_STORAGE

__all__ = [
    "CONTENT_LABEL",
    "SEGMENTATION_SOP_CLASSES",
    "EmptySegmentationError",
    "ReferencedSegment",
    "ReferencedSegmentation",
    "build_segmentation",
    "referenced_segmentation",
]

#: Content Label (0070,0080) of every SEG pacsai writes (CS: at most 16 characters).
CONTENT_LABEL = "AI_SEGMENTATION"

SegmentationType = Literal["BINARY", "LABELMAP"]

#: SOP Class of each segmentation type.
SEGMENTATION_SOP_CLASSES: dict[str, UID] = {
    "BINARY": SegmentationStorage,
    "LABELMAP": LABEL_MAP_SEGMENTATION_STORAGE,
}

# Transfer syntaxes a SEG may be written in, per type: highdicom compresses LABELMAP frames;
# a BINARY SEG (1 bit per pixel, which those codecs do not take) is deflated as a whole.
_TRANSFER_SYNTAXES = {
    "LABELMAP": (ExplicitVRLittleEndian, JPEGLSLossless),
    "BINARY": (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian),
}


class EmptySegmentationError(ReportError):
    """No label of the bundle is present in the label map, so there is nothing to segment.

    A Segmentation needs at least one segment (PS3.3 C.8.20.2, Segment Sequence is Type 1); write
    the SR alone, which reports every label absent.
    """


@dataclass(frozen=True)
class ReferencedSegment:
    """One segment of a SEG, as an SR refers to it."""

    label_value: int
    segment_number: int
    segment_label: str
    tracking_uid: str


@dataclass(frozen=True)
class ReferencedSegmentation:
    """What an SR needs to reference a SEG: known before the SEG is built.

    Attributes
    ----------
    sop_class_uid, sop_instance_uid, series_instance_uid, study_instance_uid : str
        The SEG's identity.
    segments : tuple of ReferencedSegment
        Its segments, in segment number order (the bundle's order of the labels present).
    """

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    segments: tuple[ReferencedSegment, ...]

    def evidence(self) -> Dataset:
        """The attributes of the SEG an SR lists as evidence (PS3.3 C.17.2.3)."""
        dataset = Dataset()
        dataset.SOPClassUID = self.sop_class_uid
        dataset.SOPInstanceUID = self.sop_instance_uid
        dataset.SeriesInstanceUID = self.series_instance_uid
        dataset.StudyInstanceUID = self.study_instance_uid
        return dataset


def referenced_segmentation(
    *,
    label_map: LabelCounts,
    bundle: BundleInfo,
    segmentation_type: SegmentationType,
    sop_instance_uid: str,
    series_instance_uid: str,
    study_instance_uid: str,
) -> ReferencedSegmentation:
    """The SEG that :func:`build_segmentation` builds with these arguments, as an SR refers to
    it (segment numbers and Tracking UIDs are derived the same way).

    Raises
    ------
    EmptySegmentationError
        If no label is present.
    """
    present = _present(label_map, bundle)
    return ReferencedSegmentation(
        sop_class_uid=str(SEGMENTATION_SOP_CLASSES[segmentation_type]),
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid,
        study_instance_uid=study_instance_uid,
        segments=tuple(
            ReferencedSegment(
                label_value=label.value,
                segment_number=number,
                segment_label=lo(label.name),
                tracking_uid=str(_segment_tracking_uid(sop_instance_uid, number)),
            )
            for number, label in enumerate(present, start=1)
        ),
    )


def _present(counts: LabelCounts, bundle: BundleInfo) -> list[LabelSemantics]:
    present = counts.present(bundle)
    if not present:
        raise EmptySegmentationError(
            f"no label of {bundle.name!r} is present in the label map: there is no segment to "
            "write; write the SR alone (it reports every label absent)"
        )
    return present


def build_segmentation(
    *,
    sources: Sequence[Dataset] | MatchedSources,
    volume: Volume,
    label_map: np.ndarray | LabelCounts,
    bundle: BundleInfo,
    series_number: int = 9901,
    instance_number: int = 1,
    segmentation_type: SegmentationType = "BINARY",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    manufacturer: str = "pacsai",
    manufacturer_model_name: str = "pacsai",
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    software_versions: str = pacsai.__version__,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    executor: Executor | None = None,
) -> Dataset:
    """Build the SEG of a segmentation model's output.

    Parameters
    ----------
    sources : sequence of pydicom.dataset.Dataset
        The source instances (pixel data not needed), in any order; every instance a slice of
        ``volume`` comes from must be among them, others are ignored.
    volume : pacsai.inference.volume.Volume
        The volume the model read.
    label_map : numpy.ndarray
        Integer array shaped like ``volume.array``: 0 is background, other values are the
        bundle's label values. Slice ``k`` belongs to ``volume.sources[k]``. Or the
        ``LabelCounts`` that ``check_label_map`` returned for it (counted once per result).
    bundle : pacsai.inference.bundle.BundleInfo
        The segmentation model.
    series_number, instance_number : int
        Series Number (0020,0011) and Instance Number (0020,0013).
    segmentation_type : {"BINARY", "LABELMAP"}
        ``BINARY``: Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4), one bit per pixel and
        segment, frames without any pixel of their segment omitted. ``LABELMAP``: Label Map
        Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.7, DICOM 2024), one frame per slice
        that holds any segment, pixel values being segment numbers; fewer viewers read it yet.
    series_instance_uid, sop_instance_uid : str or None
        UIDs to give the SEG, e.g. from :func:`pacsai.reporting.result_uid` so that a re-run
        writes the same instance; new random UIDs when None. Segment Tracking UIDs are derived
        from the SOP Instance UID, so the same UIDs give the same content.
    manufacturer, manufacturer_model_name, device_serial_number, software_versions : str
        Enhanced General Equipment module (PS3.3 C.7.5.2).
    transfer_syntax_uid : str
        The transfer syntax the SEG is encoded in when written: Explicit VR Little Endian
        (default), or lossless compression: JPEG-LS Lossless (frame by frame) for LABELMAP,
        Deflated Explicit VR Little Endian (the whole data set) for BINARY.
    executor : concurrent.futures.Executor or None
        Threads to pack a BINARY SEG's bits in (NumPy releases the GIL there).

    Returns
    -------
    pydicom.dataset.Dataset
        A ``highdicom.seg.Segmentation`` for LABELMAP; for BINARY a pydicom data set whose
        per-frame functional groups are already encoded (read it back with
        ``highdicom.seg.segread`` after writing it, or ``Segmentation.from_dataset``).

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If the label map, the volume, the sources and the bundle do not fit together, or an
        argument is out of range.
    EmptySegmentationError
        If the label map holds no label at all.
    pacsai.errors.ReportError
        If highdicom refuses the segmentation (the message is highdicom's), or the sources are
        several multi-frame instances or part of one.
    """
    if segmentation_type not in ("BINARY", "LABELMAP"):
        raise ValueError(f"segmentation_type must be BINARY or LABELMAP, got {segmentation_type!r}")
    if transfer_syntax_uid not in _TRANSFER_SYNTAXES[segmentation_type]:
        allowed = " or ".join(UID(uid).name for uid in _TRANSFER_SYNTAXES[segmentation_type])
        given = UID(transfer_syntax_uid).name
        raise ValueError(f"a {segmentation_type} SEG is written in {allowed}, not {given}")
    check_positive_int(series_number, "series_number")
    check_positive_int(instance_number, "instance_number")
    series_uid = check_uid(series_instance_uid, "series_instance_uid") or hd.UID()
    sop_uid = check_uid(sop_instance_uid, "sop_instance_uid") or hd.UID()
    counts = check_label_map(label_map, volume, bundle)
    matched = match_sources(sources, volume)

    present = _present(counts, bundle)

    pixels: np.ndarray
    if counts.overlapping:
        # A multi-label model's masks may overlap: one binary plane per segment (frames, rows,
        # columns, segments), which only a BINARY SEG can carry, whatever was asked for.
        pixels = np.stack([counts.mask(label) for label in present], axis=-1).astype(np.uint8)
        if segmentation_type == "LABELMAP":
            segmentation_type = "BINARY"
            transfer_syntax_uid = DeflatedExplicitVRLittleEndian
    else:
        # Label values -> segment numbers, the pixels of a LABELMAP.
        dtype = np.uint8 if len(present) < 256 else np.uint16
        lookup = np.zeros(max(counts.counts, default=0) + 1, dtype=dtype)
        for number, label in enumerate(present, start=1):
            lookup[label.value] = number
        pixels = lookup[counts.label_map]
    if matched.frame_order is not None:
        pixels = pixels[list(matched.frame_order)]

    try:
        algorithm = hd.AlgorithmIdentificationSequence(
            name=lo(bundle.name),
            family=ALGORITHM_FAMILY,
            version=lo(bundle.display_version),
            source="pacsai",
            parameters={"weights_sha256": bundle.weights_sha256},
        )
        descriptions = [
            SegmentDescription(
                segment_number=number,
                segment_label=lo(label.name),
                segmented_property_category=coded_concept(label.category),
                segmented_property_type=coded_concept(label.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=_segment_tracking_uid(sop_uid, number),
                tracking_id=lo(label.name),
                display_color=hd.color.CIELabColor.from_rgb(*label.color),
            )
            for number, label in enumerate(present, start=1)
        ]
        for description, label in zip(descriptions, present, strict=True):
            if label.modifier is not None:  # laterality (PS3.3 C.8.20.2, Type 3)
                description.SegmentedPropertyTypeCodeSequence[
                    0
                ].SegmentedPropertyTypeModifierCodeSequence = [coded_concept(label.modifier)]
        with source_person_names():
            labelmap = Segmentation(
                source_images=list(matched.datasets),
                pixel_array=pixels,
                segmentation_type=(
                    SegmentationTypeValues.BINARY
                    if counts.overlapping
                    else SegmentationTypeValues.LABELMAP
                ),
                segment_descriptions=descriptions,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=sop_uid,
                instance_number=instance_number,
                manufacturer=manufacturer,
                manufacturer_model_name=manufacturer_model_name,
                software_versions=software_versions,
                device_serial_number=device_serial_number,
                transfer_syntax_uid=(
                    transfer_syntax_uid
                    if segmentation_type == "LABELMAP"
                    else ExplicitVRLittleEndian  # BINARY: frames encoded below (or by pydicom)
                ),
                omit_empty_frames=True,
                content_label=CONTENT_LABEL,
                content_description=lo(
                    f"{bundle.name} {bundle.display_version}, automatic: not for primary diagnosis"
                ),
                series_description=series_description("SEG", bundle),
            )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise ReportError(f"highdicom refused the SEG of {bundle.name!r}: {exc}") from exc
    if segmentation_type == "LABELMAP":
        return labelmap
    if counts.overlapping:  # built BINARY by highdicom: deflated (if asked) when written
        labelmap.file_meta.TransferSyntaxUID = UID(transfer_syntax_uid)
        return labelmap
    binary = binary_from_labelmap(labelmap, sop_instance_uid=sop_uid, executor=executor)
    binary.file_meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    return binary


def _segment_tracking_uid(sop_instance_uid: str, segment_number: int) -> UID:
    """Tracking UID (0062,0021) of segment ``segment_number`` of the SEG ``sop_instance_uid``.

    The SR's measurement group for the segment carries the same UID (TID 4108), which is what
    ties the two objects' statements about one finding together.
    """
    return result_uid(sop_instance_uid, "segment", str(segment_number))
