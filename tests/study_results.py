"""A factory of :class:`pacsai.reporting.study_result.StudyResult` values for the sender tests."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from pacsai.reporting.study_result import Finding, ModelRun, ResultObjectRef, StudyResult

#: Patient data of the study these results are about; none of it but the ID may leave pacsai,
#: and the ID only towards the RIS (HL7, FHIR), never in an alert.
PATIENT_ID = "PACSAI-TEST-001"
PATIENT_NAME = "Test^Patient"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"


def make_study_result(**overrides: Any) -> StudyResult:
    """A priority CT result with one present and one absent label, its SEG and SR."""
    result = StudyResult(
        key="J42-R1",
        study_instance_uid=STUDY_UID,
        accession_number="ACC-2024-0042",
        patient_id=PATIENT_ID,
        study_time=datetime(2024, 5, 1, 10, 30),
        models=(ModelRun("ct_abdomen_demo", "1.0.0+3f2a9c1d"),),
        findings=(
            Finding("liver", present=True, model="ct_abdomen_demo", volume_ml=1523.44),
            Finding("spleen", present=False, model="ct_abdomen_demo", volume_ml=0.0),
        ),
        priority=True,
        priority_reasons=("ct-abdomen: liver 1523.4 ml >= 1000 ml",),
        objects=(
            ResultObjectRef(
                "SEG", "1.2.826.0.1.3680043.8.498.2001", "1.2.826.0.1.3680043.8.498.2002"
            ),
            ResultObjectRef(
                "SR", "1.2.826.0.1.3680043.8.498.3001", "1.2.826.0.1.3680043.8.498.3002"
            ),
        ),
        link=f"https://pacsai.example.org/studies/{STUDY_UID}",
    )
    return replace(result, **overrides)
