"""One series of stored DICOM instances as one volume with its exact patient geometry.

A model sees a NumPy array; a DICOM SEG or SR made from its output must land on the patient where
the source pixels were. :func:`load_series` therefore builds the array and the affine that places
it in the patient coordinate system (DICOM PS3.3 C.7.6.2.1.1, LPS, millimetres) from the same
attributes, or refuses the series with :class:`~pacsai.errors.UnusableSeriesError` and a reason
that is stored on the job. It never guesses: no slice is interpolated, dropped, resampled or
reordered by anything but its position.

Supported
---------
- single-frame cross-sectional images (CT Image, MR Image, ...): one instance per slice, sorted
  by the projection of Image Position (Patient) on the slice normal (PS3.3 C.7.6.2, Image Plane
  Module), never by Instance Number;
- enhanced and legacy converted multi-frame images (Enhanced CT/MR, Legacy Converted Enhanced
  CT/MR/PET): geometry per frame from the Plane Position, Plane Orientation and Pixel Measures
  functional groups, rescale from the Pixel Value Transformation functional group
  (PS3.3 C.7.6.16);
- projection radiographs without Image Plane Module (CR, DX, MG, IO, Secondary Capture): one image,
  shape ``(1, rows, columns)``.

Refused
-------
Several series, SOP classes, image sizes, pixel spacings or orientations in one series; several
images at one slice position (time points, echoes, repeated acquisitions, several stacks); slice
positions not stacked along the slice normal (gantry tilt, shear); missing slices or irregular
spacing; colour images; pixel data that does not decode.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalIntraOralXRayImageStorageForPresentation,
    DigitalIntraOralXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from pacsai.errors import UnusableSeriesError

__all__ = ["Allocator", "Volume", "allocate_ijk", "load_datasets", "load_series", "read_series"]

#: Projection images: no Image Plane Module, one image is the whole "volume".
_PROJECTION_SOP_CLASSES = frozenset(
    {
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
        DigitalMammographyXRayImageStorageForPresentation,
        DigitalMammographyXRayImageStorageForProcessing,
        DigitalIntraOralXRayImageStorageForPresentation,
        DigitalIntraOralXRayImageStorageForProcessing,
        SecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    }
)

#: Largest difference between two Image Orientation (Patient) values still taken as one.
_ORIENTATION_TOLERANCE = 1e-3
#: Largest angle, in degrees, between a slice step and the slice normal (gantry tilt, shear).
_TILT_TOLERANCE_DEGREES = 0.5
#: Absolute slack, in mm, added to the relative spacing tolerance.
_SPACING_SLACK_MM = 0.01
#: Two slices closer than this along the normal, in mm, are at the same position.
_SAME_POSITION_MM = 0.01
#: Largest difference, in mm, between two Pixel Spacing values still taken as one.
_PIXEL_SPACING_TOLERANCE_MM = 1e-4

_FloatArray = NDArray[np.float64]

#: Makes the buffer a volume's pixels are decoded into: given ``(columns, rows, slices)``, a
#: C-contiguous ``float32`` array of that shape (see :func:`load_datasets`).
Allocator = Callable[[tuple[int, int, int]], np.ndarray]

_BLOCK = 16  # slices written to a volume buffer at a time (16 float32 = one 64-byte cache line)


@dataclass(frozen=True, eq=False)
class Volume:
    """The pixels of one series with the affine that places them in the patient.

    Parameters
    ----------
    array : numpy.ndarray
        ``float32``, shape ``(slices, rows, columns)``: modality values (Rescale Slope and
        Intercept, or the Modality LUT of a projection image, applied per slice). Projection
        images have shape ``(1, rows, columns)``; a MONOCHROME1 projection image is inverted
        within its value range, so that the array always reads like MONOCHROME2 (bright = dense);
        images placed by Image Position/Orientation (Patient) keep their modality values
        (Hounsfield units stay Hounsfield units), since MONOCHROME1 only says how to display them.
        The array is usually a view of a buffer laid out ``(columns, rows, slices)``: the
        ``(i, j, k)`` order MONAI reads, so that handing it to a model needs no transposing copy.
    affine : numpy.ndarray
        ``float64``, shape ``(4, 4)``: maps a voxel index ``(i column, j row, k slice, 1)`` to
        DICOM patient coordinates (LPS, mm). Column 0 is ``ImageOrientationPatient[:3] *
        PixelSpacing[1]``, column 1 is ``ImageOrientationPatient[3:] * PixelSpacing[0]``, column 2
        the step between consecutive slice positions, column 3 ``ImagePositionPatient`` of slice
        0. A single slice steps along the unit normal by Spacing Between Slices, else Slice
        Thickness, else 1.0 mm. A projection image has no Image Plane Module: its affine is the
        identity in the detector plane, scaled by Pixel Spacing, else Imager Pixel Spacing, else
        1.0 (pixel units, the spacing is then unknown), with a slice step of Slice Thickness or 1.0
        and origin 0; it is not a position in the patient.
    sources : tuple of (str, int or None)
        Per slice ``k``: the SOP Instance UID of its source instance, and the 1-based frame number
        within it for a multi-frame instance (``None`` for a single-frame one).
    modality : str
        Modality (0008,0060) of the source instances.
    series_instance_uid : str
        Series Instance UID (0020,000E) of the source instances.
    frame_of_reference_uid : str or None
        Frame of Reference UID (0020,0052), ``None`` where the instances have none.
    sop_class_uid : str
        SOP Class UID (0008,0016) of the source instances.

    Raises
    ------
    ValueError
        If the array, the affine and the sources do not fit together.
    """

    array: np.ndarray
    affine: np.ndarray
    sources: tuple[tuple[str, int | None], ...]
    modality: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    sop_class_uid: str

    def __post_init__(self) -> None:
        if self.array.ndim != 3 or self.array.dtype != np.float32:
            raise ValueError(
                "Volume.array must be a float32 array of shape (slices, rows, columns), "
                f"not {self.array.dtype} of shape {self.array.shape}"
            )
        if self.affine.shape != (4, 4) or self.affine.dtype != np.float64:
            raise ValueError(f"Volume.affine must be a 4x4 float64 array, not {self.affine.shape}")
        if len(self.sources) != self.array.shape[0]:
            raise ValueError(
                f"Volume.sources names {len(self.sources)} slices, the array has "
                f"{self.array.shape[0]}"
            )

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(column spacing, row spacing, slice step) in mm: the norms of the affine's columns."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def is_2d(self) -> bool:
        """True when the volume has one slice (a projection image or a single slice)."""
        return bool(self.array.shape[0] == 1)


@dataclass(frozen=True, eq=False)
class _Frame:
    """One image of the series: where it lies and how its stored values become modality values."""

    dataset_index: int
    frame_index: int | None
    sop_instance_uid: str
    position: _FloatArray
    orientation: _FloatArray
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    single_slice_step: float | None
    stack_id: str | None = None
    temporal_index: int | None = None


@dataclass(frozen=True, eq=False)
class _Stack:
    frames: list[_Frame]
    affine: _FloatArray


def load_series(paths: Sequence[Path], *, spacing_tolerance: float = 0.05) -> Volume:
    """Read the files of one series and build its volume.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        The DICOM files of one series, in any order.
    spacing_tolerance : float, optional
        Largest relative difference between a slice step and the median step (0.01 mm of
        absolute slack is added); a larger one means a missing slice or irregular spacing.

    Returns
    -------
    Volume
        See :func:`load_datasets`.

    Raises
    ------
    UnusableSeriesError
        If a file cannot be read as DICOM, or the series cannot become one volume without
        guessing.
    """
    return load_datasets(read_series(paths), spacing_tolerance=spacing_tolerance)


def read_series(paths: Sequence[Path]) -> list[Dataset]:
    """Read the files of one series in full, for :func:`load_datasets`.

    Raises
    ------
    UnusableSeriesError
        If a file cannot be read as DICOM, or holds nothing after its file meta information.
    """
    return [_read(Path(path)) for path in paths]


def allocate_ijk(shape: tuple[int, int, int]) -> np.ndarray:
    """The default :data:`Allocator`: ordinary memory."""
    return np.empty(shape, dtype=np.float32)


def load_datasets(
    datasets: Sequence[Dataset],
    *,
    spacing_tolerance: float = 0.05,
    max_voxels: int | None = None,
    allocate: Allocator = allocate_ijk,
) -> Volume:
    """Build the volume of one series from data sets already read.

    Parameters
    ----------
    datasets : sequence of pydicom.dataset.Dataset
        The instances of one series, in any order.
    spacing_tolerance : float, optional
        Largest relative difference between a slice step and the median step (0.01 mm of
        absolute slack is added).
    max_voxels : int, optional
        Largest number of voxels (rows x columns x frames over all instances) to decode; a
        larger series is refused from its headers, before any pixel is decoded or allocated
        (``inference.max_voxels``). No limit when None.
    allocate : Allocator, optional
        Makes the buffer the pixels are decoded into, a C-contiguous ``float32`` array of shape
        ``(columns, rows, slices)``: pinned host memory, say, for a volume bound for a GPU.

    Returns
    -------
    Volume
        Slices sorted along the slice normal, ``cross(IOP[:3], IOP[3:])``, so the order in
        which instances arrive does not matter; slice spacing from the positions, never from
        Slice Thickness or Spacing Between Slices (except for a single slice).

    Raises
    ------
    UnusableSeriesError
        If the series cannot become one volume without guessing; the message says why.
    ValueError
        If `spacing_tolerance` is negative.
    """
    if spacing_tolerance < 0:
        raise ValueError(f"spacing_tolerance must be >= 0, not {spacing_tolerance}")
    if not datasets:
        raise UnusableSeriesError("No instances were given, so there is no series to build.")
    label = _series_label(datasets[0])
    _check_instances(datasets, label)
    if max_voxels is not None:
        _check_size(datasets, label, max_voxels)
    first = datasets[0]
    if _is_projection(first):
        return _load_projection(datasets, label)
    frames = _collect_frames(datasets, label)
    stack = _stack(frames, label, spacing_tolerance)
    array = _stack_pixels(datasets, stack.frames, label, allocate)
    return Volume(
        array=array,
        affine=stack.affine,
        sources=tuple(
            (
                frame.sop_instance_uid,
                None if frame.frame_index is None else frame.frame_index + 1,
            )
            for frame in stack.frames
        ),
        modality=_text(first, "Modality"),
        series_instance_uid=_text(first, "SeriesInstanceUID"),
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID") or None,
        sop_class_uid=_text(first, "SOPClassUID"),
    )


# --- reading and checks common to every kind of series -----------------------------------------


def _read(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for unreadable input
        raise UnusableSeriesError(
            f"The file {path} could not be read as DICOM ({type(exc).__name__}: {exc}), so its "
            "series cannot be built into a volume."
        ) from exc
    if len(ds) == 0:
        raise UnusableSeriesError(
            f"The file {path} holds no DICOM attributes after its file meta information (it is "
            "empty or truncated), so its series cannot be built into a volume."
        )
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _series_label(ds: Dataset) -> str:
    parts = ["Series"]
    number = _text(ds, "SeriesNumber")
    if number:
        parts.append(number)
    description = _text(ds, "SeriesDescription")
    if description:
        parts.append(f'"{description}"')
    parts.append(f"({_text(ds, 'SeriesInstanceUID') or 'no Series Instance UID'})")
    return " ".join(parts)


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "no SOP Class UID")


def _listing(values: Iterable[str], limit: int = 4) -> str:
    items = list(values)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _check_instances(datasets: Sequence[Dataset], label: str) -> None:
    """Refuse what cannot be one volume whatever the geometry says."""
    series = sorted({_text(ds, "SeriesInstanceUID") or "(none)" for ds in datasets})
    if len(series) > 1:
        raise UnusableSeriesError(
            f"{label} cannot be used: the instances given belong to {len(series)} different "
            f"series ({_listing(series)}); a volume is built from one series at a time."
        )
    classes = sorted({_text(ds, "SOPClassUID") for ds in datasets})
    if len(classes) > 1:
        raise UnusableSeriesError(
            f"{label} cannot be used: its instances have {len(classes)} different SOP classes "
            f"({_listing(_sop_class_name(uid) for uid in classes)}); a volume needs one kind "
            "of image."
        )
    uids = Counter(_text(ds, "SOPInstanceUID") for ds in datasets)
    if "" in uids:
        raise UnusableSeriesError(
            f"{label} cannot be used: {uids['']} of its instances have no SOP Instance UID, so "
            "results could not refer back to them."
        )
    repeated = sorted(uid for uid, count in uids.items() if count > 1)
    if repeated:
        raise UnusableSeriesError(
            f"{label} cannot be used: the same instance was given more than once "
            f"({_listing(repeated)}); each instance must appear once."
        )
    for ds in datasets:
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise UnusableSeriesError(
                f"{label} cannot be used: instance {_text(ds, 'SOPInstanceUID')} "
                f"({_sop_class_name(_text(ds, 'SOPClassUID'))}) has no pixel data."
            )
        samples = ds.get("SamplesPerPixel", 1)
        if samples != 1:
            raise UnusableSeriesError(
                f"{label} cannot be used: it holds colour images (Samples per Pixel "
                f"{samples}, Photometric Interpretation "
                f"{_text(ds, 'PhotometricInterpretation') or 'missing'}); pacsai processes "
                "greyscale images only for now."
            )
    sizes = sorted({f"{ds.get('Rows')}x{ds.get('Columns')}" for ds in datasets})
    if len(sizes) > 1:
        raise UnusableSeriesError(
            f"{label} cannot be used: its images have {len(sizes)} different sizes "
            f"(rows x columns {_listing(sizes)}); one volume needs one image size."
        )


def _floats(ds: Dataset, keyword: str, count: int, label: str) -> _FloatArray | None:
    """`keyword` of `ds` as `count` finite floats, ``None`` when absent or empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        values = np.array([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UnusableSeriesError(
            f"{label} cannot be used: {keyword} holds {value!r}, which is not a number "
            f"(instance {_text(ds, 'SOPInstanceUID') or 'without UID'})."
        ) from exc
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise UnusableSeriesError(
            f"{label} cannot be used: {keyword} holds {value!r} where {count} numbers are needed."
        )
    return values


def _positive(values: _FloatArray | None) -> _FloatArray | None:
    return values if values is not None and bool(np.all(values > 0)) else None


def _rescale(item: Dataset, modality: str, label: str, where: str) -> tuple[float, float] | None:
    """Rescale Slope and Intercept of `item`; ``None`` when it has neither."""
    slope = _floats(item, "RescaleSlope", 1, label)
    intercept = _floats(item, "RescaleIntercept", 1, label)
    if slope is None and intercept is None:
        return None
    if slope is None or intercept is None or slope[0] == 0:
        raise UnusableSeriesError(
            f"{label} cannot be used: {where} has Rescale Slope {item.get('RescaleSlope')!r} and "
            f"Rescale Intercept {item.get('RescaleIntercept')!r}, so its {modality} values "
            "are unknown."
        )
    return float(slope[0]), float(intercept[0])


def _default_rescale(ds: Dataset, label: str, where: str) -> tuple[float, float]:
    """Identity where the IOD allows no rescale; CT must say how to reach Hounsfield units."""
    modality = _text(ds, "Modality")
    if modality == "CT":
        raise UnusableSeriesError(
            f"{label} cannot be used: {where} is CT without Rescale Slope and Rescale Intercept, "
            "so its Hounsfield units are unknown."
        )
    if "ModalityLUTSequence" in ds:
        raise UnusableSeriesError(
            f"{label} cannot be used: {where} maps its values with a Modality LUT Sequence, "
            "which pacsai applies to projection radiographs only."
        )
    return 1.0, 0.0


# --- projection radiographs ---------------------------------------------------------------------


def _is_projection(ds: Dataset) -> bool:
    """A radiograph or secondary capture without the Image Plane Module."""
    has_plane = "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds
    return (
        _text(ds, "SOPClassUID") in _PROJECTION_SOP_CLASSES
        and not has_plane
        and "PerFrameFunctionalGroupsSequence" not in ds
    )


def _load_projection(datasets: Sequence[Dataset], label: str) -> Volume:
    """One radiograph: identity directions in the detector plane, MONOCHROME2-like values."""
    if len(datasets) > 1:
        raise UnusableSeriesError(
            f"{label} cannot be used: it holds {len(datasets)} projection images without "
            "patient positions; pacsai takes one radiograph per series."
        )
    ds = datasets[0]
    frames = _number_of_frames(ds, label)
    if frames != 1:
        raise UnusableSeriesError(
            f"{label} cannot be used: its radiograph {_text(ds, 'SOPInstanceUID')} holds "
            f"{frames} frames without patient positions; pacsai takes single-frame radiographs."
        )
    stored = _decode(ds, label, 1)[0]
    values = _projection_values(stored, ds, label)
    spacing = _positive(_floats(ds, "PixelSpacing", 2, label))
    if spacing is None:
        spacing = _positive(_floats(ds, "ImagerPixelSpacing", 2, label))
    row_spacing, column_spacing = (1.0, 1.0) if spacing is None else (spacing[0], spacing[1])
    thickness = _positive(_floats(ds, "SliceThickness", 1, label))
    affine = np.diag(
        [column_spacing, row_spacing, 1.0 if thickness is None else thickness[0], 1.0]
    ).astype(np.float64)
    return Volume(
        array=values.astype(np.float32)[np.newaxis],
        affine=affine,
        sources=((_text(ds, "SOPInstanceUID"), None),),
        modality=_text(ds, "Modality"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID") or None,
        sop_class_uid=_text(ds, "SOPClassUID"),
    )


def _projection_values(stored: np.ndarray, ds: Dataset, label: str) -> _FloatArray:
    """Modality values; MONOCHROME1 inverted within the range the stored values can take."""
    where = f"instance {_text(ds, 'SOPInstanceUID')}"
    rescale = _rescale(ds, _text(ds, "Modality"), label, where)
    if rescale is None and "ModalityLUTSequence" in ds:
        try:
            values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
            lut = np.asarray(ds.ModalityLUTSequence[0].LUTData, dtype=np.float64)
        except Exception as exc:  # a malformed LUT fails in many ways
            raise UnusableSeriesError(
                f"{label} cannot be used: the Modality LUT of {where} could not be applied ({exc})."
            ) from exc
        low, high = float(lut.min()), float(lut.max())
    else:
        slope, intercept = rescale or (1.0, 0.0)
        values = stored.astype(np.float64) * slope + intercept
        stored_low, stored_high = _stored_range(ds, stored)
        low, high = sorted((stored_low * slope + intercept, stored_high * slope + intercept))
    if _text(ds, "PhotometricInterpretation") == "MONOCHROME1":
        values = (low + high) - values
    return values


def _stored_range(ds: Dataset, stored: np.ndarray) -> tuple[float, float]:
    if stored.dtype.kind == "f":
        return float(stored.min()), float(stored.max())
    bits = int(ds.get("BitsStored") or stored.dtype.itemsize * 8)
    if ds.get("PixelRepresentation") == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


# --- cross-sectional images: one frame per slice -------------------------------------------------


def _number_of_frames(ds: Dataset, label: str) -> int:
    value = ds.get("NumberOfFrames")
    if value is None or value == "":
        return 1
    try:
        frames = int(value)
    except (TypeError, ValueError) as exc:
        raise UnusableSeriesError(
            f"{label} cannot be used: Number of Frames holds {value!r}, which is not a number."
        ) from exc
    if frames < 1:
        raise UnusableSeriesError(f"{label} cannot be used: Number of Frames is {frames}.")
    return frames


def _collect_frames(datasets: Sequence[Dataset], label: str) -> list[_Frame]:
    frames: list[_Frame] = []
    for index, ds in enumerate(datasets):
        if "PerFrameFunctionalGroupsSequence" in ds:
            frames.extend(_enhanced_frames(index, ds, label))
        else:
            frames.append(_single_frame(index, ds, label))
    return frames


def _single_frame(index: int, ds: Dataset, label: str) -> _Frame:
    uid = _text(ds, "SOPInstanceUID")
    count = _number_of_frames(ds, label)
    if count != 1:
        raise UnusableSeriesError(
            f"{label} cannot be used: instance {uid} ({_sop_class_name(_text(ds, 'SOPClassUID'))})"
            f" holds {count} frames but no Per-Frame Functional Groups Sequence, so the position "
            "of each frame is unknown."
        )
    position = _floats(ds, "ImagePositionPatient", 3, label)
    orientation = _floats(ds, "ImageOrientationPatient", 6, label)
    spacing = _positive(_floats(ds, "PixelSpacing", 2, label))
    if position is None or orientation is None or spacing is None:
        missing = [
            name
            for name, value in (
                ("Image Position (Patient)", position),
                ("Image Orientation (Patient)", orientation),
                ("Pixel Spacing", spacing),
            )
            if value is None
        ]
        raise UnusableSeriesError(
            f"{label} cannot be used: instance {uid} has no valid {' or '.join(missing)}, so "
            "its place in the patient is unknown."
        )
    where = f"instance {uid}"
    slope, intercept = _rescale(ds, _text(ds, "Modality"), label, where) or _default_rescale(
        ds, label, where
    )
    return _Frame(
        dataset_index=index,
        frame_index=None,
        sop_instance_uid=uid,
        position=position,
        orientation=orientation,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slope=slope,
        intercept=intercept,
        single_slice_step=_single_slice_step(ds, label),
    )


def _single_slice_step(item: Dataset, label: str) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _positive(_floats(item, keyword, 1, label))
        if value is not None:
            return float(value[0])
    return None


def _enhanced_frames(index: int, ds: Dataset, label: str) -> list[_Frame]:
    """Frames of an enhanced or legacy converted multi-frame image (PS3.3 C.7.6.16)."""
    uid = _text(ds, "SOPInstanceUID")
    per_frame = ds.PerFrameFunctionalGroupsSequence
    count = _number_of_frames(ds, label)
    if len(per_frame) != count:
        raise UnusableSeriesError(
            f"{label} cannot be used: instance {uid} says it holds {count} frames but describes "
            f"{len(per_frame)} in its Per-Frame Functional Groups Sequence."
        )
    shared_sequence = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_sequence[0] if shared_sequence else Dataset()
    modality = _text(ds, "Modality")
    frames = []
    for frame_index, groups in enumerate(per_frame):
        where = f"frame {frame_index + 1} of instance {uid}"

        def item(keyword: str, groups: Dataset = groups) -> Dataset | None:
            for source in (groups, shared):
                sequence = source.get(keyword)
                if sequence:
                    found: Dataset = sequence[0]
                    return found
            return None

        position_item = item("PlanePositionSequence")
        orientation_item = item("PlaneOrientationSequence")
        measures = item("PixelMeasuresSequence")
        position = (
            None
            if position_item is None
            else _floats(position_item, "ImagePositionPatient", 3, label)
        )
        orientation = (
            None
            if orientation_item is None
            else _floats(orientation_item, "ImageOrientationPatient", 6, label)
        )
        spacing = (
            None if measures is None else _positive(_floats(measures, "PixelSpacing", 2, label))
        )
        if position is None or orientation is None or spacing is None:
            missing = [
                name
                for name, value in (
                    ("Plane Position Sequence", position),
                    ("Plane Orientation Sequence", orientation),
                    ("Pixel Measures Sequence (Pixel Spacing)", spacing),
                )
                if value is None
            ]
            raise UnusableSeriesError(
                f"{label} cannot be used: {where} has no valid {' or '.join(missing)}, so its "
                "place in the patient is unknown."
            )
        transformation = item("PixelValueTransformationSequence")
        rescale = (
            None if transformation is None else _rescale(transformation, modality, label, where)
        )
        slope, intercept = (
            rescale or _rescale(ds, modality, label, where) or _default_rescale(ds, label, where)
        )
        content = item("FrameContentSequence")
        stack_id = None if content is None else (_text(content, "StackID") or None)
        temporal = None if content is None else content.get("TemporalPositionIndex")
        frames.append(
            _Frame(
                dataset_index=index,
                frame_index=frame_index,
                sop_instance_uid=uid,
                position=position,
                orientation=orientation,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                slope=slope,
                intercept=intercept,
                single_slice_step=None if measures is None else _single_slice_step(measures, label),
                stack_id=stack_id,
                temporal_index=None if temporal in (None, "") else int(temporal),
            )
        )
    return frames


def _stack(frames: list[_Frame], label: str, tolerance: float) -> _Stack:
    """Sort `frames` along the slice normal, check they form one regular stack, build the affine."""
    orientation = _common_orientation(frames, label)
    row_spacing, column_spacing = _common_pixel_spacing(frames, label)
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    _check_one_stack_one_time(frames, label)

    distances = np.array([float(frame.position @ normal) for frame in frames])
    order = np.argsort(distances, kind="stable")
    ordered = [frames[i] for i in order]
    _check_one_image_per_position(distances[order], label)

    positions = np.array([frame.position for frame in ordered])
    if len(ordered) == 1:
        step = normal * (ordered[0].single_slice_step or 1.0)
    else:
        steps = np.diff(positions, axis=0)
        _check_not_tilted(steps, normal, label)
        _check_regular(steps @ normal, positions @ normal, label, tolerance)
        step = (positions[-1] - positions[0]) / (len(ordered) - 1)

    affine = np.eye(4, dtype=np.float64)
    affine[:3, 0] = row * column_spacing
    affine[:3, 1] = column * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return _Stack(frames=ordered, affine=affine)


def _common_orientation(frames: list[_Frame], label: str) -> _FloatArray:
    reference = frames[0].orientation
    distinct = [reference]
    for frame in frames[1:]:
        if all(
            np.max(np.abs(frame.orientation - seen)) > _ORIENTATION_TOLERANCE for seen in distinct
        ):
            distinct.append(frame.orientation)
    if len(distinct) > 1:
        shown = _listing("[" + ", ".join(f"{v:g}" for v in o) + "]" for o in distinct)
        raise UnusableSeriesError(
            f"{label} cannot be used: its images have {len(distinct)} different orientations "
            f"(Image Orientation (Patient) {shown}); one volume needs one orientation."
        )
    row, column = reference[:3], reference[3:]
    if (
        abs(np.linalg.norm(row) - 1) > _ORIENTATION_TOLERANCE
        or abs(np.linalg.norm(column) - 1) > _ORIENTATION_TOLERANCE
        or abs(float(row @ column)) > _ORIENTATION_TOLERANCE
    ):
        raise UnusableSeriesError(
            f"{label} cannot be used: its Image Orientation (Patient) "
            f"{[float(v) for v in reference]} is not two perpendicular unit vectors."
        )
    return reference


def _common_pixel_spacing(frames: list[_Frame], label: str) -> tuple[float, float]:
    reference = frames[0].pixel_spacing
    distinct = sorted(
        {
            frame.pixel_spacing
            for frame in frames
            if max(abs(a - b) for a, b in zip(frame.pixel_spacing, reference, strict=True))
            > _PIXEL_SPACING_TOLERANCE_MM
        }
        | {reference}
    )
    if len(distinct) > 1:
        shown = _listing(f"{r:g} x {c:g} mm" for r, c in distinct)
        raise UnusableSeriesError(
            f"{label} cannot be used: its images have {len(distinct)} different pixel spacings "
            f"({shown}); one volume needs one pixel spacing."
        )
    return reference


def _check_one_stack_one_time(frames: list[_Frame], label: str) -> None:
    """Enhanced images say outright when they hold several stacks or temporal positions."""
    stacks = sorted({frame.stack_id for frame in frames if frame.stack_id is not None})
    if len(stacks) > 1:
        raise UnusableSeriesError(
            f"{label} cannot be used: it holds {len(stacks)} stacks (Stack ID "
            f"{_listing(stacks)}); pacsai needs a single stack and will not pick one."
        )
    times = sorted({frame.temporal_index for frame in frames if frame.temporal_index is not None})
    if len(times) > 1:
        positions = len({tuple(np.round(frame.position, 2)) for frame in frames})
        raise UnusableSeriesError(
            f"{label} cannot be used: it has several temporal positions: its {len(frames)} "
            f"frames hold {len(times)} time points (Temporal Position Index) at {positions} "
            "slice positions. pacsai needs one image per position and will not pick a time point."
        )


def _check_one_image_per_position(sorted_distances: _FloatArray, label: str) -> None:
    """Several images at one position: time points, echoes or repeated acquisitions."""
    if len(sorted_distances) < 2:
        return
    new_position = np.diff(sorted_distances) >= _SAME_POSITION_MM
    if bool(np.all(new_position)):
        return
    group_sizes = np.diff(np.flatnonzero(np.concatenate(([True], new_position, [True]))))
    positions = len(group_sizes)
    low, high = int(group_sizes.min()), int(group_sizes.max())
    per_position = f"{low}" if low == high else f"between {low} and {high}"
    raise UnusableSeriesError(
        f"{label} cannot be used: it has several temporal positions (or repeated acquisitions) "
        f"at each slice position: its {len(sorted_distances)} images lie at only {positions} "
        f"slice positions, {per_position} time points at each. pacsai needs one image per "
        "position and will not pick one; send each time point as its own series."
    )


def _check_not_tilted(steps: _FloatArray, normal: _FloatArray, label: str) -> None:
    along = steps @ normal
    across = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    angles = np.degrees(np.arctan2(across, along))
    worst = float(angles.max())
    if worst <= _TILT_TOLERANCE_DEGREES:
        return
    typical = float(np.median(angles))
    if worst - typical < _TILT_TOLERANCE_DEGREES:
        found = (
            f"its slices are stacked with a gantry tilt of {typical:.1f} degrees: each slice "
            "is shifted within its plane, not stacked along the slice normal"
        )
    else:
        found = (
            "its slices form a sheared stack: some slice positions step up to "
            f"{worst:.1f} degrees off the slice normal"
        )
    raise UnusableSeriesError(
        f"{label} cannot be used: {found}. pacsai refuses tilted stacks rather than resampling "
        "them; send a series reconstructed without tilt."
    )


def _check_regular(
    along: _FloatArray, distances: _FloatArray, label: str, tolerance: float
) -> None:
    median = float(np.median(along))
    allowed = tolerance * median + _SPACING_SLACK_MM
    irregular = np.flatnonzero(np.abs(along - median) > allowed)
    if irregular.size == 0:
        return
    found = Counter(f"{step:.2f}" for step in along)
    shown = ", ".join(
        f"{step} mm ({count} time{'s' if count > 1 else ''})"
        for step, count in sorted(found.items(), key=lambda item: float(item[0]))
    )
    first = int(irregular[0])
    raise UnusableSeriesError(
        f"{label} cannot be used: slices are missing or irregularly spaced. The steps between "
        f"slice positions are {shown}; the median step is {median:.2f} mm and every step must "
        f"be within {tolerance:.0%} of it (the first irregular step lies between "
        f"{distances[first]:.2f} and {distances[first + 1]:.2f} mm along the slice normal)."
    )


def _check_size(datasets: Sequence[Dataset], label: str, max_voxels: int) -> None:
    """Refuse a series larger than ``max_voxels`` from its headers alone."""
    total = 0
    for ds in datasets:
        try:
            rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
        except (TypeError, ValueError) as exc:
            raise UnusableSeriesError(
                f"{label} cannot be used: instance {_text(ds, 'SOPInstanceUID')} has no valid "
                "Rows, Columns or Number of Frames."
            ) from exc
        total += rows * columns * frames
    if total > max_voxels:
        first = datasets[0]
        raise UnusableSeriesError(
            f"{label} cannot be used: it holds {total:,} voxels ({len(datasets)} instances of "
            f"{_text(first, 'Rows')} x {_text(first, 'Columns')}), more than "
            f"inference.max_voxels ({max_voxels:,}); it was not decoded. Raise the limit if "
            "such series are expected."
        )


# --- pixels --------------------------------------------------------------------------------------


def _transfer_syntax_uid(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return "" if meta is None else str(meta.get("TransferSyntaxUID") or "")


def _transfer_syntax(ds: Dataset) -> str:
    uid = _transfer_syntax_uid(ds)
    if not uid:
        return "an unknown transfer syntax (no Transfer Syntax UID in its file meta information)"
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def _decode(ds: Dataset, label: str, frames: int) -> np.ndarray:
    """All frames of `ds` as stored values, shape (frames, rows, columns).

    Decodes through :func:`pydicom.pixels.get_decoder` rather than ``Dataset.pixel_array``, which
    would keep a second copy of every image in the caller's data sets.
    """
    uid = _text(ds, "SOPInstanceUID")
    try:
        pixels, _ = get_decoder(_transfer_syntax_uid(ds)).as_array(ds)
    except Exception as exc:  # decoder plugins raise many types
        raise UnusableSeriesError(
            f"{label} cannot be used: the pixel data of instance {uid}, in transfer syntax "
            f"{_transfer_syntax(ds)}, could not be decoded ({type(exc).__name__}: {exc})."
        ) from exc
    shape = (frames, int(ds.Rows), int(ds.Columns))
    if pixels.shape == shape[1:] and frames == 1:
        pixels = pixels[np.newaxis]
    if pixels.shape != shape:
        raise UnusableSeriesError(
            f"{label} cannot be used: the pixel data of instance {uid}, in transfer syntax "
            f"{_transfer_syntax(ds)}, decoded to shape {pixels.shape} instead of {shape}."
        )
    return pixels


def _stack_pixels(
    datasets: Sequence[Dataset], frames: list[_Frame], label: str, allocate: Allocator
) -> np.ndarray:
    """Modality values of `frames`, in their order, decoding each instance once, straight into
    an ``allocate``d ``(columns, rows, slices)`` buffer; returned as its ``(slices, rows,
    columns)`` view."""
    first = datasets[frames[0].dataset_index]
    shape = (int(first.Columns), int(first.Rows), len(frames))
    buffer = allocate(shape)
    if buffer.shape != shape or buffer.dtype != np.float32 or not buffer.flags.c_contiguous:
        raise ValueError(f"the allocator gave {buffer.dtype} {buffer.shape}, not float32 {shape}")
    array = buffer.transpose(2, 1, 0)
    # Slices are gathered _BLOCK at a time and written together: each cache line of the
    # (columns, rows, slices) buffer then takes _BLOCK values at once, not one.
    block = np.empty((min(_BLOCK, len(frames)), shape[1], shape[0]), dtype=np.float32)
    left = Counter(frame.dataset_index for frame in frames)
    decoded: dict[int, np.ndarray] = {}  # multi-frame instances, until their last frame is used
    for start in range(0, len(frames), _BLOCK):
        part = frames[start : start + _BLOCK]
        for offset, frame in enumerate(part):
            index = frame.dataset_index
            pixels = decoded.get(index)
            if pixels is None:
                ds = datasets[index]
                pixels = _decode(ds, label, _number_of_frames(ds, label))
                decoded[index] = pixels
            left[index] -= 1
            if not left[index]:
                del decoded[index]
            stored = pixels[0 if frame.frame_index is None else frame.frame_index]
            block[offset] = stored.astype(np.float64) * frame.slope + frame.intercept
        array[start : start + len(part)] = block[: len(part)]
    return array
