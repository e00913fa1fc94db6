"""An object written in one transfer syntax, re-encoded in another for a peer that needs it.

Results are written losslessly compressed (JPEG-LS frames for a LABELMAP SEG, the whole data set
deflated for a BINARY SEG: :data:`STORED_TRANSFER_SYNTAXES`) and sent
as they are to a peer that accepts that transfer syntax. A peer that does not gets the object
in Explicit VR Little Endian, or in Implicit VR Little Endian, the one every peer takes
(PS3.5 10.1): :func:`reencode` writes that copy.

A deflated data set is Explicit VR Little Endian under zlib's deflate (PS3.5 A.5), so it is
inflated into place without parsing it: a BINARY SEG with thousands of frames is never decoded
to be sent. Compressed pixel data is decoded by pydicom (with pylibjpeg, pyjpegls); the SOP
Instance UID stays the same, as for any change of transfer syntax.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)

from pacsai.errors import DeliveryError

__all__ = [
    "DEFLATE_LEVEL",
    "FALLBACK_TRANSFER_SYNTAXES",
    "STORED_TRANSFER_SYNTAXES",
    "reencode",
    "save",
]

#: Transfer syntax each kind of object is written in: lossless compression where the object
#: allows it. LABELMAP frames compress best with JPEG-LS (a 512x512 frame in 0.3 ms, to about
#: 3 KiB for compact structures); a BINARY SEG's 1-bit frames are deflated as a whole (those
#: codecs take 8 or 16 bits); an SR is text.
STORED_TRANSFER_SYNTAXES: dict[str, UID] = {
    "LABELMAP": JPEGLSLossless,
    "BINARY": DeflatedExplicitVRLittleEndian,
    "SR": ExplicitVRLittleEndian,
}

#: zlib level of a deflated object. A BINARY SEG's masks deflate to about 1/100 at any level; on a
#: 104-label SEG level 1 takes a third of the time of zlib's default (6), for files ~30% larger.
DEFLATE_LEVEL = 1

#: What a peer that does not accept an object's own transfer syntax is offered instead, best
#: first.
FALLBACK_TRANSFER_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

_PREAMBLE = 128
_CHUNK = 1 << 20


def save(dataset: Dataset, handle: BinaryIO) -> None:
    """Write ``dataset`` as a DICOM file (PS3.10) in its file meta's transfer syntax.

    pydicom's writer deflates at zlib's default level; a deflated data set is written here the
    same way (preamble, file meta, the Explicit VR Little Endian data set deflated, PS3.5 A.5)
    at :data:`DEFLATE_LEVEL`.
    """
    if dataset.file_meta.TransferSyntaxUID != DeflatedExplicitVRLittleEndian:
        dataset.save_as(handle, enforce_file_format=True)
        return
    encoded = io.BytesIO()
    writer = DicomFileLike(encoded)
    writer.is_little_endian, writer.is_implicit_VR = True, False
    write_dataset(writer, dataset)
    compressor = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    with encoded.getbuffer() as view:
        deflated = compressor.compress(view) + compressor.flush()
    encoded.close()
    output = DicomFileLike(handle)
    output.is_little_endian, output.is_implicit_VR = True, False
    output.write(b"\x00" * _PREAMBLE + b"DICM")
    write_file_meta_info(output, dataset.file_meta, enforce_standard=True)
    output.write(deflated)
    if len(deflated) % 2:
        output.write(b"\x00")


def reencode(source: Path, target: Path, transfer_syntax_uid: UID) -> None:
    """Write the object in ``source`` to ``target`` in an uncompressed transfer syntax.

    Parameters
    ----------
    source : pathlib.Path
        A DICOM file with file meta information, in any transfer syntax pydicom can decode.
    target : pathlib.Path
        Where to write the copy (a temporary file of the delivery: not written atomically).
    transfer_syntax_uid : pydicom.uid.UID
        Explicit or Implicit VR Little Endian.

    Raises
    ------
    pacsai.errors.DeliveryError
        If the file cannot be read or decoded (missing codec, damaged data).
    """
    if transfer_syntax_uid not in FALLBACK_TRANSFER_SYNTAXES:
        raise ValueError(
            f"re-encoding is to an uncompressed transfer syntax, not {transfer_syntax_uid}"
        )
    try:
        meta = read_file_meta_info(source)
        stored = UID(str(meta.TransferSyntaxUID))
        if stored == transfer_syntax_uid:
            target.write_bytes(source.read_bytes())
        elif (
            stored == DeflatedExplicitVRLittleEndian
            and transfer_syntax_uid == ExplicitVRLittleEndian
        ):
            _inflate(source, target, meta)
        else:
            dataset = dcmread(source)
            if dataset.file_meta.TransferSyntaxUID.is_compressed:
                dataset.decompress(generate_instance_uid=False)
            dataset.file_meta.TransferSyntaxUID = transfer_syntax_uid
            dataset.save_as(target, enforce_file_format=True)
    except (OSError, InvalidDicomError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise DeliveryError(
            f"cannot re-encode {source.name} in {transfer_syntax_uid.name}: {exc}"
        ) from exc


def _inflate(source: Path, target: Path, meta: FileMetaDataset) -> None:
    """Deflated Explicit VR Little Endian to Explicit VR Little Endian, streaming."""
    # The data set starts after the preamble, "DICM", the group length element (12 bytes) and
    # the group length's value.
    offset = _PREAMBLE + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    with source.open("rb") as reader, target.open("wb") as writer:
        writer.write(b"\x00" * _PREAMBLE + b"DICM")
        write_file_meta_info(DicomFileLike(writer), meta, enforce_standard=True)
        reader.seek(offset)
        while chunk := reader.read(_CHUNK):
            writer.write(inflater.decompress(chunk))
            if inflater.eof:
                break
        writer.write(inflater.flush())
    if not inflater.eof:
        raise ValueError("the deflated data set ends early")
