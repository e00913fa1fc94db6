"""The receiver's header check: the elements before the pixel data parsed, the pixel data only
located and measured (never copied), on each encoding a peer may send."""

from __future__ import annotations

import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from pacsai.errors import InvalidInstanceError, UnreadableInstanceError
from pacsai.scp._header import read_header
from tests.support import make_ct_slice


def _slice() -> Dataset:
    return make_ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)


def _encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _read(data: bytes, ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian):  # type: ignore[no-untyped-def]
    return read_header(
        data,
        transfer_syntax_uid=transfer_syntax,
        affected_sop_class_uid=ds.SOPClassUID,
        affected_sop_instance_uid=ds.SOPInstanceUID,
    )


def _encapsulated(ds: Dataset) -> Dataset:
    ds.PixelData = encapsulate([b"\x00" * 100, b"\x01" * 60])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_a_complete_slice_is_read_in_either_little_endian_encoding(implicit: bool) -> None:
    ds = _slice()
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    header = _read(_encode(ds, implicit=implicit), ds, syntax)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.study_instance_uid == ds.StudyInstanceUID
    assert header.modality == "CT"
    assert header.frames == 1
    assert header.instance_number == 1
    assert header.routing_attributes is not None


def test_a_deflated_data_set_is_inflated_to_be_read() -> None:
    ds = _slice()
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    data = deflater.compress(_encode(ds)) + deflater.flush()
    assert _read(data, ds, DeflatedExplicitVRLittleEndian).series_instance_uid == (
        ds.SeriesInstanceUID
    )


def test_native_pixel_data_cut_short_is_refused_with_how_much_is_missing() -> None:
    ds = _slice()
    data = _encode(ds)
    with pytest.raises(InvalidInstanceError, match=r"declares 8192 bytes .* after 8000"):
        _read(data[:-192], ds)


def test_native_pixel_data_shorter_than_rows_and_columns_need_is_refused() -> None:
    ds = _slice()
    ds.PixelData = ds.PixelData[:-2]
    with pytest.raises(InvalidInstanceError, match="holds 8190 bytes"):
        _read(_encode(ds), ds)


def test_encapsulated_pixel_data_is_walked_item_by_item() -> None:
    ds = _encapsulated(_slice())
    data = _encode(ds)
    assert _read(data, ds, JPEG2000Lossless).frames == 1
    # cut inside the last fragment: the item runs past the end
    with pytest.raises(InvalidInstanceError, match=r"item 2 .* runs past the end"):
        _read(data[:-20], ds, JPEG2000Lossless)
    # cut exactly before the Sequence Delimitation Item
    with pytest.raises(InvalidInstanceError, match="no Sequence Delimitation Item"):
        _read(data[:-8], ds, JPEG2000Lossless)


def test_native_pixel_data_in_a_compressed_transfer_syntax_is_refused() -> None:
    ds = _slice()
    with pytest.raises(InvalidInstanceError, match="not encapsulated"):
        _read(_encode(ds), ds, JPEG2000Lossless)


def test_pixel_data_of_an_icon_in_a_sequence_is_not_taken_for_the_image() -> None:
    """Only a top-level pixel data element ends the parse: an Icon Image Sequence's item holds
    one of its own, before the image's."""
    ds = _slice()
    icon = Dataset()
    icon.Rows = icon.Columns = 2
    icon.BitsAllocated, icon.SamplesPerPixel = 8, 1
    icon.PixelData = b"\x00" * 4
    ds.IconImageSequence = Sequence([icon])
    ds.PixelData = ds.PixelData[:100]  # the image's own is short: that must be what is checked
    with pytest.raises(InvalidInstanceError, match="holds 100 bytes"):
        _read(_encode(ds), ds)


def test_an_image_without_pixel_data_is_refused() -> None:
    ds = _slice()
    del ds.PixelData
    with pytest.raises(InvalidInstanceError, match="must have Pixel Data"):
        _read(_encode(ds), ds)


def test_bytes_that_are_no_data_set_are_unreadable() -> None:
    ds = _slice()
    with pytest.raises((UnreadableInstanceError, InvalidInstanceError)):
        _read(b"\xff" * 7, ds)
