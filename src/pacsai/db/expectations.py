"""Repository functions for study expectations: MPPS steps and HL7 orders that say what a study
will hold. :func:`pacsai.db.repository.complete_expected_studies` completes the studies they name.

Each function runs in the caller's transaction (keyword-only arguments, an explicit session).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacsai.db.models import ExpectationState, StudyExpectation

__all__ = [
    "MppsOutcome",
    "create_mpps_step",
    "record_order",
    "update_mpps_step",
]

MPPS = "MPPS"
HL7 = "HL7"


class MppsOutcome(enum.StrEnum):
    """What recording an MPPS N-CREATE or N-SET did."""

    RECORDED = "RECORDED"
    DUPLICATE = "DUPLICATE"  # N-CREATE of a step that exists (PS3.4 F.7.2.1: 0x0111)
    NO_SUCH_STEP = "NO_SUCH_STEP"  # N-SET of a step never created (0x0112)
    FINAL = "FINAL"  # N-SET of a step already COMPLETED or DISCONTINUED (0xA710)


def _series_json(series: Mapping[str, int | None] | None) -> str | None:
    return json.dumps(dict(series), sort_keys=True) if series else None


def create_mpps_step(
    *,
    session: Session,
    sop_instance_uid: str,
    study_instance_uid: str | None,
    accession_number: str | None,
    actor: str,
    remote_address: str | None,
    now: datetime,
) -> MppsOutcome:
    """Record an MPPS step created IN PROGRESS: nothing is expected of its study yet."""
    existing = session.execute(
        select(StudyExpectation.id).where(
            StudyExpectation.source == MPPS, StudyExpectation.reference == sop_instance_uid
        )
    ).first()
    if existing is not None:
        return MppsOutcome.DUPLICATE
    session.add(
        StudyExpectation(
            source=MPPS,
            reference=sop_instance_uid,
            state=ExpectationState.IN_PROGRESS,
            study_instance_uid=study_instance_uid,
            accession_number=accession_number,
            complete_now=False,
            actor=actor,
            remote_address=remote_address,
            created_at=now,
            updated_at=now,
        )
    )
    session.flush()
    return MppsOutcome.RECORDED


def update_mpps_step(
    *,
    session: Session,
    sop_instance_uid: str,
    status: str | None,
    expected_series: Mapping[str, int | None] | None,
    now: datetime,
) -> MppsOutcome:
    """Apply an N-SET: ``COMPLETED`` makes the step's study wait for ``expected_series`` (or
    complete at once when it lists none); ``DISCONTINUED`` leaves the study to its quiet window;
    any other status only refreshes the step."""
    step = session.execute(
        select(StudyExpectation)
        .where(StudyExpectation.source == MPPS, StudyExpectation.reference == sop_instance_uid)
        .with_for_update()
    ).scalar_one_or_none()
    if step is None:
        return MppsOutcome.NO_SUCH_STEP
    if step.state is not ExpectationState.IN_PROGRESS:
        return MppsOutcome.FINAL
    step.updated_at = now
    if status == "COMPLETED":
        step.state = ExpectationState.WAITING
        step.expected_series = _series_json(expected_series)
        step.complete_now = not expected_series
    elif status == "DISCONTINUED":
        step.state = ExpectationState.DISCONTINUED
    return MppsOutcome.RECORDED


def record_order(
    *,
    session: Session,
    reference: str,
    study_instance_uid: str | None,
    accession_number: str | None,
    expected_series: Mapping[str, int | None] | None,
    expected_instances: int | None,
    complete_now: bool,
    actor: str,
    remote_address: str | None,
    now: datetime,
) -> StudyExpectation:
    """Record (or, for an order seen before and not met yet, replace) what an HL7 order says.

    An order message sent again (a lost ACK, an updated order) updates its expectation instead
    of adding one; an expectation already MET, SUPERSEDED or EXPIRED becomes WAITING again with
    the new content.
    """
    expectation = session.execute(
        select(StudyExpectation)
        .where(StudyExpectation.source == HL7, StudyExpectation.reference == reference)
        .with_for_update()
    ).scalar_one_or_none()
    if expectation is None:
        expectation = StudyExpectation(source=HL7, reference=reference, created_at=now)
        session.add(expectation)
    expectation.state = ExpectationState.WAITING
    expectation.study_instance_uid = study_instance_uid
    expectation.accession_number = accession_number
    expectation.expected_series = _series_json(expected_series)
    expectation.expected_instances = expected_instances
    expectation.complete_now = complete_now
    expectation.actor = actor
    expectation.remote_address = remote_address
    expectation.updated_at = now
    expectation.study_id = None
    expectation.met_at = None
    session.flush()
    return expectation
