"""DICOM results of a model run: a Segmentation (SEG) and a TID 1500 Measurement Report (SR).

- :func:`build_segmentation` (:mod:`pacsai.reporting.seg`): the label map of a segmentation model
  as a SEG in the source study (LABELMAP, or BINARY rewritten from it by
  :func:`binary_from_labelmap`), or :class:`EmptySegmentationError` when no label is present;
  :func:`referenced_segmentation`: what an SR needs to refer to that SEG, before it is built;
- :func:`build_measurement_report` (:mod:`pacsai.reporting.sr`): what the model found, measured
  or classified, as a Comprehensive 3D SR, :func:`read_measurements` to read one back, and
  :func:`retarget_report` to make it refer to the other SEG type;
- :func:`result_uid`: UIDs a re-run derives again, so that it replaces its results instead of
  adding new ones;
- :mod:`pacsai.reporting.codes`: the coded concepts used, and why;
- :mod:`pacsai.reporting.outputs` writes the objects of one result to disk, and
  :mod:`pacsai.reporting.delivery` sends them to a destination (C-STORE, DICOM TLS, STOW-RS),
  in the SEG type (:mod:`pacsai.reporting.variants`) and transfer syntax
  (:mod:`pacsai.reporting.transfer`) the destination accepts;
- a finished study's results for the RIS and alerts (:mod:`pacsai.reporting.study_result`):
  HL7 ORU (:mod:`pacsai.reporting.hl7`), FHIR (:mod:`pacsai.reporting.fhir`), webhook and
  e-mail (:mod:`pacsai.reporting.alerts`), one channel per destination kind
  (:mod:`pacsai.reporting.channels`).
"""

from __future__ import annotations

from pacsai.reporting._uids import result_uid
from pacsai.reporting.binary_seg import binary_from_labelmap
from pacsai.reporting.overlay import BANNER, build_overlay
from pacsai.reporting.seg import (
    CONTENT_LABEL,
    EmptySegmentationError,
    ReferencedSegmentation,
    build_segmentation,
    referenced_segmentation,
)
from pacsai.reporting.sr import (
    FindingRecord,
    MeasuredValue,
    build_measurement_report,
    read_measurements,
    retarget_report,
)

__all__ = [
    "BANNER",
    "CONTENT_LABEL",
    "EmptySegmentationError",
    "FindingRecord",
    "MeasuredValue",
    "ReferencedSegmentation",
    "binary_from_labelmap",
    "build_measurement_report",
    "build_overlay",
    "build_segmentation",
    "read_measurements",
    "referenced_segmentation",
    "result_uid",
    "retarget_report",
]
