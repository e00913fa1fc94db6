"""Modality Performed Procedure Step SCP (PS3.4 Annex F.7): what a modality says it acquired.

A modality creates a step (N-CREATE, status IN PROGRESS) when it starts an exam and sets it
COMPLETED (N-SET) at the end, listing in the Performed Series Sequence every series and every
image it produced. pacsai records the step against its study (the Study Instance UID and
Accession Number of the Scheduled Step Attributes Sequence); once COMPLETED, the study completes
as soon as each listed series holds its listed instances, instead of after its quiet window
(at once when no series is listed). A DISCONTINUED step leaves the study to its quiet window.

The service answers with the DIMSE statuses of PS3.4 F.7.2.1.2 and F.7.2.2.2
(:class:`MppsStatus`); a database failure is a Processing Failure the modality may retry.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset

from pacsai.db import Database, utcnow
from pacsai.db.expectations import MppsOutcome, create_mpps_step, update_mpps_step
from pacsai.errors import InvalidInstanceError, PacsaiError
from pacsai.scp.uids import validate_uid

__all__ = ["MppsService", "MppsStatus"]

log = logging.getLogger(__name__)


class MppsStatus(enum.IntEnum):
    """DIMSE statuses of the MPPS N-CREATE and N-SET answers."""

    SUCCESS = 0x0000
    INVALID_ATTRIBUTE_VALUE = 0x0106
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_INSTANCE = 0x0112
    MISSING_ATTRIBUTE = 0x0120
    MAY_NO_LONGER_BE_UPDATED = 0xA710  # the step is COMPLETED or DISCONTINUED already


_STATUSES = ("IN PROGRESS", "COMPLETED", "DISCONTINUED")


def _text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _scheduled(dataset: Dataset) -> tuple[str | None, str | None]:
    """(Study Instance UID, Accession Number) of the first scheduled step that names them."""
    for item in dataset.get("ScheduledStepAttributesSequence", []) or []:
        study = _text(item.get("StudyInstanceUID"))
        accession = _text(item.get("AccessionNumber"))
        if study or accession:
            return study, accession
    return None, None


def _performed_series(items: Iterable[Dataset]) -> dict[str, int | None]:
    """Series Instance UID -> number of instances listed (images and other composites)."""
    series: dict[str, int | None] = {}
    for item in items:
        uid = _text(item.get("SeriesInstanceUID"))
        if uid is None:
            continue
        validate_uid(uid, "Series Instance UID of a performed series")
        count = len(item.get("ReferencedImageSequence", []) or []) + len(
            item.get("ReferencedNonImageCompositeSOPInstanceSequence", []) or []
        )
        series[uid] = (series.get(uid) or 0) + count or None
    return series


class MppsService:
    """Records MPPS steps as expectations of their studies; used by the receiver's handlers."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def create(
        self, sop_instance_uid: str | None, dataset: Dataset, *, actor: str, remote_address: str
    ) -> MppsStatus:
        """N-CREATE: a step starts (it must be IN PROGRESS)."""
        if not sop_instance_uid:
            return MppsStatus.MISSING_ATTRIBUTE  # the SCU assigns the MPPS SOP Instance UID
        status = _text(dataset.get("PerformedProcedureStepStatus"))
        if status != "IN PROGRESS":
            return MppsStatus.INVALID_ATTRIBUTE_VALUE
        study, accession = _scheduled(dataset)
        try:
            validate_uid(sop_instance_uid, "Affected SOP Instance UID")
            if study is not None:
                validate_uid(study, "Study Instance UID")
            with self.database.transaction() as session:
                outcome = create_mpps_step(
                    session=session,
                    sop_instance_uid=sop_instance_uid,
                    study_instance_uid=study,
                    accession_number=accession[:16] if accession else None,
                    actor=actor,
                    remote_address=remote_address,
                    now=utcnow(),
                )
        except PacsaiError as exc:
            return self._failed("N-CREATE", exc)
        if outcome is MppsOutcome.DUPLICATE:
            return MppsStatus.DUPLICATE_SOP_INSTANCE
        log.info(
            "MPPS step started by %s",
            actor,
            extra={"action": "mpps_created", "mpps_uid": sop_instance_uid},
        )
        return MppsStatus.SUCCESS

    def update(
        self, sop_instance_uid: str | None, modifications: Dataset, *, actor: str
    ) -> MppsStatus:
        """N-SET: a step's attributes change; COMPLETED says what its study holds."""
        if not sop_instance_uid:
            return MppsStatus.NO_SUCH_SOP_INSTANCE
        status = _text(modifications.get("PerformedProcedureStepStatus"))
        if status is not None and status not in _STATUSES:
            return MppsStatus.INVALID_ATTRIBUTE_VALUE
        try:
            series = _performed_series(modifications.get("PerformedSeriesSequence", []) or [])
            with self.database.transaction() as session:
                outcome = update_mpps_step(
                    session=session,
                    sop_instance_uid=sop_instance_uid,
                    status=status,
                    expected_series=series,
                    now=utcnow(),
                )
        except PacsaiError as exc:
            return self._failed("N-SET", exc)
        if outcome is MppsOutcome.NO_SUCH_STEP:
            return MppsStatus.NO_SUCH_SOP_INSTANCE
        if outcome is MppsOutcome.FINAL:
            return MppsStatus.MAY_NO_LONGER_BE_UPDATED
        if status in ("COMPLETED", "DISCONTINUED"):
            log.info(
                "MPPS step %s by %s (%d series listed)",
                status.lower(),
                actor,
                len(series),
                extra={"action": "mpps_" + status.lower(), "mpps_uid": sop_instance_uid},
            )
        return MppsStatus.SUCCESS

    @staticmethod
    def _failed(operation: str, exc: PacsaiError) -> MppsStatus:
        if isinstance(exc, InvalidInstanceError):
            return MppsStatus.INVALID_ATTRIBUTE_VALUE
        log.error("could not record an MPPS %s: %s", operation, exc)
        return MppsStatus.PROCESSING_FAILURE
