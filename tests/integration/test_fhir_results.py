"""Results to a FHIR server as a transaction Bundle, against a FHIR server stand-in: a FastAPI
app served by uvicorn that validates what it gets with fhir.resources and honours
``ifNoneExist`` the way a FHIR server does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from pacsai.config import FhirDestination
from pacsai.reporting.delivery import DeliveryFailure
from pacsai.reporting.fhir import send_transaction
from tests.http_peers import serving
from tests.study_results import PATIENT_ID, PATIENT_NAME, STUDY_UID, make_study_result
from tests.support import free_port

TOKEN = "fhir-test-token"
FHIR_JSON = "application/fhir+json"


@dataclass
class _FhirServer:
    """What the stand-in received and holds; ``fail_with`` makes it answer that HTTP status."""

    bodies: list[bytes] = field(default_factory=list)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # by ifNoneExist
    fail_with: int | None = None
    url: str = ""

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return [r for r in self.resources.values() if r["resourceType"] == resource_type]


def _outcome(status: int, text: str) -> JSONResponse:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": text}],
    }
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def _app(state: _FhirServer) -> FastAPI:
    app = FastAPI()

    @app.post("/fhir")
    async def transaction(request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return _outcome(401, "no or wrong token")
        if state.fail_with is not None:
            return _outcome(state.fail_with, "the stand-in was told to fail")
        if request.headers.get("content-type") != FHIR_JSON:
            return _outcome(415, "not application/fhir+json")
        body = await request.body()
        state.bodies.append(body)
        try:
            bundle = Bundle.model_validate_json(body)
        except ValidationError as exc:
            return _outcome(400, str(exc))
        if bundle.type != "transaction":
            return _outcome(400, f"a {bundle.type} Bundle is not a transaction")
        answers = []
        for index, entry in enumerate(json.loads(body)["entry"]):
            key = entry["request"].get("ifNoneExist") or f"{entry['fullUrl']}/{index}"
            if key in state.resources:
                answers.append({"response": {"status": "200 OK"}})
                continue
            state.resources[key] = entry["resource"]
            kind = entry["resource"]["resourceType"]
            answers.append(
                {
                    "response": {
                        "status": "201 Created",
                        "location": f"{kind}/{len(state.resources)}",
                    }
                }
            )
        answer = {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        Bundle.model_validate(answer)
        return JSONResponse(answer, media_type=FHIR_JSON)

    return app


@pytest.fixture
def fhir_server() -> Iterator[_FhirServer]:
    state = _FhirServer()
    with serving(_app(state)) as base:
        state.url = f"{base}/fhir"
        yield state


def _destination(url: str) -> FhirDestination:
    return FhirDestination(
        kind="fhir",
        base_url=url,
        token=TOKEN,  # type: ignore[arg-type]  # pydantic turns it into a SecretStr
        patient_identifier_system="urn:oid:1.2.3.4.5.6",
        accession_identifier_system="urn:oid:1.2.3.4.5.7",
        timeout_seconds=10,
    )


def test_a_valid_transaction_reaches_the_server(fhir_server: _FhirServer) -> None:
    answer = send_transaction(make_study_result(), _destination(fhir_server.url))

    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created"] * 5
    body = fhir_server.bodies[0].decode()
    assert PATIENT_NAME not in body and PATIENT_NAME.split("^")[0] not in body

    [study] = fhir_server.of_type("ImagingStudy")
    assert study["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}]
    assert study["subject"]["identifier"] == {"system": "urn:oid:1.2.3.4.5.6", "value": PATIENT_ID}
    [report] = fhir_server.of_type("DiagnosticReport")
    assert report["status"] == "preliminary"
    assert report["code"]["coding"][0]["code"] == "18748-4"
    assert report["basedOn"][0]["identifier"]["value"] == "ACC-2024-0042"
    assert report["basedOn"][0]["identifier"]["type"]["coding"][0]["code"] == "ACSN"
    assert {"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.3002"} in (
        report["identifier"]
    )
    assert report["presentedForm"][0]["url"].endswith(STUDY_UID)
    entries = json.loads(fhir_server.bodies[0])["entry"]
    urls = {entry["fullUrl"]: entry["resource"]["resourceType"] for entry in entries}
    assert urls[report["imagingStudy"][0]["reference"]] == "ImagingStudy"
    assert sorted(urls[r["reference"]] for r in report["result"]) == ["Observation"] * 3

    observations = {o["code"]["text"]: o for o in fhir_server.of_type("Observation")}
    liver = observations["liver"]
    assert liver["valueQuantity"] == {
        "value": 1523.4,
        "unit": "mL",
        "system": "http://unitsofmeasure.org",
        "code": "mL",
    }
    assert liver["interpretation"][0]["coding"][0]["code"] == "POS"
    assert liver["method"]["text"] == "ct_abdomen_demo 1.0.0+3f2a9c1d"
    assert observations["spleen"]["interpretation"][0]["coding"][0]["code"] == "NEG"
    priority = observations["AI priority finding"]
    assert priority["valueBoolean"] is True
    assert priority["note"] == [{"text": "ct-abdomen: liver 1523.4 ml >= 1000 ml"}]


def test_sending_again_creates_nothing_twice(fhir_server: _FhirServer) -> None:
    """A retry after a lost answer (or a crash) sends the same conditional creates."""
    destination = _destination(fhir_server.url)
    send_transaction(make_study_result(), destination)
    again = send_transaction(make_study_result(), destination)
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK"] * 5
    assert len(fhir_server.of_type("DiagnosticReport")) == 1
    assert len(fhir_server.of_type("Observation")) == 3


def test_a_study_without_patient_id_or_probability_findings_validates(
    fhir_server: _FhirServer,
) -> None:
    from pacsai.reporting.study_result import Finding, ModelRun

    result = make_study_result(
        key="J43-R1",
        patient_id=None,
        accession_number=None,
        study_time=None,
        models=(ModelRun("cxr_findings_demo", "1.0.0"),),
        findings=(Finding("nodule", present=True, model="cxr_findings_demo", probability=0.93),),
        link=None,
    )
    send_transaction(result, _destination(fhir_server.url))
    [nodule, _priority] = fhir_server.of_type("Observation")
    assert nodule["valueQuantity"]["value"] == 93.0
    assert nodule["valueQuantity"]["unit"] == "%"


@pytest.mark.parametrize(
    ("status", "permanent"), [(400, True), (422, True), (429, False), (503, False)]
)
def test_an_http_error_fails_the_attempt(
    fhir_server: _FhirServer, status: int, permanent: bool
) -> None:
    fhir_server.fail_with = status
    with pytest.raises(DeliveryFailure, match=f"HTTP {status}") as caught:
        send_transaction(make_study_result(), _destination(fhir_server.url))
    assert caught.value.permanent is permanent


def test_a_wrong_token_is_permanent(fhir_server: _FhirServer) -> None:
    destination = _destination(fhir_server.url).model_copy(update={"token": None})
    with pytest.raises(DeliveryFailure, match="HTTP 401") as caught:
        send_transaction(make_study_result(), destination)
    assert caught.value.permanent is True


def test_a_server_that_is_down_is_retried() -> None:
    with pytest.raises(DeliveryFailure) as caught:
        send_transaction(make_study_result(), _destination(f"http://127.0.0.1:{free_port()}/fhir"))
    assert caught.value.permanent is False
