"""The attributes of an image header that the ``routes:`` rules read, as routing reads them.

One function interprets a header for both sides of routing: the receiver records the result
for each series (from its first image) and each instance's number of frames, so that a job
routes a study from its rows; a study whose rows lack them is routed from its files' headers
through the same function. Shared by ``scp/`` (which must not import ``inference/``),
``db/`` and ``inference/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from pydicom.dataset import Dataset

__all__ = ["RoutingAttributes", "image_frames"]


@dataclass(frozen=True, slots=True)
class RoutingAttributes:
    """What the rules of a route (``when:``, ``series:``) read from the header of a series'
    first image: the series' attributes and, from the study's first image, the study's.

    Values are interpreted once, here: text as it reads (missing is empty), ImageType
    upper-cased, SliceThickness in mm, and the patient axis closest to the normal of the image
    plane (ImageOrientationPatient, or for an enhanced multi-frame image the one in its shared
    functional groups' PlaneOrientationSequence). A value that cannot be read counts as missing.
    """

    modality: str
    series_description: str
    image_type: tuple[str, ...]
    slice_thickness: float | None
    orientation: str | None  # "axial", "sagittal" or "coronal"
    body_part_examined: str
    study_description: str
    institution_name: str
    referring_physician_name: str

    @classmethod
    def of(cls, header: Dataset) -> RoutingAttributes:
        """The attributes of ``header`` (a data set as read, pixel data or not)."""
        return cls(
            modality=_text(header, "Modality"),
            series_description=_text(header, "SeriesDescription"),
            image_type=_image_type(header),
            slice_thickness=_number(_value(header, "SliceThickness")),
            orientation=_orientation(header),
            body_part_examined=_text(header, "BodyPartExamined"),
            study_description=_text(header, "StudyDescription"),
            institution_name=_text(header, "InstitutionName"),
            referring_physician_name=_text(header, "ReferringPhysicianName"),
        )

    def to_json(self) -> str:
        """A compact JSON object, one member per attribute (see :meth:`from_json`)."""
        values = {name: getattr(self, name) for name in _NAMES}  # asdict() copies deeply: slower
        return json.dumps(values, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> RoutingAttributes | None:
        """The attributes :meth:`to_json` wrote, or ``None`` for anything else (nothing
        recorded, or a record of other attributes than these): route from the files then."""
        if not text:
            return None
        try:
            values = json.loads(text)
            if not isinstance(values, dict) or set(values) != set(_NAMES):
                return None
            values["image_type"] = tuple(values["image_type"])
        except (ValueError, TypeError):
            return None
        return cls(**values)


_NAMES = tuple(field.name for field in fields(RoutingAttributes))


def image_frames(header: Dataset) -> int:
    """How many images an instance holds: NumberOfFrames, or 1 for an image without it; 0 for
    an object that is not an image (such as an SR)."""
    # A header read without pixel data still describes them: an image has Rows and Columns.
    if "Rows" not in header or "Columns" not in header:
        return 0
    return max(1, int(_number(_value(header, "NumberOfFrames")) or 1))


def _value(header: Dataset, keyword: str) -> Any:
    try:
        return header.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom raises many types for malformed values
        return None


def _text(header: Dataset, keyword: str) -> str:
    try:
        return str(_value(header, keyword) or "")
    except Exception:  # noqa: BLE001 - a value that cannot be shown as text counts as missing
        return ""


def _image_type(header: Dataset) -> tuple[str, ...]:
    value = _value(header, "ImageType")
    if value is None:
        return ()
    if isinstance(value, str | bytes):  # a single value (VM 1): not its characters
        value = [value]
    try:
        return tuple(str(v).upper() for v in value)
    except Exception:  # noqa: BLE001 - not a list of values
        return ()


def _number(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _orientation(header: Dataset) -> str | None:
    iop = _value(header, "ImageOrientationPatient")
    if iop is None:
        try:
            shared = header.get("SharedFunctionalGroupsSequence")
            iop = shared[0].PlaneOrientationSequence[0].ImageOrientationPatient
        except Exception:  # noqa: BLE001 - absent, empty or malformed: no orientation
            return None
    try:
        x = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    if len(x) != 6:
        return None
    # the normal of the image plane: row direction x column direction
    normal = (
        abs(x[1] * x[5] - x[2] * x[4]),
        abs(x[2] * x[3] - x[0] * x[5]),
        abs(x[0] * x[4] - x[1] * x[3]),
    )
    return ("sagittal", "coronal", "axial")[normal.index(max(normal))]
