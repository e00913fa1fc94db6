"""Reading and checking the header of a received instance, without decoding its pixels."""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from pacsai._routing_attributes import RoutingAttributes, image_frames
from pacsai.errors import InvalidInstanceError, UnreadableInstanceError
from pacsai.scp.uids import validate_uid

__all__ = ["InstanceHeader", "encode_file_meta", "read_header"]

log = logging.getLogger(__name__)

_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset((0x7FE00008, 0x7FE00009, _PIXEL_DATA))  # Float, Double Float, Pixel Data
_UNDEFINED = 0xFFFFFFFF
_ITEM_TAG_LE = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item, little endian: starts encapsulated pixels
_SEQUENCE_DELIMITER_LE = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD) Sequence Delimitation Item


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The attributes of an instance that pacsai records, read from its header."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    series_number: int | None
    series_description: str | None
    body_part_examined: str | None
    instance_number: int | None
    frames: int  # images it holds: NumberOfFrames, 1, or 0 for a non-image such as an SR
    routing_attributes: str | None  # of an image: what routing reads (RoutingAttributes JSON)


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element in Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii", "replace")
    return value + pad if len(value) % 2 else value


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) of a received instance.

    Written by hand, as pydicom would write the group pynetdicom's ``create_file_meta`` makes
    (same elements and values), at a fraction of the cost. The UIDs must be validated.
    """
    body = b"".join(
        (
            _explicit(0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _explicit(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _explicit(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
            _explicit(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _explicit(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    group_length = _explicit(0x0000, b"UL", struct.pack("<L", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    """A string attribute, tolerant of bad values (they are recorded as missing)."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom raises many types for malformed values
        return None
    if value is None:
        return None
    text = str(value).strip("\x00 ")
    return text[:limit] or None


def _integer(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except Exception:  # noqa: BLE001 - IS values can be anything on the wire
        return None


@dataclass(frozen=True, slots=True)
class _PixelElement:
    """Where the first pixel data element of a data set is, as its header declares it."""

    tag: int
    length: int  # of its value; 0xFFFFFFFF: undefined (encapsulated)
    offset: int  # of its value in the data set


def _parse(data: bytes, transfer_syntax: UID) -> tuple[Dataset, _PixelElement | None, bytes]:
    """The data set's elements before its pixel data, where its pixel data is, and the bytes
    parsed (`data`, inflated if the transfer syntax is deflated).

    The pixel data value is neither copied nor decoded; nothing after it is read.
    """
    if transfer_syntax.is_transfer_syntax:
        implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
        if transfer_syntax.is_deflated:
            data = zlib.decompress(data, -zlib.MAX_WBITS)  # as pydicom reads a deflated file
    else:  # a private transfer syntax: Explicit VR Little Endian, as pydicom assumes (PS3.5 A.4)
        implicit, little = False, True
    fp = BytesIO(data)
    found: list[_PixelElement] = []

    def at_pixels(tag: int, _vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            found.append(_PixelElement(int(tag), length, fp.tell()))
            return True
        return False

    ds = read_dataset(fp, implicit, little, stop_when=at_pixels)
    return ds, (found[0] if found else None), data


def _check_pixels(
    ds: Dataset, pixels: _PixelElement | None, data: bytes, sop_class: UID, compressed: bool
) -> None:
    """Refuse image data sets whose pixel data is missing, cut short, or shorter than their
    header says."""
    if pixels is None:
        if "Image Storage" in sop_class.name:
            raise InvalidInstanceError(f"a {sop_class.name} instance must have Pixel Data")
        if "Rows" in ds and "Columns" in ds:
            raise InvalidInstanceError(
                "the data set describes an image (Rows, Columns) but has no Pixel Data"
            )
        return
    if pixels.tag != _PIXEL_DATA:
        return  # Float or Double Float Pixel Data: not checked
    if pixels.length == _UNDEFINED:
        if not compressed:
            raise InvalidInstanceError(
                "Pixel Data has an undefined length, but the transfer syntax is not compressed"
            )
        _check_fragments(data, pixels.offset)
        return
    if pixels.length == 0:
        raise InvalidInstanceError("Pixel Data is empty")
    available = min(pixels.length, len(data) - pixels.offset)
    if available < pixels.length:
        raise InvalidInstanceError(
            f"Pixel Data declares {pixels.length} bytes but the data set ends after "
            f"{max(available, 0)}: it is cut short"
        )
    if compressed:
        if data[pixels.offset : pixels.offset + 4] != _ITEM_TAG_LE:
            raise InvalidInstanceError(
                "Pixel Data is not encapsulated, but the transfer syntax is compressed"
            )
        return
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as exc:
        raise InvalidInstanceError(
            f"Rows, Columns, BitsAllocated, SamplesPerPixel or NumberOfFrames is unusable: {exc}"
        ) from exc
    if min(rows, columns, bits, samples, frames) <= 0:
        raise InvalidInstanceError("Rows, Columns, BitsAllocated and NumberOfFrames must be > 0")
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if pixels.length < expected:
        raise InvalidInstanceError(
            f"Pixel Data holds {pixels.length} bytes; {rows}x{columns}x{frames} frames of "
            f"{bits}-bit samples need {expected}: the data set is incomplete"
        )


def _check_fragments(data: bytes, offset: int) -> None:
    """Encapsulated Pixel Data (PS3.5 A.4): items that each fit in the data set, then a
    Sequence Delimitation Item; the fragments themselves are not read."""
    end = len(data)
    items = 0
    while True:
        if offset + 8 > end:
            if items == 0:
                raise InvalidInstanceError("Pixel Data is empty")
            raise InvalidInstanceError(
                "encapsulated Pixel Data is cut short: no Sequence Delimitation Item"
            )
        tag = data[offset : offset + 4]
        (length,) = struct.unpack_from("<L", data, offset + 4)
        if tag == _SEQUENCE_DELIMITER_LE:
            if items == 0:
                raise InvalidInstanceError("Pixel Data is empty")
            return
        if tag != _ITEM_TAG_LE:
            if items == 0:
                raise InvalidInstanceError(
                    "Pixel Data is not encapsulated, but the transfer syntax is compressed"
                )
            raise InvalidInstanceError(
                f"encapsulated Pixel Data holds something other than an item after item {items}"
            )
        offset += 8 + length
        if offset > end:
            raise InvalidInstanceError(
                f"item {items} of the encapsulated Pixel Data declares {length} bytes and runs "
                "past the end of the data set: it is cut short"
            )
        items += 1


def read_header(
    dataset: bytes,
    *,
    transfer_syntax_uid: str,
    affected_sop_class_uid: str,
    affected_sop_instance_uid: str,
) -> InstanceHeader:
    """Parse a received data set (as it came, in `transfer_syntax_uid`) and check it against
    its C-STORE request.

    The elements before the pixel data are parsed; the pixel data is located, its length and
    (encapsulated) its items checked, never copied or decoded.

    Raises
    ------
    UnreadableInstanceError
        If the bytes are not a parseable DICOM data set.
    InvalidInstanceError
        If a required UID is missing or malformed, the data set's SOP Class or Instance UID
        differs from the request's, or the pixel data is missing, incomplete or cut short.
    """
    transfer_syntax = UID(transfer_syntax_uid)
    try:
        ds, pixels, parsed = _parse(dataset, transfer_syntax)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise UnreadableInstanceError(f"the data set cannot be parsed: {exc}") from exc
    except Exception as exc:
        raise UnreadableInstanceError(
            f"the data set cannot be parsed: {type(exc).__name__}: {exc}"
        ) from exc

    def uid(keyword: str) -> str:
        try:
            value: Any = ds.get(keyword)
        except Exception as exc:
            raise InvalidInstanceError(f"{keyword} cannot be read: {exc}") from exc
        return validate_uid(value, keyword)

    sop_class_uid = uid("SOPClassUID")
    sop_instance_uid = uid("SOPInstanceUID")
    if sop_class_uid != affected_sop_class_uid:
        raise InvalidInstanceError(
            f"SOP Class UID {sop_class_uid} in the data set differs from the C-STORE request's "
            f"Affected SOP Class UID {affected_sop_class_uid}"
        )
    if sop_instance_uid != affected_sop_instance_uid:
        raise InvalidInstanceError(
            f"SOP Instance UID {sop_instance_uid} in the data set differs from the C-STORE "
            f"request's Affected SOP Instance UID {affected_sop_instance_uid}"
        )
    frames = image_frames(ds)
    header = InstanceHeader(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=uid("StudyInstanceUID"),
        series_instance_uid=uid("SeriesInstanceUID"),
        modality=_text(ds, "Modality", 16),
        patient_id=_text(ds, "PatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription", 64),
        series_number=_integer(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 64),
        body_part_examined=_text(ds, "BodyPartExamined", 16),
        instance_number=_integer(ds, "InstanceNumber"),
        frames=frames,
        # read here, from the header parsed anyway, so that the job need not read it again
        routing_attributes=RoutingAttributes.of(ds).to_json() if frames else None,
    )
    compressed = transfer_syntax.is_compressed if transfer_syntax.is_transfer_syntax else True
    _check_pixels(ds, pixels, parsed, UID(sop_class_uid), compressed)
    return header
