"""A study's AI results to a FHIR server as one transaction Bundle.

The Bundle (``type: transaction``) creates, each only if it does not exist yet (``ifNoneExist``,
so that a retry after a lost answer or a crash creates nothing twice):

- the **ImagingStudy** (identifier ``urn:dicom:uid`` = ``urn:oid:<Study Instance UID>``), which
  the server usually has already and then only matches;
- one **Observation** per finding: ``valueQuantity`` in mL (volume) or % (probability),
  ``interpretation`` POS (present) or NEG (absent), the model and version as ``method`` and
  ``device``, ``derivedFrom`` the ImagingStudy; one more Observation for the priority flag
  (``valueBoolean``, interpretation AA when priority, the reasons as notes);
- the **DiagnosticReport** (LOINC 18748-4 Diagnostic imaging study, status ``preliminary``: not
  verified by a radiologist), identified by :attr:`StudyResult.key`, also by the SR's SOP
  Instance UID, based on the order with the accession number (identifier type ACSN), with
  ``imagingStudy``, ``result``, the SEG and SR UIDs in ``conclusion`` and the link to the study as
  ``presentedForm``.

Every resource is validated with ``fhir.resources`` before anything is sent. fhir.resources 8
(pydantic 2) ships FHIR R5 and R4B (4.3.0) models and no 4.0.1 ones; R4B is the R4 technical
correction, and every element used here is the same in R4 (4.0.1), so an R4 server takes the
Bundle as it is.

HTTP: 200 with a ``transaction-response`` Bundle is sent; 4xx other than 408 and 429 is
permanent (the server refused what it was given); 408, 429, 5xx and a failed connection are
retried.
"""

from __future__ import annotations

import ssl
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from pacsai.config import FhirDestination
from pacsai.reporting.delivery import DeliveryFailure
from pacsai.reporting.delivery import tls_context as tls_context
from pacsai.reporting.study_result import Finding, StudyResult

__all__ = ["FHIR_VERSION", "build_transaction", "send_transaction"]

FHIR_VERSION = "4.3.0"  # R4B, see the module docstring
DICOM_UID_SYSTEM = "urn:dicom:uid"
FINDING_SYSTEM = "urn:pacsai:finding"
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
_NAMESPACE = uuid.UUID("7d0c7f5e-3a8b-4f4e-9a51-2f1e6c1a9b10")  # fullUrls derived from the key


def _full_url(result: StudyResult, part: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{result.key}/{part}')}"


def _date_time(moment: datetime) -> str:
    """FHIR dateTime: with a time only when the time zone is known (a naive DICOM study time
    gives its date alone, as FHIR requires)."""
    if moment.tzinfo is None:
        return moment.date().isoformat()
    return moment.isoformat(timespec="seconds")


def _patient(result: StudyResult, destination: FhirDestination) -> dict[str, Any]:
    if not result.patient_id:
        return {"display": "patient ID not known"}
    identifier: dict[str, Any] = {"value": result.patient_id}
    if destination.patient_identifier_system:
        identifier["system"] = destination.patient_identifier_system
    return {"type": "Patient", "identifier": identifier}


def _interpretation(code: str, display: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": _INTERPRETATION, "code": code, "display": display}]}]


def _conditional(
    destination: FhirDestination, result: StudyResult, part: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """The identifier of a resource of this result, and its conditional-create request."""
    value = f"{result.key}/{part}"
    identifier = {"system": destination.identifier_system, "value": value}
    return identifier, {"ifNoneExist": f"identifier={destination.identifier_system}|{value}"}


def _finding(
    result: StudyResult,
    destination: FhirDestination,
    finding: Finding,
    index: int,
    common: dict[str, Any],
) -> dict[str, Any]:
    run = result.model(finding.model)
    if finding.volume_ml is not None:
        quantity = {"value": round(finding.volume_ml, 1), "unit": "mL", "code": "mL"}
    else:
        assert finding.probability is not None  # StudyResult checks that one is given
        quantity = {"value": round(finding.probability * 100, 1), "unit": "%", "code": "%"}
    identifier, request = _conditional(destination, result, f"finding-{index}")
    return {
        "fullUrl": _full_url(result, f"finding-{index}"),
        "resource": {
            "resourceType": "Observation",
            "identifier": [identifier],
            "code": {
                "coding": [{"system": FINDING_SYSTEM, "code": finding.label}],
                "text": finding.label,
            },
            "valueQuantity": {**quantity, "system": UCUM},
            "interpretation": _interpretation(
                *(("POS", "Positive") if finding.present else ("NEG", "Negative"))
            ),
            "method": {"text": f"{run.name} {run.version}"},
            "device": {"display": f"{run.name} {run.version}"},
            **common,
        },
        "request": {"method": "POST", "url": "Observation", **request},
    }


def _priority(
    result: StudyResult, destination: FhirDestination, common: dict[str, Any]
) -> dict[str, Any]:
    identifier, request = _conditional(destination, result, "priority")
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [identifier],
        "code": {
            "coding": [{"system": FINDING_SYSTEM, "code": "priority"}],
            "text": "AI priority finding",
        },
        "valueBoolean": result.priority,
        "interpretation": _interpretation(
            *(("AA", "Critical abnormal") if result.priority else ("N", "Normal"))
        ),
        **common,
    }
    if result.priority_reasons:
        resource["note"] = [{"text": reason} for reason in result.priority_reasons]
    return {
        "fullUrl": _full_url(result, "priority"),
        "resource": resource,
        "request": {"method": "POST", "url": "Observation", **request},
    }


def _conclusion(result: StudyResult) -> str:
    lines = ["AI result, not verified by a radiologist."]
    lines += [f"Model: {run.name} {run.version}" for run in result.models]
    for finding in result.findings:
        value = (
            f"{finding.volume_ml:.1f} mL"
            if finding.volume_ml is not None
            else f"probability {(finding.probability or 0) * 100:.1f}%"
        )
        lines.append(f"{finding.label}: {'present' if finding.present else 'absent'}, {value}")
    if result.priority:
        lines.append("PRIORITY: " + "; ".join(result.priority_reasons))
    for obj in result.objects:
        lines.append(
            f"{obj.kind}: series {obj.series_instance_uid}, instance {obj.sop_instance_uid}"
        )
    return "\n".join(lines)


def build_transaction(
    result: StudyResult, destination: FhirDestination, *, now: datetime | None = None
) -> Bundle:
    """The transaction Bundle of ``result``, validated by the FHIR R4B models.

    Raises
    ------
    pydantic.ValidationError
        If a resource does not validate.
    """
    now = now or datetime.now(UTC)
    subject = _patient(result, destination)
    study_identifier = {
        "system": DICOM_UID_SYSTEM,
        "value": f"urn:oid:{result.study_instance_uid}",
    }
    study_url = _full_url(result, "study")
    imaging_study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [study_identifier],
        "status": "available",
        "subject": subject,
    }
    if result.study_time is not None:
        imaging_study["started"] = _date_time(result.study_time)
    common: dict[str, Any] = {
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                        "display": "Imaging",
                    }
                ]
            }
        ],
        "subject": subject,
        "issued": now.astimezone(UTC).isoformat(timespec="seconds"),
        "derivedFrom": [{"reference": study_url}],
    }
    if result.study_time is not None:
        common["effectiveDateTime"] = _date_time(result.study_time)
    observations = [
        _finding(result, destination, finding, index, common)
        for index, finding in enumerate(result.findings, start=1)
    ]
    observations.append(_priority(result, destination, common))

    identifier, request = _conditional(destination, result, "report")
    identifiers = [identifier] + [
        {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{obj.sop_instance_uid}"}
        for obj in result.objects_of("SR")
    ]
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": identifiers,
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]
        },
        "subject": subject,
        "issued": common["issued"],
        "performer": [{"display": f"{run.name} {run.version}"} for run in result.models],
        "result": [{"reference": entry["fullUrl"]} for entry in observations],
        "imagingStudy": [{"reference": study_url}],
        "conclusion": _conclusion(result),
    }
    if result.study_time is not None:
        report["effectiveDateTime"] = _date_time(result.study_time)
    if result.accession_number:
        accession: dict[str, Any] = {
            "type": {"coding": [{"system": _IDENTIFIER_TYPE, "code": "ACSN"}]},
            "value": result.accession_number,
        }
        if destination.accession_identifier_system:
            accession["system"] = destination.accession_identifier_system
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": accession}]
    if result.link:
        report["presentedForm"] = [
            {"contentType": "text/html", "url": result.link, "title": "Study in pacsai"}
        ]

    entries = [
        {
            "fullUrl": study_url,
            "resource": imaging_study,
            "request": {
                "method": "POST",
                "url": "ImagingStudy",
                "ifNoneExist": f"identifier={DICOM_UID_SYSTEM}|{study_identifier['value']}",
            },
        },
        *observations,
        {
            "fullUrl": _full_url(result, "report"),
            "resource": report,
            "request": {"method": "POST", "url": "DiagnosticReport", **request},
        },
    ]
    return Bundle.model_validate(
        {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    )


def send_transaction(
    result: StudyResult, destination: FhirDestination, *, now: datetime | None = None
) -> dict[str, Any]:
    """POST ``result`` as a transaction to ``destination.base_url``; return the server's
    transaction-response Bundle (as JSON).

    Raises
    ------
    DeliveryFailure
        ``permanent`` for resources that do not validate, TLS files that cannot be loaded and
        an HTTP 4xx other than 408/429; retryable for a failed connection, 408, 429, 5xx and an
        answer that is not a transaction-response.
    """
    where = f"FHIR {destination.base_url}"
    try:
        bundle = build_transaction(result, destination, now=now)
    except ValidationError as exc:
        raise DeliveryFailure(
            f"{where}: the resources do not validate: {exc}", permanent=True
        ) from exc
    headers = {
        "Content-Type": "application/fhir+json",
        "Accept": "application/fhir+json",
    }
    if destination.token is not None:
        headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
    verify: ssl.SSLContext | bool = tls_context(destination.tls) or True
    try:
        response = httpx.post(
            destination.base_url,
            content=bundle.model_dump_json(exclude_none=True).encode("utf-8"),
            headers=headers,
            timeout=destination.timeout_seconds,
            verify=verify,
        )
    except httpx.HTTPError as exc:
        raise DeliveryFailure(f"{where}: {exc}", permanent=False) from exc
    if response.status_code >= 300:
        transient = response.status_code >= 500 or response.status_code in (408, 429)
        raise DeliveryFailure(
            f"{where} answered HTTP {response.status_code}: {response.text[:300]}",
            permanent=not transient,
        )
    try:
        answer = response.json()
    except ValueError as exc:
        raise DeliveryFailure(
            f"{where} answered something that is not JSON", permanent=False
        ) from exc
    if not isinstance(answer, dict) or answer.get("type") != "transaction-response":
        raise DeliveryFailure(
            f"{where} answered HTTP {response.status_code} without a transaction-response Bundle",
            permanent=False,
        )
    return answer
