"""Typed results shared by several operations (and the API's response bodies), built from rows.

Results carry patient IDs and accession numbers (worklists and RIS match on them) but never
patient names or birth dates.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pacsai.db import Delivery, DeliveryStatus, Job, JobStatus, Result, ResultKind, ResultObject

__all__ = [
    "DeliveryOut",
    "Finding",
    "JobOut",
    "ResultObjectOut",
    "ResultOut",
    "delivery_out",
    "findings_of",
    "job_out",
    "result_out",
]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class Finding(_Out):
    """One thing a model found: a segmented label with its volume, or a class probability."""

    label: str
    volume_ml: float | None = Field(default=None, description="Segmentation: volume in ml")
    voxels: int | None = Field(default=None, description="Segmentation: voxel count")
    probability: float | None = Field(default=None, description="Classification: 0 to 1")


class ResultObjectOut(_Out):
    """A DICOM object written for a result (SEG, SR or OVERLAY)."""

    id: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


class ResultOut(_Out):
    """One model output on one series, with what it found and the objects written for it."""

    id: int
    job_id: int
    route: str
    kind: ResultKind
    series_instance_uid: str
    model_name: str
    model_version: str
    findings: list[Finding]
    objects: list[ResultObjectOut]
    created_at: datetime
    purged_at: datetime | None = Field(
        default=None,
        description="When its files (SEG, SR, label map) were removed from this node; its "
        "findings and objects' UIDs stay. Null while they are here.",
    )


class DeliveryOut(_Out):
    """One delivery to one destination: the objects of a result (kind ``dicom``), or one
    message about the whole job (``hl7``, ``fhir``; ``webhook`` and ``email`` alerts)."""

    id: int
    job_id: int
    result_id: int | None = Field(description="The result whose objects it sends (dicom only)")
    kind: str = Field(description="The destination's kind: dicom, hl7, fhir, webhook or email")
    destination: str
    kinds: list[str] = Field(description="The object kinds it sends (dicom only): SEG, SR...")
    message_key: str | None = Field(
        description="The key every attempt of a message is sent under (HL7 MSH-10, the FHIR "
        "identifiers, X-Pacsai-Delivery, the e-mail's Message-ID); null for dicom"
    )
    priority: bool = Field(
        default=False, description="The message says the study is priority (alerts always do)"
    )
    status: DeliveryStatus
    attempts: int
    last_error: str | None
    seg_type: str | None = Field(
        description="The SEG type the destination received: LABELMAP where it accepts the "
        "Label Map Segmentation SOP Class, else BINARY (null until sent, or without a SEG)"
    )
    next_attempt_at: datetime | None
    created_at: datetime
    sent_at: datetime | None


class JobOut(_Out):
    """A job as listed: its study, state and times."""

    id: int
    study_instance_uid: str
    status: JobStatus
    reason: str | None = Field(description="Why it was skipped or failed (or what it could not do)")
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    seconds: float | None = Field(description="From start to finish")
    timings: dict[str, float] = Field(
        default_factory=dict,
        description="Seconds per stage (route, load_model, volume, preprocessing, forward, "
        "postprocessing, store, report...)",
    )


def findings_of(summary: dict[str, Any]) -> list[Finding]:
    """Labels present (with volumes) or class probabilities from a result's stored summary."""
    if "probabilities" in summary:
        return [
            Finding(label=str(name), probability=float(p))
            for name, p in summary["probabilities"].items()
        ]
    return [
        Finding(
            label=str(label["name"]),
            volume_ml=float(label["volume_ml"]),
            voxels=int(label["voxels"]),
        )
        for label in summary.get("labels", [])
        if label.get("voxels")
    ]


def result_out(result: Result, objects: list[ResultObject]) -> ResultOut:
    """The response body of a result row and its objects."""
    return ResultOut(
        id=result.id,
        job_id=result.job_id,
        route=result.route_name,
        kind=result.kind,
        series_instance_uid=result.series_instance_uid,
        model_name=result.model_name,
        model_version=result.model_version,
        findings=findings_of(json.loads(result.summary)),
        objects=[
            ResultObjectOut(
                id=obj.id,
                kind=obj.kind,
                sop_class_uid=obj.sop_class_uid,
                sop_instance_uid=obj.sop_instance_uid,
                series_instance_uid=obj.series_instance_uid,
            )
            for obj in objects
        ],
        created_at=result.created_at,
        purged_at=result.purged_at,
    )


def delivery_out(delivery: Delivery) -> DeliveryOut:
    """The response body of a delivery row (the next attempt only while one is due)."""
    waiting = delivery.status in (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)
    priority = False
    if delivery.payload:
        try:
            priority = bool(json.loads(delivery.payload).get("priority"))
        except (ValueError, AttributeError):
            priority = False  # shown as it is; its sender reports the damage
    return DeliveryOut(
        id=delivery.id,
        job_id=delivery.job_id,
        result_id=delivery.result_id,
        kind=delivery.kind,
        destination=delivery.destination,
        kinds=[kind for kind in delivery.kinds.split(",") if kind],
        message_key=delivery.message_key,
        priority=priority,
        status=delivery.status,
        attempts=delivery.attempts,
        last_error=delivery.last_error,
        seg_type=delivery.seg_type,
        next_attempt_at=delivery.next_attempt_at if waiting else None,
        created_at=delivery.created_at,
        sent_at=delivery.sent_at,
    )


def job_out(job: Job, study_instance_uid: str) -> JobOut:
    """The listed form of a job row."""
    seconds = (
        round((job.finished_at - job.started_at).total_seconds(), 3)
        if job.finished_at is not None and job.started_at is not None
        else None
    )
    return JobOut(
        id=job.id,
        study_instance_uid=study_instance_uid,
        status=job.status,
        reason=job.reason,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        seconds=seconds,
        timings={str(k): float(v) for k, v in json.loads(job.timings or "{}").items()},
    )
