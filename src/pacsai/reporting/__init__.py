"""DICOM results of a model run: a Segmentation (SEG) and a TID 1500 Measurement Report (SR).

- :func:`build_segmentation` (:mod:`pacsai.reporting.seg`): the label map of a segmentation model
  as a SEG in the source study, or :class:`EmptySegmentationError` when no label is present;
- :func:`build_measurement_report` (:mod:`pacsai.reporting.sr`): what the model found, measured
  or classified, as a Comprehensive 3D SR, and :func:`read_measurements` to read one back;
- :func:`result_uid`: UIDs a re-run derives again, so that it replaces its results instead of
  adding new ones;
- :mod:`pacsai.reporting.codes`: the coded concepts used, and why;
- :mod:`pacsai.reporting.outputs` writes the objects of one result to disk, and
  :mod:`pacsai.reporting.delivery` sends them to a destination (C-STORE, DICOM TLS, STOW-RS).
"""

from __future__ import annotations

from pacsai.reporting._uids import result_uid
from pacsai.reporting.overlay import BANNER, build_overlay
from pacsai.reporting.seg import CONTENT_LABEL, EmptySegmentationError, build_segmentation
from pacsai.reporting.sr import (
    FindingRecord,
    MeasuredValue,
    build_measurement_report,
    read_measurements,
)

__all__ = [
    "BANNER",
    "CONTENT_LABEL",
    "EmptySegmentationError",
    "FindingRecord",
    "MeasuredValue",
    "build_measurement_report",
    "build_overlay",
    "build_segmentation",
    "read_measurements",
    "result_uid",
]
