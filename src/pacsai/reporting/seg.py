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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import highdicom as hd
import numpy as np
from highdicom.seg import (
    Segmentation,
    SegmentationTypeValues,
    SegmentDescription,
)
from pydicom.dataset import Dataset
from pydicom.uid import UID

import pacsai
from pacsai.errors import ReportError
from pacsai.inference.bundle import BundleInfo
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
from pacsai.reporting.codes import ALGORITHM_FAMILY, coded_concept

__all__ = ["CONTENT_LABEL", "EmptySegmentationError", "build_segmentation"]

#: Content Label (0070,0080) of every SEG pacsai writes (CS: at most 16 characters).
CONTENT_LABEL = "AI_SEGMENTATION"

SegmentationType = Literal["BINARY", "LABELMAP"]


class EmptySegmentationError(ReportError):
    """No label of the bundle is present in the label map, so there is nothing to segment.

    A Segmentation needs at least one segment (PS3.3 C.8.20.2, Segment Sequence is Type 1); write
    the SR alone, which reports every label absent.
    """


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
) -> Segmentation:
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

    Returns
    -------
    highdicom.seg.Segmentation

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
    check_positive_int(series_number, "series_number")
    check_positive_int(instance_number, "instance_number")
    series_uid = check_uid(series_instance_uid, "series_instance_uid") or hd.UID()
    sop_uid = check_uid(sop_instance_uid, "sop_instance_uid") or hd.UID()
    counts = check_label_map(label_map, volume, bundle)
    matched = match_sources(sources, volume)

    present = counts.present(bundle)
    if not present:
        raise EmptySegmentationError(
            f"no label of {bundle.name!r} is present in the label map: there is no segment to "
            "write; write the SR alone (it reports every label absent)"
        )

    pixels: np.ndarray
    if counts.overlapping:
        # A multi-label model's masks may overlap: one binary plane per segment (frames, rows,
        # columns, segments), which only BINARY can carry.
        segmentation_type = "BINARY"
        pixels = np.stack([counts.mask(label) for label in present], axis=-1).astype(np.uint8)
    else:
        # Label values -> segment numbers; highdicom takes this "label-map style" array for
        # both types and splits it into one binary frame per segment for BINARY.
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
            segmentation = Segmentation(
                source_images=list(matched.datasets),
                pixel_array=pixels,
                segmentation_type=SegmentationTypeValues(segmentation_type),
                segment_descriptions=descriptions,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=sop_uid,
                instance_number=instance_number,
                manufacturer=manufacturer,
                manufacturer_model_name=manufacturer_model_name,
                software_versions=software_versions,
                device_serial_number=device_serial_number,
                omit_empty_frames=True,
                content_label=CONTENT_LABEL,
                content_description=lo(
                    f"{bundle.name} {bundle.display_version}, automatic: not for primary diagnosis"
                ),
                series_description=series_description("SEG", bundle),
            )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise ReportError(f"highdicom refused the SEG of {bundle.name!r}: {exc}") from exc
    return segmentation


def _segment_tracking_uid(sop_instance_uid: str, segment_number: int) -> UID:
    """Tracking UID (0062,0021) of segment ``segment_number`` of the SEG ``sop_instance_uid``.

    The SR's measurement group for the segment carries the same UID (TID 4108), which is what
    ties the two objects' statements about one finding together.
    """
    return result_uid(sop_instance_uid, "segment", str(segment_number))
