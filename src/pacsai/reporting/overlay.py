"""A model's label map burned into Secondary Capture images (PS3.3 A.8.1, SC Image IOD).

Some PACS viewers cannot display a Segmentation. For them, :func:`build_overlay` writes a new
series in the source study: one RGB image per source slice (by default only the slices that hold
a label), made of the source pixels windowed to 8-bit grey with the contour of every label drawn
in the label's colour, and with a warning burned in. The images are pictures, not data: nothing
can be measured on them and nothing reads them back; the SEG and the SR remain the results.

What an image holds
-------------------
Pixels
    The slice's modality values (``volume.array``) through a linear VOI window
    (PS3.3 C.11.2.1.2.1): ``window`` when given; for CT the Window Center and Width of the slice's
    source image (the first pair when there are several, the frame's Frame VOI LUT for a
    multi-frame image), else a soft-tissue window (centre 40 HU, width 400 HU); for every other
    modality the 1st to 99th percentile of the whole volume, so that all slices of a series are
    shown alike.
Contours
    A label's contour is its pixels with a 4-neighbour of another label (background included;
    pixels on the image border are not contour for that alone). It is 1 pixel wide on images
    under 384 pixels and 2 pixels (thickened inwards, so it never covers another label) on larger
    ones, in the label's ``color`` (:class:`~pacsai.inference.labels.LabelSemantics`). Pixels
    inside a label stay grey, so the anatomy under the finding remains visible.
Text
    Top left, yellow on black: :data:`BANNER` and the model's name and version; bottom left,
    the name of each label on the slice in its colour. Text is drawn with a built-in 5x7 bitmap
    font (capitals, digits and some punctuation; lower case is shown in capitals), scaled by an
    integer factor on larger images and wrapped at spaces to fit the width.

Header
------
SOP Class Secondary Capture Image Storage, Modality ``OT`` (SC Equipment, PS3.3 C.8.6.1:
Conversion Type ``WSD``, workstation), Image Type ``DERIVED\\SECONDARY\\OTHER``, Burned In
Annotation ``YES`` and Photometric Interpretation RGB, 8 bits (General Image, Image Pixel,
PS3.3 C.7.6.1, C.7.6.3), Source Image Sequence (General Reference, PS3.3 C.12.4) naming the
source instance (and frame) with purpose DCM 121322 and Derivation Code DCM 113076
"Segmentation", and a Derivation Description stating the window and the model. The Patient,
General Study and Patient Study attributes are copied from the source as they are; the General
Equipment module (PS3.3 C.7.5.1) names pacsai. Patient Orientation is derived from the slice's
direction cosines (PS3.3 C.7.6.1.1.1), or copied from a projection image. Instance Number is the
slice's position in the volume (1 = first slice along the slice normal), so skipped slices leave
gaps and a slice keeps its number from one run to the next.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Final

import highdicom as hd
import numpy as np
from highdicom.sc import SCImage
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

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
)
from pacsai.reporting._uids import result_uid

__all__ = ["BANNER", "DEFAULT_CT_WINDOW", "build_overlay"]

#: The warning burned into every overlay image.
BANNER: Final = "AI RESULT - NOT FOR PRIMARY DIAGNOSIS"
#: (Window Center, Window Width) in HU for CT sources without a window of their own.
DEFAULT_CT_WINDOW: Final = (40.0, 400.0)

_PERCENTILES: Final = (1.0, 99.0)
_PERCENTILE_SAMPLE: Final = 4_000_000  # voxels; larger volumes are sampled on a regular grid
_BANNER_COLOR: Final = (255, 255, 0)
_THICK_CONTOUR_FROM: Final = 384  # pixels: images this wide or tall get 2-pixel contours
_TEXT_SCALE_STEP: Final = 256  # pixels per step of the font's scale factor

# Patient (C.7.1.1), General Study (C.7.2.1) and Patient Study (C.7.2.2) attributes copied from
# the source, with the character set their text is in.
_COPIED = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
)

# 5x7 bitmap font: seven rows per glyph, bit 4 is the leftmost column (the HD44780 character
# set). Characters without a glyph are drawn as "?".
_FONT_ROWS: Final[dict[str, tuple[int, ...]]] = {
    " ": (0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00),
    "!": (0x04, 0x04, 0x04, 0x04, 0x00, 0x00, 0x04),
    "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "'": (0x0C, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    "+": (0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00),
    ",": (0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08),
    "-": (0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00),
    ".": (0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C),
    "/": (0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00),
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E),
    "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F),
    "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02),
    "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E),
    "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E),
    "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    ":": (0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00),
    "=": (0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00),
    "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04),
    "A": (0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11),
    "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E),
    "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F),
    "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F),
    "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11),
    "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11),
    "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D),
    "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E),
    "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A),
    "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04),
    "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    "_": (0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F),
}
_GLYPH_ROWS: Final = 7
_GLYPH_COLUMNS: Final = 5
_ADVANCE: Final = _GLYPH_COLUMNS + 1  # a blank column between characters
_LINE_HEIGHT: Final = _GLYPH_ROWS + 2  # two blank rows between lines
_CHARACTERS: Final = "".join(_FONT_ROWS)
_GLYPHS: Final = np.array(
    [
        [
            [bool(row >> (_GLYPH_COLUMNS - 1 - column) & 1) for column in range(_GLYPH_COLUMNS)]
            for row in rows
        ]
        for rows in _FONT_ROWS.values()
    ],
    dtype=bool,
)

_RGB = NDArray[np.uint8]
_Window = tuple[float, float]


def build_overlay(
    *,
    sources: Sequence[Dataset] | MatchedSources,
    volume: Volume,
    label_map: np.ndarray | LabelCounts,
    bundle: BundleInfo,
    series_number: int = 9903,
    series_instance_uid: str | None = None,
    uid_parts: Sequence[str] | None = None,
    window: tuple[float, float] | None = None,
    only_slices_with_findings: bool = True,
    manufacturer: str = "pacsai",
    manufacturer_model_name: str = "pacsai",
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    software_versions: str = pacsai.__version__,
) -> list[SCImage]:
    """Burn a segmentation model's label map into a Secondary Capture series (PS3.3 A.8.1).

    Parameters
    ----------
    sources : sequence of pydicom.dataset.Dataset
        The source instances (pixel data not needed: the pixels come from ``volume``), in any
        order; every instance a slice of ``volume`` comes from must be among them.
    volume : pacsai.inference.volume.Volume
        The volume the model read; a projection image (CR, DX) is a volume of one slice.
    label_map : numpy.ndarray
        Integer array shaped like ``volume.array``: 0 is background, other values are the
        bundle's label values. Slice ``k`` belongs to ``volume.sources[k]``. Or the
        ``LabelCounts`` that ``check_label_map`` returned for it (counted once per result).
    bundle : pacsai.inference.bundle.BundleInfo
        The segmentation model: its labels' names and colours, its name and version.
    series_number : int
        Series Number (0020,0011).
    series_instance_uid : str or None
        Series Instance UID (0020,000E) of the overlay series.
    uid_parts : sequence of str or None
        Instead of ``series_instance_uid``: the series UID is
        ``result_uid(*uid_parts, "overlay series")`` (see :func:`pacsai.reporting.result_uid`).
        With neither, the series UID is new. Each image's SOP Instance UID is derived from the
        series UID and its source instance (and frame), so the same series UID always gives the
        same instances, whichever slices are included.
    window : (float, float) or None
        (Window Center, Window Width) in modality values (HU for CT) for every slice, instead of
        the default: the source's window for CT, else the 1st-99th percentile of the volume.
    only_slices_with_findings : bool
        True: an image only for the slices that hold at least one label (none at all for an
        empty label map). False: one image per slice.
    manufacturer, manufacturer_model_name, device_serial_number, software_versions : str
        General Equipment module (PS3.3 C.7.5.1); the SC Equipment module (C.8.6.1) names the
        same device.

    Returns
    -------
    list of highdicom.sc.SCImage
        In the volume's slice order; empty when ``only_slices_with_findings`` and the label map
        holds no label.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If the label map, the volume, the sources and the bundle do not fit together, both
        ``series_instance_uid`` and ``uid_parts`` are given, or a value is out of range.
    pacsai.errors.ReportError
        If highdicom refuses an image (the message is highdicom's), or the sources are several
        multi-frame instances or part of one.
    """
    check_positive_int(series_number, "series_number")
    series_uid = _series_uid(series_instance_uid, uid_parts)
    checked_window = None if window is None else _check_window(window, "window")
    if not isinstance(only_slices_with_findings, bool):
        raise TypeError(
            "only_slices_with_findings must be a bool, not "
            f"{type(only_slices_with_findings).__name__}"
        )
    counts = check_label_map(label_map, volume, bundle)
    matched = match_sources(sources, volume)
    labels = counts.flat(bundle)

    if only_slices_with_findings:
        slices = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)).tolist()
    else:
        slices = list(range(labels.shape[0]))
    if not slices:
        return []

    colours = np.zeros((max(counts.counts, default=0) + 1, 3), dtype=np.uint8)
    for label in bundle.labels:
        colours[label.value] = label.color
    volume_window = None
    if checked_window is None and volume.modality.strip().upper() != "CT":
        volume_window = _percentile_window(volume.array)
    heading = [BANNER, f"{bundle.name} {bundle.display_version}"]
    description = series_description("overlay", bundle)
    orientation = _patient_orientation(volume, matched)
    spacing = _pixel_spacing(volume, matched)
    study = matched.datasets[0]

    images = []
    for k in slices:
        source, frame = matched.slice_reference(k, volume)
        centre_width = (
            checked_window or volume_window or _ct_window(source, frame) or DEFAULT_CT_WINDOW
        )
        present = np.bincount(labels[k].ravel().astype(np.intp), minlength=len(colours)) > 0
        pixels = _render(
            volume.array[k],
            labels[k],
            centre_width,
            colours,
            heading,
            [label for label in bundle.labels if present[label.value]],
        )
        derivation = (
            f"Source pixels windowed to 8 bits (centre {centre_width[0]:g}, width "
            f"{centre_width[1]:g}) with the contours of the labels found by {bundle.name} "
            f"{bundle.display_version} burned in, and a warning: not for primary diagnosis."
        )
        try:
            image = SCImage(
                pixel_array=pixels,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                study_instance_uid=matched.study_instance_uid,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=result_uid(
                    series_uid, "overlay image", str(source.SOPInstanceUID), str(frame or 0)
                ),
                instance_number=k + 1,
                manufacturer=manufacturer,
                # highdicom only accepts single-letter orientations: the value is set below.
                patient_orientation=("L", "P"),
                pixel_spacing=spacing,
                transfer_syntax_uid=ExplicitVRLittleEndian,
                series_description=description,
                manufacturer_model_name=manufacturer_model_name,
                device_serial_number=device_serial_number,
                software_versions=software_versions,
            )
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise ReportError(
                f"highdicom refused the overlay image of slice {k} of {bundle.name!r}: {exc}"
            ) from exc
        _finish(image, study, source, frame, orientation, derivation)
        # SC Equipment (C.8.6.1): the device that made the capture is this one.
        image.SecondaryCaptureDeviceManufacturer = lo(manufacturer)
        image.SecondaryCaptureDeviceManufacturerModelName = lo(manufacturer_model_name)
        image.SecondaryCaptureDeviceSoftwareVersions = lo(software_versions)
        images.append(image)
    return images


# --- checks ---------------------------------------------------------------------------------------


def _series_uid(series_instance_uid: str | None, uid_parts: Sequence[str] | None) -> str:
    explicit = check_uid(series_instance_uid, "series_instance_uid")
    if uid_parts is None:
        return explicit or str(hd.UID())
    if isinstance(uid_parts, str) or not isinstance(uid_parts, Sequence):
        raise TypeError("uid_parts must be a sequence of str, e.g. (study UID, model version)")
    if explicit is not None:
        raise ValueError(
            "pass series_instance_uid or uid_parts, not both: the series UID would be ambiguous"
        )
    return str(result_uid(*uid_parts, "overlay series"))


def _check_window(window: object, what: str) -> _Window:
    if (
        not isinstance(window, tuple | list)
        or len(window) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in window)
    ):
        raise TypeError(f"{what} must be a (center, width) pair of numbers, not {window!r}")
    centre, width = float(window[0]), float(window[1])
    if not (math.isfinite(centre) and math.isfinite(width)) or width <= 0:
        raise ValueError(f"{what} must have a finite centre and a width above 0, got {window!r}")
    return centre, width


# --- windowing ------------------------------------------------------------------------------------


def _ct_window(source: Dataset, frame: int | None) -> _Window | None:
    """The first Window Center/Width pair of a CT source image or frame, if it has a usable one."""
    holders = [source]
    if frame is not None:
        for keyword, index in (
            ("PerFrameFunctionalGroupsSequence", frame - 1),
            ("SharedFunctionalGroupsSequence", 0),
        ):
            groups = source.get(keyword)
            if groups is not None and 0 <= index < len(groups):
                voi = groups[index].get("FrameVOILUTSequence")
                if voi:
                    holders.insert(len(holders) - 1, voi[0])
    for holder in holders:
        centre, width = holder.get("WindowCenter"), holder.get("WindowWidth")
        if centre is None or width is None:
            continue
        centre = centre[0] if not isinstance(centre, str | int | float) else centre
        width = width[0] if not isinstance(width, str | int | float) else width
        try:
            pair = (float(centre), float(width))
        except (TypeError, ValueError):
            continue
        if math.isfinite(pair[0]) and math.isfinite(pair[1]) and pair[1] >= 1:
            return pair
    return None


def _percentile_window(array: NDArray[np.float32]) -> _Window:
    """(centre, width) mapping the 1st and 99th percentile of ``array`` to black and white."""
    step = max(1, math.isqrt(array.size // _PERCENTILE_SAMPLE))
    sample = array[:, ::step, ::step]
    low, high = (float(v) for v in np.percentile(sample, _PERCENTILES))
    # Inverse of the bounds in _to_grey: low -> 0, high -> 255.
    return (low + high) / 2 + 0.5, max(high - low + 1.0, 1.0)


def _to_grey(values: NDArray[np.float32], window: _Window) -> NDArray[np.uint8]:
    """The linear VOI function of PS3.3 C.11.2.1.2.1, output range 0 to 255."""
    centre, width = window
    low = centre - 0.5 - (width - 1) / 2
    high = centre - 0.5 + (width - 1) / 2
    if high <= low:
        return np.where(values > low, 255, 0).astype(np.uint8)
    scaled = (values - np.float32(low)) * np.float32(255.0 / (high - low))
    np.clip(scaled, 0, 255, out=scaled)
    grey: NDArray[np.uint8] = np.rint(scaled, out=scaled).astype(np.uint8)
    return grey


# --- drawing --------------------------------------------------------------------------------------


def contour_mask(labels: NDArray[np.integer], width: int = 1) -> NDArray[np.bool_]:
    """Pixels of each label that have a 4-neighbour of another value, ``width`` pixels deep.

    Parameters
    ----------
    labels : numpy.ndarray
        2D integer label image (0 = background).
    width : int
        1 or more: the contour is thickened inwards, within each label, so one label's contour
        never covers another label.

    Returns
    -------
    numpy.ndarray
        Boolean, shaped like ``labels``; never true on background.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2D, not of shape {labels.shape}")
    padded = np.pad(labels, 1, mode="edge")
    inside = labels != 0
    edge = np.zeros(labels.shape, dtype=bool)
    for neighbour in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        edge |= neighbour != labels
    edge &= inside
    for _ in range(width - 1):
        # A pixel next to the contour but not on it has only neighbours of its own label, so
        # growing the contour into the labelled pixels keeps it inside each label.
        grown = np.pad(edge, 1)
        edge = inside & (
            edge | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]
        )
    return edge


def _render(
    values: NDArray[np.float32],
    labels: NDArray[np.integer],
    window: _Window,
    colours: NDArray[np.uint8],
    heading: list[str],
    present: list[LabelSemantics],
) -> _RGB:
    grey = _to_grey(values, window)
    rgb: _RGB = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
    rows, columns = grey.shape
    width = 2 if max(rows, columns) >= _THICK_CONTOUR_FROM else 1
    edge = contour_mask(labels, width)
    rgb[edge] = colours[labels[edge]]
    scale = max(1, min(rows, columns) // _TEXT_SCALE_STEP)
    _draw_text(rgb, [(line, _BANNER_COLOR) for line in heading], scale, top=True)
    _draw_text(rgb, [(label.name, label.color) for label in present], scale, top=False)
    return rgb


def _wrap(text: str, limit: int) -> list[str]:
    """``text`` in capitals, cut into lines of at most ``limit`` characters, at spaces if any."""
    lines: list[str] = []
    current = ""
    for word in text.upper().split():
        while len(word) > limit:
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:limit])
            word = word[limit:]
        if not current:
            current = word
        elif len(current) + 1 + len(word) <= limit:
            current += " " + word
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def text_mask(text: str, scale: int = 1) -> NDArray[np.bool_]:
    """``text`` in capitals in the 5x7 font: ``(7 * scale, (6 * len(text) - 1) * scale)``.

    Characters the font lacks are drawn as ``?``.
    """
    unknown = _CHARACTERS.index("?")
    indices = [_CHARACTERS.find(c) if c in _FONT_ROWS else unknown for c in text.upper()]
    glyphs = np.pad(_GLYPHS[indices], ((0, 0), (0, 0), (0, 1)))  # (n, 7, 6)
    line = glyphs.transpose(1, 0, 2).reshape(_GLYPH_ROWS, -1)[:, :-1]
    mask: NDArray[np.bool_] = np.kron(line, np.ones((scale, scale), dtype=bool))
    return mask


def _draw_text(
    rgb: _RGB, lines: list[tuple[str, tuple[int, int, int]]], scale: int, *, top: bool
) -> None:
    """Draw ``lines`` on a black box in the top or bottom left corner, as far as they fit."""
    rows, columns = rgb.shape[:2]
    margin = scale
    limit = (columns - 2 * margin + scale) // (_ADVANCE * scale)
    if limit < 1:
        return
    wrapped = [
        (part, colour) for text, colour in lines for part in _wrap(text, limit) if part.strip()
    ]
    wrapped = wrapped[: max(0, (rows - 2 * margin) // (_LINE_HEIGHT * scale))]
    if not wrapped:
        return
    height = len(wrapped) * _LINE_HEIGHT * scale - 2 * scale + 2 * margin
    width = max(len(text) for text, _ in wrapped) * _ADVANCE * scale - scale + 2 * margin
    y0 = 0 if top else rows - height
    rgb[y0 : y0 + height, 0:width] = 0
    for number, (text, colour) in enumerate(wrapped):
        mask = text_mask(text, scale)
        y = y0 + margin + number * _LINE_HEIGHT * scale
        area = rgb[y : y + mask.shape[0], margin : margin + mask.shape[1]]
        area[mask] = colour


# --- header ---------------------------------------------------------------------------------------


def _orientation_letters(direction: NDArray[np.float64]) -> str:
    """PS3.3 C.7.6.1.1.1: the patient axes a direction points along, the largest first."""
    letters = []
    for axis in np.argsort(-np.abs(direction), kind="stable"):
        component = float(direction[axis])
        if abs(component) > 1e-3:
            letters.append(("RL", "AP", "FH")[axis][component > 0])
    return "".join(letters)


def _patient_orientation(volume: Volume, matched: MatchedSources) -> list[str]:
    """Patient Orientation (0020,0020): from the affine, or a projection image's own."""
    first = matched.datasets[0]
    if matched.frame_order is None and "ImageOrientationPatient" not in first:
        value = first.get("PatientOrientation")
        return [str(v) for v in value] if value is not None and len(value) == 2 else []
    columns = volume.affine[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    return [
        _orientation_letters(columns[:, 0] / norms[0]),
        _orientation_letters(columns[:, 1] / norms[1]),
    ]


def _pixel_spacing(volume: Volume, matched: MatchedSources) -> tuple[float, float] | None:
    """(row, column) spacing in mm, or None for a projection image without Pixel Spacing."""
    first = matched.datasets[0]
    if matched.frame_order is None and "ImageOrientationPatient" not in first:
        spacing = first.get("PixelSpacing")
        if spacing is None or len(spacing) != 2:
            return None
        return float(spacing[0]), float(spacing[1])
    column_step, row_step, _ = volume.spacing
    return row_step, column_step


def _finish(
    image: SCImage,
    study: Dataset,
    source: Dataset,
    frame: int | None,
    orientation: list[str],
    derivation: str,
) -> None:
    """What highdicom's SCImage does not set: copied study data, references, SC Equipment."""
    for keyword in _COPIED:
        if keyword in study:
            image[keyword] = copy.deepcopy(study[keyword])
    image.PatientOrientation = orientation
    # General Series (C.7.3.1) Laterality is Type 2C, required for paired body parts without
    # Image Laterality; the overlay shows the source's side, or "unknown" (empty).
    for keyword in ("Laterality", "ImageLaterality"):
        if keyword in source:
            image[keyword] = copy.deepcopy(source[keyword])
    if "Laterality" not in image and "ImageLaterality" not in image:
        image.Laterality = ""
    image.ConversionType = "WSD"
    image.BurnedInAnnotation = "YES"
    # Stored uncompressed: lossy (PS3.3 C.7.6.1.1.5) only if the source pixels already were.
    image.LossyImageCompression = "01" if source.get("LossyImageCompression") == "01" else "00"
    image.DerivationDescription = derivation
    derivation_code = Dataset()
    code = codes.cid7203.SegmentationImageDerivation
    derivation_code.CodeValue = code.value
    derivation_code.CodingSchemeDesignator = code.scheme_designator
    derivation_code.CodeMeaning = code.meaning
    image.DerivationCodeSequence = [derivation_code]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        reference.ReferencedFrameNumber = frame
    purpose = Dataset()
    purpose_code = codes.DCM.SourceImageForImageProcessingOperation
    purpose.CodeValue = purpose_code.value
    purpose.CodingSchemeDesignator = purpose_code.scheme_designator
    purpose.CodeMeaning = purpose_code.meaning
    reference.PurposeOfReferenceCodeSequence = [purpose]
    image.SourceImageSequence = [reference]
