"""What a finished job sends beyond its DICOM objects: its study result to the RIS (HL7, FHIR)
and, when a route's priority rule holds, alerts (webhook, e-mail).

:func:`plan_study_messages` builds the job's :class:`~pacsai.reporting.study_result.StudyResult`
from the results this run stored (models with versions, every label or class with its volume or
probability and whether it is present, priority and why, SEG and SR UIDs, the console link) and
says which destinations get it: the ``hl7`` and ``fhir`` destinations of the routes that made a
result, and the ``webhook`` and ``email`` destinations of the routes whose ``priority:`` rule
holds (decided by :func:`pacsai.operations.priority.priority_reasons`, as the worklist does).
The job runner queues the deliveries in the transaction that records the job's end, so that a
finished job always has them (:func:`pacsai.db.deliveries.queue_job_messages`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacsai.config import Route, Settings
from pacsai.db import Instance, Job, Result, ResultKind, ResultObject, Study
from pacsai.operations.priority import priority_reasons
from pacsai.operations.results import result_out
from pacsai.reporting.channels import ALERT_KINDS, RESULT_KINDS
from pacsai.reporting.study_result import Finding, ModelRun, ResultObjectRef, StudyResult
from pacsai.storage import FileStore

__all__ = [
    "CLASS_PRESENT_AT",
    "StudyMessages",
    "describe_targets",
    "plan_study_messages",
    "study_link",
]

log = logging.getLogger(__name__)

#: A class is present at this probability and above, as the SR's qualitative evaluation says.
CLASS_PRESENT_AT = 0.5
_PLACEHOLDER_KEY = "unsent"  # the stored result has no key; each delivery sends its own


@dataclass(frozen=True)
class StudyMessages:
    """The study result of a finished job and the (destination, kind) pairs that get it."""

    result: StudyResult
    targets: tuple[tuple[str, str], ...]

    @property
    def payload(self) -> str:
        """The result as stored with each delivery (JSON, no key)."""
        return self.result.to_json()


def study_link(settings: Settings, study_instance_uid: str) -> str | None:
    """Where a person sees the study in the console (``api.public_url``), if it is set."""
    base = settings.api.public_url
    return f"{base}/studies/{study_instance_uid}" if base else None


def _findings(result: Result, summary: dict[str, Any]) -> list[Finding]:
    if result.kind == ResultKind.CLASSIFICATION:
        return [
            Finding(
                str(name),
                present=float(p) >= CLASS_PRESENT_AT,
                model=result.model_name,
                probability=min(1.0, max(0.0, float(p))),
            )
            for name, p in summary.get("probabilities", {}).items()
        ]
    return [
        Finding(
            str(label["name"]),
            present=int(label.get("voxels", 0)) > 0,
            model=result.model_name,
            volume_ml=float(label.get("volume_ml", 0.0)),
        )
        for label in summary.get("labels", [])
    ]


def _study_time(spool: FileStore, path: str | None, study_date: str | None) -> datetime | None:
    """Study Date and Time from one of the study's instances (the studies table keeps the date
    only); ``None`` when neither can be read. A date without a time gives ``None``: a time of
    midnight would be a guess."""
    if path is None:
        return None
    try:
        ds = dcmread(
            spool.local_path(path),
            stop_before_pixels=True,
            specific_tags=["StudyDate", "StudyTime"],
        )
    except (OSError, InvalidDicomError, ValueError) as exc:
        log.warning("study time not read from %s: %s", path, exc)
        return None
    date = str(ds.get("StudyDate", "") or study_date or "").strip()
    time = str(ds.get("StudyTime", "") or "").strip().split(".")[0]
    if len(date) != 8 or not date.isdigit() or len(time) < 4 or not time.isdigit():
        return None
    try:
        return datetime.strptime(date + time.ljust(6, "0")[:6], "%Y%m%d%H%M%S")
    except ValueError:
        return None


def plan_study_messages(
    session: Session,
    settings: Settings,
    spool: FileStore,
    *,
    job_id: int,
    result_ids: Sequence[int],
    routes: Mapping[str, Route],
) -> StudyMessages | None:
    """The study result of ``result_ids`` (what this run of ``job_id`` stored) and who gets it;
    ``None`` when no destination does.

    Raises
    ------
    ValueError
        If the stored results do not make a valid study result (a UID that is not one, say).
    """
    results = list(
        session.scalars(select(Result).where(Result.id.in_(list(result_ids))).order_by(Result.id))
    )
    if not results:
        return None
    targets: dict[tuple[str, str], None] = {}
    outs = []
    objects: list[ResultObject] = []
    for result in results:
        rows = list(
            session.scalars(
                select(ResultObject)
                .where(ResultObject.result_id == result.id)
                .order_by(ResultObject.id)
            )
        )
        objects += rows
        outs.append(result_out(result, rows))
    for out in outs:
        route = routes.get(out.route)
        if route is None:
            continue
        fired = bool(priority_reasons([out], routes))
        for name in route.send_to:
            kind = settings.destinations[name].kind if name in settings.destinations else None
            if kind in RESULT_KINDS or (fired and kind in ALERT_KINDS):
                targets[(name, str(kind))] = None
    if not targets:
        return None

    job = session.get(Job, job_id)
    assert job is not None
    study = session.get(Study, job.study_id)
    assert study is not None
    path = session.scalar(
        select(Instance.path).where(Instance.study_id == study.id).order_by(Instance.id).limit(1)
    )
    models: dict[str, ModelRun] = {}
    findings: list[Finding] = []
    for result in results:
        version = f"{result.model_version}+{result.weights_sha256[:12]}"
        models.setdefault(result.model_name, ModelRun(result.model_name, version))
        findings += _findings(result, json.loads(result.summary))
    reasons = priority_reasons(outs, routes)
    kinds: tuple[Literal["SEG", "SR"], ...] = ("SEG", "SR")
    refs = [
        ResultObjectRef(kind, obj.series_instance_uid, obj.sop_instance_uid)
        for kind in kinds
        for obj in objects
        if obj.kind == kind
    ]
    study_result = StudyResult(
        key=_PLACEHOLDER_KEY,
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number or None,
        patient_id=study.patient_id or None,
        study_time=_study_time(spool, path, study.study_date),
        models=tuple(models.values()),
        findings=tuple(findings),
        priority=bool(reasons),
        priority_reasons=tuple(reasons),
        objects=tuple(refs),
        link=study_link(settings, study.study_instance_uid),
    )
    return StudyMessages(study_result, tuple(targets))


def describe_targets(targets: Sequence[tuple[str, str]]) -> str:
    """``name (kind), ...`` for log lines."""
    return ", ".join(f"{name} ({kind})" for name, kind in targets)
