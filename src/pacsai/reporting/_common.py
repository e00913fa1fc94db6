"""Checks and helpers shared by the SEG and SR builders.

The builders receive a :class:`~pacsai.inference.volume.Volume`, the model output on its grid, and
the source instances as read from the spool. Everything here makes sure that these agree before
highdicom is called, and says what does not.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from pacsai.errors import ReportError
from pacsai.inference.bundle import BundleInfo
from pacsai.inference.labels import LabelSemantics
from pacsai.inference.volume import Volume

__all__ = [
    "DEFAULT_DEVICE_SERIAL_NUMBER",
    "LabelCounts",
    "MatchedSources",
    "check_label_map",
    "check_positive_int",
    "check_uid",
    "lo",
    "match_sources",
    "series_description",
    "source_person_names",
]

#: Device Serial Number (0018,1000) when the caller does not pass one; a node should pass its
#: AE title or host name so that results say which installation made them.
DEFAULT_DEVICE_SERIAL_NUMBER = "0"

_NOT_FOR_DIAGNOSIS = " (not for primary diagnosis)"
_LO_MAX = 64
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# Required to exist in every source (Type 1 in the image IODs pacsai reads).
_TYPE1 = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
# Type 2 attributes highdicom copies from the first source into a SEG or SR. A source that lacks
# one (not conformant, but seen after some de-identification tools) gets it empty, which is what
# Type 2 means: present, value unknown.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@dataclass(frozen=True, eq=False)
class MatchedSources:
    """The source instances of a volume, in the order highdicom expects them.

    Attributes
    ----------
    datasets : tuple of pydicom.dataset.Dataset
        Header copies (no pixel data) of the source instances: one per slice in the volume's
        slice order for single-frame instances, or the one multi-frame instance.
    frame_order : tuple of int or None
        For a multi-frame source: the volume slice index of each frame, in frame order, so that
        ``label_map[list(frame_order)]`` is the label map in the instance's frame order. None for
        single-frame sources (their order already is the volume's).
    """

    datasets: tuple[Dataset, ...]
    frame_order: tuple[int, ...] | None

    @property
    def study_instance_uid(self) -> str:
        """Study Instance UID (0020,000D) of the sources."""
        return str(self.datasets[0].StudyInstanceUID)

    def slice_reference(self, index: int, volume: Volume) -> tuple[Dataset, int | None]:
        """The instance and 1-based frame number (None: single-frame) of volume slice ``index``."""
        if self.frame_order is None:
            return self.datasets[index], None
        return self.datasets[0], volume.sources[index][1]


@dataclass(frozen=True, eq=False)
class LabelCounts:
    """How many voxels of each bundle label a label map holds, in total and per slice.

    Attributes
    ----------
    label_map : numpy.ndarray
        The checked label map (the caller's array, not copied).
    counts : dict of int to int
        Voxel count per label value, for every label of the bundle (0 when absent).
    slice_counts : numpy.ndarray
        ``int64``, shape ``(slices, highest label value + 1)``: voxels of each label value in each
        slice of ``label_map``. The SEG's frames and the SR's references are read from it
        instead of comparing the whole map with every label.
    channels : dict of int to int, optional
        For one boolean mask per label (shape ``(labels, slices, rows, columns)``, a multi-label
        model whose labels may overlap): the mask index of each label value.
    """

    label_map: NDArray[np.integer] | NDArray[np.bool_]
    counts: dict[int, int]
    slice_counts: NDArray[np.int64]
    channels: dict[int, int] | None = None

    @property
    def overlapping(self) -> bool:
        """True for one mask per label (a multi-label model), whose labels may overlap."""
        return self.label_map.ndim == 4

    def present(self, bundle: BundleInfo) -> list[LabelSemantics]:
        """The bundle's labels that have at least one voxel, in the bundle's order."""
        return [label for label in bundle.labels if self.counts[label.value] > 0]

    def mask(self, label: LabelSemantics) -> NDArray[np.bool_]:
        """Where ``label`` is, shape (slices, rows, columns)."""
        if self.channels is not None:
            return np.asarray(self.label_map[self.channels[label.value]], dtype=bool)
        return np.asarray(self.label_map == label.value)

    def flat(self, bundle: BundleInfo) -> NDArray[np.integer]:
        """A label map of values: the map itself, or the masks painted in label order (a later
        label covers an earlier one where they overlap)."""
        if self.channels is None:
            return self.label_map  # type: ignore[return-value]
        dtype = np.uint8 if max(self.counts, default=0) < 256 else np.uint16
        flat = np.zeros(self.label_map.shape[1:], dtype=dtype)
        for label in bundle.labels:
            flat[self.mask(label)] = label.value
        return flat

    def slices_with(self, value: int) -> list[int]:
        """Indices of the slices that hold label ``value``, in slice order."""
        if value >= self.slice_counts.shape[1]:
            return []
        return np.flatnonzero(self.slice_counts[:, value]).tolist()


def check_uid(value: str | None, what: str) -> str | None:
    """``value`` if it is None or a valid UID (PS3.5 9.1), else ``ValueError`` naming ``what``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if len(value) > 64 or not _UID.fullmatch(value):
        raise ValueError(
            f"{what} {value[:70]!r} is not a UID (digits and dots, no leading zeros, at most 64 "
            "characters)"
        )
    return value


def check_positive_int(value: int, what: str, maximum: int = 2**31 - 1) -> int:
    """``value`` if it is an int from 1 to ``maximum`` (an IS value), else an error naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 1 <= value <= maximum:
        raise ValueError(f"{what} must be between 1 and {maximum}, got {value}")
    return value


def series_description(kind: str, bundle: BundleInfo) -> str:
    """``"AI <kind> <model> <version> (not for primary diagnosis)"``, cut to 64 characters (LO).

    The model name and version are shortened when they are long; the warning never is.
    """
    clean = [re.sub(r"[\\\x00-\x1f]", "_", part) for part in (bundle.name, bundle.version)]
    name, version = clean
    room = _LO_MAX - len(_NOT_FOR_DIAGNOSIS)
    head = f"AI {kind} {name} {version}"
    if len(head) > room:
        # Shorten the model name at word boundaries, keeping its end and the whole version:
        # "wholeBody_ct_segmentation" -> "...ct_segmentation", never "wholeBody_ct_segmen".
        budget = room - len(f"AI {kind}  {version}") - len("...")
        kept = ""
        for word in reversed(re.split(r"(?<=[_\-\s.])", name)):
            if len(kept) + len(word) > budget:
                break
            kept = word + kept
        head = f"AI {kind} ...{kept} {version}" if kept else f"AI {kind} {version}"[:room]
    return head.rstrip() + _NOT_FOR_DIAGNOSIS


def lo(text: str) -> str:
    """``text`` as a Long String value: no backslash or control characters, at most 64."""
    return re.sub(r"[\\\x00-\x1f]", "_", text)[:_LO_MAX]


def _header(ds: Dataset, index: int) -> Dataset:
    """A copy of ``ds`` without pixel data, with the Type 2 attributes highdicom copies."""
    missing = [keyword for keyword in _TYPE1 if not str(ds.get(keyword, "") or "").strip()]
    if missing:
        raise ValueError(f"source instance {index} lacks {', '.join(missing)}")
    header = Dataset()
    for element in ds:
        if element.tag.group != 0x7FE0:  # Pixel Data, Float Pixel Data, ...
            header.add(element)
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def match_sources(sources: Sequence[Dataset] | MatchedSources, volume: Volume) -> MatchedSources:
    """Find the source instance of every slice of ``volume`` among ``sources``.

    A :class:`MatchedSources` this function returned is taken as it is, so that the objects built
    from one result match (and copy) the source headers once.

    Instances are matched by SOP Instance UID (and frame number for a multi-frame instance);
    instances in ``sources`` that no slice comes from are ignored.

    Raises
    ------
    TypeError
        If ``sources`` is not a sequence of pydicom datasets or ``volume`` not a Volume.
    ValueError
        If there are no sources, a source lacks a Type 1 attribute, a slice has no source, or the
        sources' series or frame of reference is not the volume's.
    ReportError
        If the volume comes from several multi-frame instances, or from part of the frames of
        one: a SEG references exactly one multi-frame source, frame by frame.
    """
    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a pacsai Volume, not {type(volume).__name__}")
    if isinstance(sources, MatchedSources):
        slices = len(sources.datasets if sources.frame_order is None else sources.frame_order)
        if slices != len(volume.sources):
            raise ValueError("these matched sources were made for another volume")
        return sources
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence):
        raise TypeError("sources must be a sequence of pydicom datasets")
    if not sources:
        raise ValueError("no source instances: pass the datasets the volume was built from")
    by_uid: dict[str, tuple[int, Dataset]] = {}
    for index, ds in enumerate(sources):
        if not isinstance(ds, Dataset):
            raise TypeError(f"source {index} is a {type(ds).__name__}, not a pydicom Dataset")
        by_uid.setdefault(str(ds.get("SOPInstanceUID", "")), (index, ds))

    frames = [frame for _, frame in volume.sources]
    if all(frame is None for frame in frames):
        wanted = [uid for uid, _ in volume.sources]
    elif all(frame is not None for frame in frames):
        wanted = sorted({uid for uid, _ in volume.sources})
        if len(wanted) > 1:
            raise ReportError(
                f"the volume's slices come from {len(wanted)} multi-frame instances; a SEG can "
                "reference only one multi-frame source image"
            )
    else:
        raise ValueError("the volume mixes single-frame and multi-frame sources")

    missing = [uid for uid in wanted if uid not in by_uid]
    if missing:
        raise ValueError(
            f"{len(missing)} of the volume's {len(wanted)} source instances are not among the "
            f"{len(sources)} datasets given (first: {missing[0]})"
        )
    headers = tuple(_header(by_uid[uid][1], by_uid[uid][0]) for uid in wanted)

    for header in headers:
        series = str(header.SeriesInstanceUID)
        if series != volume.series_instance_uid:
            raise ValueError(
                f"source instance {header.SOPInstanceUID} is in series {series}, the volume "
                f"in {volume.series_instance_uid}"
            )
        frame_of_reference = header.get("FrameOfReferenceUID")
        if frame_of_reference is not None and str(frame_of_reference) != (
            volume.frame_of_reference_uid or ""
        ):
            raise ValueError(
                f"source instance {header.SOPInstanceUID} has frame of reference "
                f"{frame_of_reference}, the volume {volume.frame_of_reference_uid}"
            )
    studies = {str(header.StudyInstanceUID) for header in headers}
    if len(studies) > 1:
        raise ValueError(f"the source instances belong to {len(studies)} studies")

    if frames[0] is None:
        return MatchedSources(headers, None)
    number_of_frames = int(headers[0].get("NumberOfFrames", 1) or 1)
    order = [-1] * number_of_frames
    for index, frame in enumerate(frames):
        assert frame is not None
        if 1 <= frame <= number_of_frames and order[frame - 1] == -1:
            order[frame - 1] = index
    if -1 in order or len(frames) != number_of_frames:
        raise ReportError(
            f"the volume holds {len(frames)} of the {number_of_frames} frames of instance "
            f"{wanted[0]}; a SEG of a multi-frame image needs every frame once"
        )
    return MatchedSources(headers, tuple(order))


def check_label_map(label_map: object, volume: Volume, bundle: BundleInfo) -> LabelCounts:
    """Check a segmentation model's label map against its volume and bundle.

    A :class:`LabelCounts` this function returned is taken as it is, so that the objects built
    from one result count its voxels once.

    Raises
    ------
    TypeError
        If ``label_map`` is not a NumPy array of integers.
    ValueError
        If the bundle is not a segmentation model, the shape is not the volume's, or the map
        holds a value that is neither 0 (background) nor one of the bundle's labels.
    """
    if not isinstance(bundle, BundleInfo):
        raise TypeError(f"bundle must be a BundleInfo, not {type(bundle).__name__}")
    if bundle.task != "segmentation":
        raise ValueError(f"bundle {bundle.name!r} is a {bundle.task} model: it has no label map")
    if isinstance(label_map, LabelCounts):  # checked once for all the objects of one result
        if label_map.label_map.shape[-3:] != volume.array.shape or set(label_map.counts) != {
            label.value for label in bundle.labels
        }:
            raise ValueError("these label counts were made for another volume or bundle")
        return label_map
    if not isinstance(label_map, np.ndarray):
        raise TypeError(f"label_map must be a numpy array, not {type(label_map).__name__}")
    if label_map.ndim == 4:  # one mask per label: a multi-label model's overlapping labels
        if label_map.dtype != np.bool_:
            raise TypeError(f"per-label masks must be boolean, not {label_map.dtype}")
        if label_map.shape != (len(bundle.labels), *volume.array.shape):
            raise ValueError(
                f"label masks have shape {label_map.shape}, expected "
                f"{(len(bundle.labels), *volume.array.shape)} (labels, slices, rows, columns)"
            )
        width = max((label.value for label in bundle.labels), default=0) + 1
        per_slice = np.zeros((label_map.shape[1], width), dtype=np.int64)
        for label, mask in zip(bundle.labels, label_map, strict=True):
            per_slice[:, label.value] = np.count_nonzero(mask, axis=(1, 2))
        return LabelCounts(
            label_map,
            {label.value: int(per_slice[:, label.value].sum()) for label in bundle.labels},
            per_slice,
            {label.value: index for index, label in enumerate(bundle.labels)},
        )
    if not np.issubdtype(label_map.dtype, np.integer):
        raise TypeError(f"label_map must hold integers, not {label_map.dtype}")
    if label_map.shape != volume.array.shape:
        raise ValueError(
            f"label_map has shape {label_map.shape}, the volume {volume.array.shape} "
            "(slices, rows, columns)"
        )
    defined = {label.value for label in bundle.labels}
    highest = max(defined, default=0)
    if label_map.size and int(label_map.min()) < 0:
        raise ValueError("label_map holds negative values")
    if label_map.size and int(label_map.max()) > highest:
        _refuse_undefined(np.unique(label_map[label_map > highest]).tolist(), bundle)
    slice_counts = _slice_counts(label_map, highest + 1)
    counts = slice_counts.sum(axis=0)
    undefined = [
        value for value in np.flatnonzero(counts).tolist() if value and value not in defined
    ]
    if undefined:
        _refuse_undefined(undefined, bundle)
    return LabelCounts(
        label_map,
        {
            label.value: int(counts[label.value]) if label.value < counts.size else 0
            for label in bundle.labels
        },
        slice_counts,
    )


def _refuse_undefined(values: list[int], bundle: BundleInfo) -> NoReturn:
    known = ", ".join(f"{label.value}: {label.name}" for label in bundle.labels)
    raise ValueError(
        f"label_map holds values {values[:10]} that bundle {bundle.name!r} does not define "
        f"(it defines {known})"
    )


def _slice_counts(label_map: NDArray[np.integer], width: int) -> NDArray[np.int64]:
    """Voxels per label value (0 to ``width - 1``) per slice (axis 0) of a label map whose
    values are all below ``width``.

    One ``bincount`` per slice: converting a 256x512x512 map to intp at once would cost a 512 MB
    temporary.
    """
    planes = label_map.reshape(label_map.shape[0], -1) if label_map.ndim > 1 else label_map[None]
    table = np.zeros((planes.shape[0], width), dtype=np.int64)
    for index, plane in enumerate(planes):
        table[index] = np.bincount(plane.astype(np.intp, copy=False), minlength=width)
    return table


@contextmanager
def source_person_names() -> Iterator[None]:
    """Let highdicom copy the sources' Person Name values (Patient's Name...) as they are.

    highdicom warns (``UserWarning``) about a name without a ``^`` ("HEAD", "ANONYMOUS", common
    in real and anonymised studies), which PS3.5 6.2 allows; a SEG or SR must carry the source's
    name unchanged, so the warning has nothing to act on. (``warnings.catch_warnings`` changes
    process-wide filters: with several job threads a warning may still show, or be hidden a
    moment longer; both harmless.)
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"The string .* is unlikely to represent the intended person name",
            category=UserWarning,
        )
        yield
