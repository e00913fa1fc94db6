"""What the console shows of the objects a job wrote: PNG previews of a SEG over its source
slices (drawn by :mod:`pacsai.demo.preview`) and the measurements of an SR (TID 1500, read back
with :func:`pacsai.reporting.sr.read_measurements`).

Both read the stored files: the object under ``storage.results_dir`` and, for previews, the
source instances in the spool. Previews are drawn once per object and kept beside the results
(``<results_dir>/previews/<object id>/``); they show patient images, and are served only to
signed-in users of the console.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from pacsai._atomic import write_atomically
from pacsai.config import Settings
from pacsai.db import Database, Instance, ResultObject
from pacsai.errors import PacsaiError
from pacsai.operations.errors import ConflictError, NotFoundError

__all__ = [
    "MeasurementRow",
    "kept_beside",
    "read_object",
    "segmentation_previews",
    "sr_measurements",
]

log = logging.getLogger(__name__)

_DRAWING = threading.Lock()  # one drawing at a time: each decodes a series


@dataclass(frozen=True)
class MeasurementRow:
    """One measurement of an SR measurement group, for a table."""

    finding: str
    tracking_identifier: str | None
    measurement: str
    value: float | None
    unit: str | None
    evaluation: str | None = None


def read_object(database: Database, object_id: int) -> tuple[ResultObject, str]:
    """The result object row ``object_id`` (detached) and the Study Instance UID of its job.

    Raises
    ------
    NotFoundError
        If there is no such object.
    """
    from pacsai.db import Job, Result, Study

    with database.reading() as session:
        row = session.execute(
            select(ResultObject, Study.study_instance_uid)
            .join(Result, Result.id == ResultObject.result_id)
            .join(Job, Job.id == Result.job_id)
            .join(Study, Study.id == Job.study_id)
            .where(ResultObject.id == object_id)
        ).first()
        if row is None:
            raise NotFoundError(f"no result object {object_id} on this node")
        obj, study_uid = row
        session.expunge(obj)
    return obj, str(study_uid)


def kept_beside(results_dir: Path, object_id: int) -> list[str]:
    """What was drawn or read from result object ``object_id`` and kept (previews,
    measurements), as paths relative to ``results_dir``; removed with the object's file."""
    previews = Path(results_dir) / "previews"
    found = [previews / f"{object_id}.measurements.json"]
    folder = previews / str(object_id)
    if folder.is_dir():
        found += sorted(path for path in folder.iterdir() if path.is_file())
    return [path.relative_to(results_dir).as_posix() for path in found]


def _stored_object(database: Database, object_id: int) -> ResultObject:
    """The row of result object ``object_id``, whose file must still be here.

    Raises
    ------
    NotFoundError
        If there is no such object.
    ConflictError
        If its result's files were removed (storage retention, `pacsai studies purge`).
    """
    from pacsai.db import Result

    obj, _ = read_object(database, object_id)
    with database.reading() as session:
        purged_at = session.scalar(select(Result.purged_at).where(Result.id == obj.result_id))
    if purged_at is not None:
        raise ConflictError(
            f"the files of result object {object_id} were removed from this node on "
            f"{purged_at:%Y-%m-%d %H:%M} UTC (storage retention or `pacsai studies purge`); "
            "its findings are kept"
        )
    return obj


def _read(path: Path, what: str, *, defer: bool = False) -> Dataset:
    try:
        return dcmread(path, defer_size="256 KB" if defer else None)
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        raise ConflictError(f"the {what} file {path} cannot be read: {exc}") from exc


def _slice_order(ds: Dataset) -> tuple[float, int]:
    """Position along the slice normal (then instance number), for source slices in order."""
    number = int(ds.get("InstanceNumber", 0) or 0)
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        ipp = [float(v) for v in ds.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        return float(number), number
    normal = np.cross(iop[:3], iop[3:])
    return float(np.dot(normal, ipp)), number


def segmentation_previews(
    database: Database,
    settings: Settings,
    object_id: int,
    *,
    colors: Mapping[str, tuple[int, int, int]],
    count: int = 3,
) -> list[Path]:
    """PNG previews of the SEG ``object_id`` over its source slices (the ``count`` slices with
    most segmented pixels), drawn on first use and kept.

    Raises
    ------
    NotFoundError
        If there is no such object.
    ConflictError
        If it is not a SEG, or its file or its source instances cannot be read.
    """
    obj = _stored_object(database, object_id)
    if obj.kind != "SEG":
        raise ConflictError(f"result object {object_id} is a {obj.kind}, not a SEG")
    results_dir = Path(settings.storage.results_dir)
    folder = results_dir / "previews" / str(object_id)
    with _DRAWING:
        if folder.is_dir():
            return sorted(folder.glob("*.png"))
        segmentation = _read(results_dir / obj.path, "SEG")
        sources = _sources(database, settings, segmentation)
        if not sources:
            raise ConflictError(
                f"none of the source images of SEG {obj.sop_instance_uid} is stored here"
            )
        from pacsai.demo.preview import write_segmentation_previews

        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{object_id}-", dir=folder.parent))
        try:
            write_segmentation_previews(
                segmentation, sources, scratch, prefix="seg", colors=colors, count=count
            )
        except (ValueError, PacsaiError) as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            raise ConflictError(f"SEG {obj.sop_instance_uid} cannot be previewed: {exc}") from exc
        scratch.replace(folder)
        return sorted(folder.glob("*.png"))


def _sources(database: Database, settings: Settings, segmentation: Dataset) -> dict[str, Dataset]:
    """The SEG's source instances that are in the spool, in slice order (pixels read lazily:
    only the previewed slices are decoded)."""
    wanted = {
        str(item.ReferencedSOPInstanceUID)
        for series in segmentation.get("ReferencedSeriesSequence", [])
        for item in series.get("ReferencedInstanceSequence", [])
    }
    if not wanted:
        return {}
    with database.reading() as session:
        paths = list(
            session.execute(
                select(Instance.sop_instance_uid, Instance.path).where(
                    Instance.sop_instance_uid.in_(sorted(wanted))
                )
            )
        )
    spool = Path(settings.storage.spool_dir)
    found = [_read(spool / path, "source image", defer=True) for _, path in paths]
    found.sort(key=_slice_order)
    return {str(ds.SOPInstanceUID): ds for ds in found}


def sr_measurements(database: Database, settings: Settings, object_id: int) -> list[MeasurementRow]:
    """The measurements of the SR ``object_id`` (TID 1500), one row per measured value or
    qualitative evaluation, in document order.

    Raises
    ------
    NotFoundError
        If there is no such object.
    ConflictError
        If it is not an SR, or its file cannot be read as a TID 1500 report.

    The rows are kept beside the previews once read (reading a report takes most of a second).
    """
    obj = _stored_object(database, object_id)
    if obj.kind != "SR":
        raise ConflictError(f"result object {object_id} is a {obj.kind}, not an SR")
    kept = Path(settings.storage.results_dir) / "previews" / f"{object_id}.measurements.json"
    try:
        return [MeasurementRow(**row) for row in json.loads(kept.read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError):
        pass  # not read yet (or unreadable): read the report again
    rows = _read_measurements(settings, obj)
    text = json.dumps([asdict(row) for row in rows]).encode("utf-8")
    try:
        write_atomically(kept, lambda handle: handle.write(text))
    except OSError as exc:
        log.warning("cannot keep the measurements of result object %d: %s", object_id, exc)
    return rows


def _read_measurements(settings: Settings, obj: ResultObject) -> list[MeasurementRow]:
    from pacsai.reporting.sr import read_measurements

    report = _read(Path(settings.storage.results_dir) / obj.path, "SR")
    try:
        groups = read_measurements(report)
    except PacsaiError as exc:
        raise ConflictError(f"SR {obj.sop_instance_uid} cannot be read: {exc}") from exc
    rows: list[MeasurementRow] = []
    for group in groups:
        finding = group["finding"].meaning if group["finding"] else "(finding not coded)"
        for name, measured in group["measurements"].items():
            rows.append(
                MeasurementRow(
                    finding, group["tracking_identifier"], name, measured["value"], measured["unit"]
                )
            )
        for name, value in group["evaluations"].items():
            rows.append(
                MeasurementRow(finding, group["tracking_identifier"], name, None, None, value)
            )
    return rows
