"""A Label Map Segmentation (PS3.3 A.51.2) rewritten as the BINARY Segmentation (PS3.3 A.51) of
the same segments, for the peers that do not take the Label Map Segmentation SOP Class.

The two IODs say the same thing in two encodings. A LABELMAP frame holds the segment number of
each pixel of one plane; a BINARY frame holds one bit per pixel for one segment of one plane,
and frames without a pixel of their segment are left out. Everything else (patient, study,
equipment, segment descriptions, the plane positions and the source image of every plane) is
the same, so :func:`binary_from_labelmap` takes it from the LABELMAP as it is and writes only
what differs, in the order and form highdicom gives a BINARY SEG built from the same label map:

- SOP Class Segmentation Storage, Segmentation Type BINARY, Bits Allocated/Stored 1, High Bit 0,
  no Pixel Padding Value, the segment sequence without the LABELMAP's background segment 0;
- the Dimension Index Sequence gains Referenced Segment Number as its first dimension;
- one frame per segment and plane holding it, segment by segment, planes in the LABELMAP's frame
  order, each with the LABELMAP frame's functional groups, Dimension Index Values
  ``[segment, plane]`` and its Segment Identification (shared when there is one segment);
- the bits of all frames packed at once (``numpy.packbits`` over chunks of whole frames, in
  threads: NumPy releases the GIL there).

Speed. A 104-label result has some 4,000 BINARY frames, each with a per-frame functional groups
item of eight nested data sets; pydicom needs about 1.5 ms to write one such item (6 s in all on
a 2-core machine). The items here differ only in a few values, so each distinct part (a plane's
derivation, position and frame content, a segment's identification) is encoded by pydicom once,
and the items are joined as bytes, the frame's segment number written into its Dimension Index
Values, into one raw Per-Frame Functional Groups Sequence element that pydicom writes as it is
(:meth:`pydicom.dataset.Dataset.set_original_encoding`). The items use defined lengths, so a
value of fixed size can be put in place without changing any length.

The result shares the LABELMAP's unchanged data elements (no deep copy of the source headers
they came from): change neither data set after the call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, SegmentationStorage

from pacsai.reporting.sop_classes import LABEL_MAP_SEGMENTATION_STORAGE

__all__ = ["binary_from_labelmap"]

_PER_FRAME = Tag(0x5200, 0x9230)  # Per-Frame Functional Groups Sequence
_SHARED = Tag(0x5200, 0x9229)  # Shared Functional Groups Sequence
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_FRAME_CONTENT = Tag(0x0020, 0x9111)  # Frame Content Sequence
_SEGMENT_IDENTIFICATION = Tag(0x0062, 0x000A)  # Segment Identification Sequence
_REFERENCED_SEGMENT_NUMBER = Tag(0x0062, 0x000B)
_DIMENSION_INDEX_VALUES = Tag(0x0020, 0x9157)
_META_REPLACED = frozenset(
    {
        Tag(0x0002, 0x0000),  # group length: pydicom writes it
        Tag(0x0002, 0x0002),  # Media Storage SOP Class UID
        Tag(0x0002, 0x0003),  # Media Storage SOP Instance UID
        Tag(0x0002, 0x0010),  # Transfer Syntax UID
    }
)
_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item, explicit VR little endian
_REPLACED = frozenset(
    {
        _PER_FRAME,
        _SHARED,
        _PIXEL_DATA,
        Tag(0x0008, 0x0016),  # SOP Class UID
        Tag(0x0008, 0x0018),  # SOP Instance UID
        Tag(0x0020, 0x9222),  # Dimension Index Sequence
        Tag(0x0020, 0x9311),  # Dimension Organization Type
        Tag(0x0028, 0x0008),  # Number of Frames
        Tag(0x0028, 0x0100),  # Bits Allocated
        Tag(0x0028, 0x0101),  # Bits Stored
        Tag(0x0028, 0x0102),  # High Bit
        Tag(0x0028, 0x0120),  # Pixel Padding Value
        Tag(0x0062, 0x0001),  # Segmentation Type
        Tag(0x0062, 0x0002),  # Segment Sequence
    }
)
_FRAMES_PER_CHUNK = 64  # a multiple of 8: every chunk packs into whole bytes


@dataclass(frozen=True)
class _Frame:
    """One BINARY frame: a segment on a plane (a LABELMAP frame index)."""

    segment: int
    plane: int


def binary_from_labelmap(
    labelmap: Dataset, *, sop_instance_uid: str, executor: Executor | None = None
) -> Dataset:
    """The BINARY Segmentation of the segments of a Label Map Segmentation.

    Parameters
    ----------
    labelmap : pydicom.dataset.Dataset
        A Label Map Segmentation (as highdicom writes it, or read from a file) with segments
        numbered 1, 2, ... (and the background segment 0), MONOCHROME2, in any transfer syntax
        pydicom can decode.
    sop_instance_uid : str
        SOP Instance UID of the BINARY SEG (a new instance: it must differ from the LABELMAP's
        unless the LABELMAP is never stored).
    executor : concurrent.futures.Executor or None
        Threads to pack the frames' bits in; packed in the calling thread when None.

    Returns
    -------
    pydicom.dataset.Dataset
        The BINARY SEG, with file meta information (Explicit VR Little Endian: set the Transfer
        Syntax UID to Deflated Explicit VR Little Endian before writing to compress it).

    Raises
    ------
    ValueError
        If ``labelmap`` is not a Label Map Segmentation this function can rewrite: another SOP
        Class, a palette colour LUT, segments not numbered 1, 2, ..., no frame.
    """
    _check(labelmap)
    frames = _frames(labelmap)
    numbers = [int(item.SegmentNumber) for item in labelmap.SegmentSequence]
    numbers = [number for number in numbers if number != 0]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(
            f"the LABELMAP's segments are numbered {numbers[:10]}; a BINARY SEG needs 1, 2, ..."
        )
    order = _frame_order(frames, len(numbers))
    if not order:
        raise ValueError("the LABELMAP holds no pixel of any segment: there is no BINARY frame")
    pixel_data = _pack(frames, order, executor)
    encodings = labelmap.get("SpecificCharacterSet")
    single = len(numbers) == 1
    per_frame = _per_frame_items(labelmap, order, encodings, segments_per_frame=not single)

    binary = Dataset()
    for element in labelmap:
        if element.tag not in _REPLACED:
            binary.add(element)
    binary.SOPClassUID = SegmentationStorage
    binary.SOPInstanceUID = sop_instance_uid
    binary.SegmentationType = "BINARY"
    binary.SegmentSequence = DicomSequence(
        [item for item in labelmap.SegmentSequence if int(item.SegmentNumber) != 0]
    )
    binary.DimensionIndexSequence = _dimension_index(labelmap)
    if single and "DimensionOrganizationType" in labelmap:
        binary.DimensionOrganizationType = labelmap.DimensionOrganizationType
    binary.SharedFunctionalGroupsSequence = _shared(labelmap, segment=1 if single else None)
    binary.NumberOfFrames = len(order)
    binary.BitsAllocated = 1
    binary.BitsStored = 1
    binary.HighBit = 0
    binary.add_new(_PIXEL_DATA, "OB", pixel_data)
    binary.file_meta = _file_meta(labelmap, sop_instance_uid)
    correct_ambiguous_vr(binary, True)
    # The items are already encoded (explicit VR little endian, defined lengths): pydicom
    # writes a raw element unchanged when the data set says it was read in that encoding.
    binary[_PER_FRAME] = RawDataElement(_PER_FRAME, "SQ", len(per_frame), per_frame, 0, False, True)
    binary.set_original_encoding(False, True, binary._character_set)
    return binary


def _check(labelmap: Dataset) -> None:
    if not isinstance(labelmap, Dataset):
        raise TypeError(f"labelmap must be a pydicom Dataset, not {type(labelmap).__name__}")
    sop_class = str(labelmap.get("SOPClassUID", ""))
    if sop_class != LABEL_MAP_SEGMENTATION_STORAGE:
        raise ValueError(f"not a Label Map Segmentation (SOP Class {sop_class or 'missing'})")
    if labelmap.get("PhotometricInterpretation") != "MONOCHROME2":
        raise ValueError(
            "only a MONOCHROME2 LABELMAP can be rewritten as BINARY, not "
            f"{labelmap.get('PhotometricInterpretation')} (its palette would be lost)"
        )
    if int(labelmap.get("NumberOfFrames", 0) or 0) < 1:
        raise ValueError("the LABELMAP has no frame")


def _frames(labelmap: Dataset) -> np.ndarray:
    """The LABELMAP's frames, shape (frames, rows, columns), without a copy when not encoded."""
    count = int(labelmap.NumberOfFrames)
    shape = (count, int(labelmap.Rows), int(labelmap.Columns))
    syntax = labelmap.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        decoded = np.asarray(labelmap.pixel_array)
        if decoded.dtype.kind != "u":
            raise ValueError(f"the LABELMAP's pixels decode to {decoded.dtype}, not unsigned")
        return decoded.reshape(shape)
    dtype = np.dtype(np.uint8) if int(labelmap.BitsAllocated) == 8 else np.dtype("<u2")
    return np.frombuffer(labelmap.PixelData, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def _frame_order(frames: np.ndarray, segments: int) -> list[_Frame]:
    """The BINARY frames: segment by segment, the planes holding it in frame order."""
    present = np.zeros((frames.shape[0], segments + 1), dtype=bool)
    for index, plane in enumerate(frames):
        counts = np.bincount(plane.ravel(), minlength=segments + 1)
        present[index] = counts[: segments + 1] > 0
    return [
        _Frame(segment, plane)
        for segment in range(1, segments + 1)
        for plane in np.flatnonzero(present[:, segment]).tolist()
    ]


def _pack(frames: np.ndarray, order: Sequence[_Frame], executor: Executor | None) -> bytes:
    """The frames' bits, packed little-endian (PS3.5 8.1.1), one run over whole frames."""
    planes = np.fromiter((frame.plane for frame in order), dtype=np.intp, count=len(order))
    segments = np.fromiter((frame.segment for frame in order), dtype=frames.dtype, count=len(order))

    def chunk(start: int) -> bytes:
        stop = start + _FRAMES_PER_CHUNK
        mask = frames[planes[start:stop]] == segments[start:stop, None, None]
        return np.packbits(mask.reshape(-1), bitorder="little").tobytes()

    starts = range(0, len(order), _FRAMES_PER_CHUNK)
    chunks = executor.map(chunk, starts) if executor is not None else map(chunk, starts)
    packed = b"".join(chunks)
    return packed + b"\x00" if len(packed) % 2 else packed


def _encoded(element: DataElement, encodings: str | list[str] | None) -> bytes:
    """One data element as explicit VR little endian bytes (pydicom's encoding)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_data_element(buffer, element, encodings)
    return buffer.getvalue()


def _sequence(tag: BaseTag, item: Dataset) -> DataElement:
    return DataElement(tag, "SQ", DicomSequence([item]))


@dataclass(frozen=True)
class _PlaneItem:
    """A LABELMAP frame's functional groups, encoded around what a BINARY frame changes.

    ``frame_content`` is its Frame Content Sequence with Dimension Index Values ``[0, plane]``;
    the segment number goes in its 4 bytes at ``segment_offset``. The other groups come before
    it (``before``), between it and the Segment Identification Sequence (``between``), after
    that (``after``): data elements are in tag order.
    """

    before: bytes
    frame_content: bytes
    segment_offset: int
    between: bytes
    after: bytes


# Dimension Index Values (0020,9157), explicit VR UL, 8 bytes: the tag, VR and length before the
# two values of a BINARY frame's index, [segment, plane].
_DIMENSION_INDEX_HEADER = b"\x20\x00\x57\x91UL\x08\x00"


def _plane_item(item: Dataset, encodings: str | list[str] | None) -> _PlaneItem:
    parts = [(element.tag, _encoded(element, encodings)) for element in item]
    content = item.FrameContentSequence[0]
    frame_content = Dataset()
    for element in content:
        if element.tag != _DIMENSION_INDEX_VALUES:
            frame_content.add(element)
    # [segment, plane]: highdicom's order for a BINARY SEG's dimensions
    frame_content.DimensionIndexValues = [0, int(content.DimensionIndexValues)]
    encoded = _encoded(_sequence(_FRAME_CONTENT, frame_content), encodings)
    if encoded.count(_DIMENSION_INDEX_HEADER) != 1:
        raise ValueError("cannot place the segment in the frame's Dimension Index Values")
    return _PlaneItem(
        before=b"".join(value for tag, value in parts if tag < _FRAME_CONTENT),
        frame_content=encoded,
        segment_offset=encoded.index(_DIMENSION_INDEX_HEADER) + len(_DIMENSION_INDEX_HEADER),
        between=b"".join(
            value for tag, value in parts if _FRAME_CONTENT < tag < _SEGMENT_IDENTIFICATION
        ),
        after=b"".join(value for tag, value in parts if tag > _SEGMENT_IDENTIFICATION),
    )


def _per_frame_items(
    labelmap: Dataset,
    order: Sequence[_Frame],
    encodings: str | list[str] | None,
    *,
    segments_per_frame: bool,
) -> bytes:
    """The Per-Frame Functional Groups Sequence's items, encoded: each plane's groups and each
    segment's identification by pydicom once, a frame's item joined from those."""
    planes = [_plane_item(item, encodings) for item in labelmap.PerFrameFunctionalGroupsSequence]
    identifications: dict[int, bytes] = {}

    def identification(segment: int) -> bytes:
        if not segments_per_frame:
            return b""  # in the shared functional groups
        if segment not in identifications:
            item = Dataset()
            item.add_new(_REFERENCED_SEGMENT_NUMBER, "US", segment)
            element = _sequence(_SEGMENT_IDENTIFICATION, item)
            identifications[segment] = _encoded(element, encodings)
        return identifications[segment]

    def items() -> Iterator[bytes]:
        for frame in order:
            plane = planes[frame.plane]
            at = plane.segment_offset
            body = b"".join(
                (
                    plane.before,
                    plane.frame_content[:at],
                    frame.segment.to_bytes(4, "little"),
                    plane.frame_content[at + 4 :],
                    plane.between,
                    identification(frame.segment),
                    plane.after,
                )
            )
            yield _ITEM + len(body).to_bytes(4, "little") + body

    return b"".join(items())


def _dimension_index(labelmap: Dataset) -> DicomSequence:
    """Referenced Segment Number first, then the LABELMAP's dimensions (plane position)."""
    organization = labelmap.DimensionOrganizationSequence[0].DimensionOrganizationUID
    segment = Dataset()
    segment.DimensionOrganizationUID = organization
    segment.DimensionIndexPointer = _REFERENCED_SEGMENT_NUMBER
    segment.FunctionalGroupPointer = _SEGMENT_IDENTIFICATION
    segment.DimensionDescriptionLabel = "Referenced Segment Number"
    return DicomSequence([segment, *labelmap.DimensionIndexSequence])


def _shared(labelmap: Dataset, *, segment: int | None) -> DicomSequence:
    """The LABELMAP's shared functional groups, with the segment when there is only one."""
    shared = Dataset()
    for element in labelmap.SharedFunctionalGroupsSequence[0]:
        shared.add(element)
    if segment is not None:
        item = Dataset()
        item.add_new(_REFERENCED_SEGMENT_NUMBER, "US", segment)
        shared.add(_sequence(_SEGMENT_IDENTIFICATION, item))
    return DicomSequence([shared])


def _file_meta(labelmap: Dataset, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    for element in labelmap.file_meta:
        if element.tag not in _META_REPLACED:
            meta.add(element)
    meta.MediaStorageSOPClassUID = SegmentationStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta
