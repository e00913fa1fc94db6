"""The BINARY form of a LABELMAP result, for a destination that does not accept the Label Map
Segmentation SOP Class.

A route's SEG is written as a Label Map Segmentation (:mod:`pacsai.reporting.outputs`). A
delivery learns whether its destination accepts that SOP Class only when it negotiates the
association; when it does not, :func:`binary_variant` writes, beside the result's files, the
BINARY Segmentation of the same segments and the result's SRs referring to it instead, and the
delivery sends those. They are written once per result (later deliveries find them) and their
UIDs are derived from the LABELMAP's and the SRs' (:func:`pacsai.reporting.result_uid`), so two
deliveries making them at once write the same files, and each is atomic.

The BINARY SEG and its SRs stay in the series of the LABELMAP and of the SRs: the series UIDs a
worklist or the API gives are right at every destination, whichever form it received.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import SegmentationStorage

from pacsai._atomic import write_atomically
from pacsai.errors import ReportError
from pacsai.reporting._uids import result_uid
from pacsai.reporting.binary_seg import binary_from_labelmap
from pacsai.reporting.sr import retarget_report
from pacsai.reporting.transfer import STORED_TRANSFER_SYNTAXES, save

__all__ = ["BinaryVariant", "binary_form_uid", "binary_variant"]

_SUFFIX = "-binary"


@dataclass(frozen=True)
class BinaryVariant:
    """Files of the BINARY form of a LABELMAP result.

    Attributes
    ----------
    seg : pathlib.Path
        The BINARY SEG.
    reports : dict of pathlib.Path to pathlib.Path
        Each SR of the LABELMAP result -> the same SR referring to the BINARY SEG.
    """

    seg: Path
    reports: dict[Path, Path]


def binary_variant(labelmap: Path, reports: Sequence[Path]) -> BinaryVariant:
    """Write (unless written before) the BINARY form of a LABELMAP SEG and of its SRs.

    Parameters
    ----------
    labelmap : pathlib.Path
        The Label Map Segmentation file.
    reports : sequence of pathlib.Path
        The SR files that refer to it.

    Returns
    -------
    BinaryVariant
        ``<name>-binary.dcm`` beside each file given.

    Raises
    ------
    pacsai.errors.ReportError
        If a file cannot be read or is not what it should be.
    """
    seg_path = _beside(labelmap)
    try:
        meta = read_file_meta_info(labelmap)
        labelmap_uid = str(meta.MediaStorageSOPInstanceUID)
        binary_uid = binary_form_uid(labelmap_uid)
        if not seg_path.exists():
            dataset = dcmread(labelmap)
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                binary = binary_from_labelmap(dataset, sop_instance_uid=binary_uid, executor=pool)
            binary.file_meta.TransferSyntaxUID = STORED_TRANSFER_SYNTAXES["BINARY"]
            _save(seg_path, binary)
        written: dict[Path, Path] = {}
        for report_path in reports:
            target = _beside(report_path)
            if not target.exists():
                report = dcmread(report_path)
                retarget_report(
                    report,
                    segmentation=labelmap_uid,
                    replacement_sop_class_uid=SegmentationStorage,
                    replacement_sop_instance_uid=binary_uid,
                    sop_instance_uid=binary_form_uid(str(report.SOPInstanceUID)),
                )
                _save(target, report)
            written[report_path] = target
    except (OSError, InvalidDicomError, ValueError, AttributeError, KeyError) as exc:
        raise ReportError(f"cannot make the BINARY form of {labelmap.name}: {exc}") from exc
    return BinaryVariant(seg_path, written)


def binary_form_uid(sop_instance_uid: str) -> str:
    """SOP Instance UID of the BINARY form of a LABELMAP SEG, or of an SR referring to one."""
    return str(result_uid(sop_instance_uid, "BINARY"))


def _save(path: Path, dataset: Dataset) -> None:
    write_atomically(path, lambda handle: save(dataset, handle))


def _beside(path: Path) -> Path:
    return path.with_name(f"{path.stem}{_SUFFIX}{path.suffix}")
