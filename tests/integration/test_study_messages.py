"""Study results to the RIS (HL7 ORU over MLLP, a FHIR transaction) and alerts for priority
findings (a signed webhook, an e-mail) as durable deliveries of a real `pacsai serve`: sent once
per finished study, retried, dead-lettered, retried by an admin, audited (110106), visible in
the API, the CLI and the console; and delivered once after kill -9 of the node mid-send.

What "once" means, per kind, is what the receiver files: every attempt of a delivery sends the
same bytes under the same key (HL7 MSH-10, the FHIR resources' identifiers with conditional
create, ``X-Pacsai-Delivery``, the e-mail's Message-ID). A node killed after the receiver took
the message and before its answer was recorded sends it again after its restart: the wire
carries it twice, identical, and a receiver that honours the key files it once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom import dcmread

from pacsai.db import (
    AuditEvent,
    Database,
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    ResultObject,
    TokenRole,
    utcnow,
)
from pacsai.db.tokens import create_token
from pacsai.operations import Caller
from pacsai.operations.jobs import retry_job
from pacsai.phantom import write_phantom
from pacsai.scu import Target, push
from tests.integration.test_console import sign_in
from tests.result_peers import (
    FhirServer,
    Ris,
    Smtp,
    WebhookReceiver,
    destinations,
    fhir_server,
    ris,
    smtp_server,
    webhook_receiver,
)
from tests.support import REPO, ServeProcess, db_rows, free_port, wait_for

pytestmark = pytest.mark.slow

PUBLIC_URL = "https://pacsai.hospital.example"
ADMIN = Caller("cli:test-admin", None, {"command": "jobs retry"})
KINDS = {"ris": "hl7", "fhir": "fhir", "hook": "webhook", "mail": "email"}


@dataclass
class Receivers:
    ris: Ris
    fhir: FhirServer
    hook: WebhookReceiver
    smtp: Smtp

    def destinations(self, **retries: Any) -> dict[str, dict[str, Any]]:
        return destinations(
            ris_port=self.ris.port,
            fhir_url=self.fhir.url,
            webhook_url=self.hook.url,
            smtp=self.smtp,
            **retries,
        )

    def hold_answers(self) -> None:
        for holding in (self.ris, self.fhir.holding, self.hook.holding, self.smtp.mailbox):
            holding.hold_answers()

    def release(self) -> None:
        for holding in (self.ris, self.fhir.holding, self.hook.holding, self.smtp.mailbox):
            holding.release()

    def arrivals(self) -> dict[str, int]:
        return {
            "ris": len(self.ris.arrivals),
            "fhir": len(self.fhir.bodies),
            "hook": len(self.hook.bodies),
            "mail": len(self.smtp.mailbox.messages),
        }


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[Receivers]:
    with ExitStack() as stack:
        yield Receivers(
            ris=stack.enter_context(ris()),
            fhir=stack.enter_context(fhir_server()),
            hook=stack.enter_context(webhook_receiver()),
            smtp=stack.enter_context(smtp_server(tmp_path / "smtp-tls")),
        )


def _sections(
    send_to: dict[str, dict[str, Any]], *, model: str = "ct_abdomen_demo", **queue: Any
) -> dict[str, Any]:
    modality = "CT" if model == "ct_abdomen_demo" else "CR"
    route: dict[str, Any] = {
        "name": "ct-abdomen" if modality == "CT" else "chest",
        "when": {"Modality": modality},
        "model": model,
        "send_to": list(send_to),
    }
    if modality == "CT":
        route["series"] = {"min_instances": 10}
        route["priority"] = [{"finding": "liver"}]  # the phantom has a liver: it fires
    return {
        "queue": {"local_workers": 1, "poll_seconds": 0.2, **queue},
        "inference": {"models_dir": str(REPO / "models"), "device": "cpu", "warm_up": False},
        "destinations": send_to,
        "routes": [route],
        "api": {"public_url": PUBLIC_URL},
    }


def _push(port: int, paths: Any) -> None:
    assert push(paths, Target("PACSAI", "127.0.0.1", port)).failed == 0


def _deliveries(database: Database) -> dict[str, Delivery]:
    return {d.destination: d for d in db_rows(database, Delivery)}


def _all_in(database: Database, states: tuple[DeliveryStatus, ...], count: int) -> Any:
    def check() -> dict[str, Delivery] | None:
        found = _deliveries(database)
        if len(found) == count and all(d.status in states for d in found.values()):
            return found
        return None

    return check


def _exports(database: Database) -> list[dict[str, Any]]:
    return [
        {"outcome": e.outcome, **json.loads(e.detail or "{}")}
        for e in db_rows(database, AuditEvent, AuditEvent.event_id == "110106")
    ]


# --- a CT study, end to end ---------------------------------------------------------------------


def test_a_ct_study_reaches_the_ris_the_fhir_server_and_the_people_on_call(
    serve_process: Callable[..., ServeProcess], receivers: Receivers, tmp_path: Path
) -> None:
    study = write_phantom("ct", tmp_path / "ct", seed=51)
    header = dcmread(study.paths[0], stop_before_pixels=True)
    patient_name, patient_id = str(header.PatientName), str(header.PatientID)
    accession = str(header.AccessionNumber)
    sections = _sections(receivers.destinations())
    sections["api"] |= {"enabled": True, "port": free_port()}
    server = serve_process(**sections)
    database = Database(server.settings.database.url)
    try:
        _push(server.port, study.paths)
        sent = wait_for(_all_in(database, (DeliveryStatus.SENT,), 4), timeout=300)
        (job,) = db_rows(database, Job)
        objects = {o.kind: o for o in db_rows(database, ResultObject)}
        assert job.status is JobStatus.SUCCEEDED, job.reason
        assert {name: d.kind for name, d in sent.items()} == KINDS
        keys = {name: d.message_key for name, d in sent.items()}
        assert all(keys.values()) and len(set(keys.values())) == 4
        link = f"{PUBLIC_URL}/studies/{study.study_instance_uid}"

        # The RIS: one ORU^R01, acknowledged (AA) under its MSH-10, valid v2.5.1, no name.
        [message] = receivers.ris.arrivals
        assert list(receivers.ris.filed) == [keys["ris"]]
        parse_message(message, validation_level=VALIDATION_LEVEL.STRICT).validate()
        assert patient_name not in message and patient_name.split("^")[0] not in message
        segments = parse_message(message, find_groups=False).children
        [obr] = [s for s in segments if s.name == "OBR"]
        [pid] = [s for s in segments if s.name == "PID"]
        assert obr.obr_3.value == accession and pid.pid_3.cx_1.value == patient_id
        values = {
            (obx.obx_3.ce_1.value, obx.obx_4.value): (obx.obx_5.value, obx.obx_8.value)
            for obx in (s for s in segments if s.name == "OBX")
        }
        assert values[("liver", "1")][1] == "A" and float(values[("liver", "1")][0]) > 0
        assert values[("PRIORITY", "")][0] == "Y^Yes^HL70136"
        assert values[("SOPIUID", "SEG.1")][0] == objects["SEG"].sop_instance_uid
        assert values[("SOPIUID", "SR.1")][0] == objects["SR"].sop_instance_uid
        assert values[("LINK", "")][0].startswith(link)

        # The FHIR server: one valid transaction; one DiagnosticReport under the key.
        assert len(receivers.fhir.bodies) == 1
        [report] = receivers.fhir.of_type("DiagnosticReport")
        assert report["identifier"][0]["value"] == f"{keys['fhir']}/report"
        assert report["basedOn"][0]["identifier"]["value"] == accession
        assert report["presentedForm"][0]["url"] == link
        assert patient_name not in receivers.fhir.bodies[0].decode()

        # The alerts: a signed webhook and an e-mail, with no patient name or ID.
        assert receivers.hook.unsigned == 0 and receivers.hook.keys == [keys["hook"]]
        [alert] = receivers.hook.bodies
        assert alert["accession_number"] == accession and alert["link"] == link
        assert "liver" in [f["label"] for f in alert["findings"]]  # the findings present
        [mail] = receivers.smtp.mailbox.messages
        assert keys["mail"] in str(mail["Message-ID"])
        mail_text = f"{mail['Subject']}\n{mail.get_content()}"
        for text in (receivers.hook.raw[0].decode(), mail_text):
            assert accession in text and link in text
            assert patient_id not in text and patient_name not in text

        # Each attempt is audited as an Export (110106) with its kind and what was answered.
        exports = {e["destination"]: e for e in _exports(database)}
        assert {n: (e["kind"], e["status"], e["outcome"]) for n, e in exports.items()} == {
            name: (kind, "SENT", 0) for name, kind in KINDS.items()
        }
        assert exports["ris"]["ack"] == "AA" and exports["ris"]["control_id"] == keys["ris"]
        assert exports["hook"]["http_status"] == 204

        # Visible in the API (its kinds and keys), the console's job page and the CLI.
        with database.transaction() as session:
            _, token = create_token(session=session, name="it", role=TokenRole.ADMIN, now=utcnow())
        base = f"http://127.0.0.1:{server.settings.api.port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            answer = client.get(
                f"/api/v1/jobs/{job.id}", headers={"Authorization": f"Bearer {token}"}
            )
            assert answer.status_code == 200, answer.text
            shown = {d["destination"]: d for d in answer.json()["deliveries"]}
            assert {n: (d["kind"], d["message_key"], d["status"]) for n, d in shown.items()} == {
                name: (KINDS[name], keys[name], "SENT") for name in KINDS
            }
            assert shown["hook"]["priority"] is True and shown["hook"]["result_id"] is None
            assert sign_in(client, token, f"/jobs/{job.id}").status_code == 303
            page = client.get(f"/jobs/{job.id}")
            assert page.status_code == 200
            for name, key in keys.items():
                assert key in page.text and KINDS[name] in page.text
        listing = subprocess.run(
            [sys.executable, "-m", "pacsai.cli", "jobs", "list", "--config", str(server.config)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            cwd=server.workdir,
        ).stdout
        for name, kind in KINDS.items():
            assert f"{name} ({kind}):SENT" in listing, listing
    finally:
        database.dispose()


# --- NACK, refused connection, dead letter, admin retry ----------------------------------------


def test_a_nack_and_a_refused_connection_are_retried_then_failed_until_an_admin_retries(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    closed_port = free_port()  # nothing listens here until the admin's retry
    retries = {"max_attempts": 3, "backoff_seconds": 0.2, "timeout_seconds": 10}
    with ris() as nacking:
        nacking.answer = "AE"
        send_to = {
            "ris": {"kind": "hl7", "host": "127.0.0.1", "port": nacking.port, **retries},
            "ris2": {"kind": "hl7", "host": "127.0.0.1", "port": closed_port, **retries},
        }
        server = serve_process(**_sections(send_to, model="cxr_findings_demo"))
        database = Database(server.settings.database.url)
        try:
            _push(server.port, write_phantom("cr", tmp_path / "cr", seed=52).paths)
            failed = wait_for(_all_in(database, (DeliveryStatus.FAILED,), 2), timeout=300)
            assert failed["ris"].attempts == failed["ris2"].attempts == 3
            assert "answered AE" in (failed["ris"].last_error or "")
            assert "refused" in (failed["ris2"].last_error or "").lower()
            # Three attempts, each NACKed, each the same message under the same MSH-10.
            assert nacking.control_ids() == [failed["ris"].message_key] * 3
            assert nacking.filed == {}
            exports = [e for e in _exports(database) if e["destination"] == "ris"]
            assert [(e["status"], e["outcome"]) for e in exports] == [
                ("RETRYING", 8),
                ("RETRYING", 8),
                ("FAILED", 8),
            ]

            # The admin retries the job once the RIS takes it and the other one listens.
            nacking.answer = "AA"
            with ris(closed_port) as listening:
                (job,) = db_rows(database, Job)
                outcome = retry_job(database, ADMIN, job.id)
                assert outcome.message == "2 failed deliveries pending again"
                sent = wait_for(_all_in(database, (DeliveryStatus.SENT,), 2), timeout=120)
                assert list(nacking.filed) == [failed["ris"].message_key]
                assert listening.control_ids() == [failed["ris2"].message_key]
                assert sent["ris"].message_key == failed["ris"].message_key  # the same message
                assert len(nacking.arrivals) == 4
        finally:
            database.dispose()


# --- kill -9 while sending ----------------------------------------------------------------------


def test_every_kind_survives_kill_9_mid_send_and_is_filed_once(
    serve_process: Callable[..., ServeProcess], receivers: Receivers, tmp_path: Path
) -> None:
    """Every receiver has the message and holds its answer back when the node is killed. The
    restarted node takes its leases back at once, and sends each message again: the same bytes
    under the same key. Each receiver files it once (the FHIR server creates nothing twice)."""
    sections = _sections(receivers.destinations(backoff_seconds=1), delivery_workers=4)
    sections["queue"]["lease_seconds"] = 60
    study = write_phantom("ct", tmp_path / "ct", seed=53)
    receivers.hold_answers()
    first = serve_process(**sections)
    database = Database(first.settings.database.url)
    try:
        _push(first.port, study.paths)
        wait_for(lambda: all(n >= 1 for n in receivers.arrivals().values()), timeout=300)
        first.kill9()
        receivers.release()
        assert receivers.arrivals() == {"ris": 1, "fhir": 1, "hook": 1, "mail": 1}
        pending = _deliveries(database)
        assert all(d.status is DeliveryStatus.PENDING for d in pending.values())

        serve_process(**sections)
        sent = wait_for(_all_in(database, (DeliveryStatus.SENT,), 4), timeout=120)
        keys = {name: d.message_key for name, d in sent.items()}
        assert {name: d.attempts for name, d in sent.items()} == dict.fromkeys(KINDS, 1)

        # On the wire: each message twice, byte for byte the same, under the same key.
        assert receivers.arrivals() == {"ris": 2, "fhir": 2, "hook": 2, "mail": 2}
        first_oru, second_oru = receivers.ris.arrivals
        assert first_oru == second_oru
        assert receivers.ris.control_ids() == [keys["ris"]] * 2
        assert receivers.fhir.bodies[0] == receivers.fhir.bodies[1]
        assert receivers.hook.raw[0] == receivers.hook.raw[1]
        assert receivers.hook.keys == [keys["hook"]] * 2
        first_mail, second_mail = receivers.smtp.mailbox.messages
        assert first_mail.as_bytes() == second_mail.as_bytes()
        assert keys["mail"] in str(first_mail["Message-ID"])

        # Filed once: by MSH-10, by conditional create, by X-Pacsai-Delivery, by Message-ID.
        assert list(receivers.ris.filed) == [keys["ris"]]
        assert len(receivers.fhir.of_type("DiagnosticReport")) == 1
        assert len(receivers.fhir.of_type("ImagingStudy")) == 1
        assert list(receivers.hook.acted) == [keys["hook"]]
        assert len(receivers.smtp.mailbox.inbox) == 1

        # One recorded attempt per delivery: the one after the restart, saying it repeats.
        exports = {e["destination"]: e for e in _exports(database)}
        assert sorted(exports) == sorted(KINDS) and len(_exports(database)) == 4
        for export in exports.values():
            assert export["status"] == "SENT" and "same key" in export["interrupted"]
        assert exports["fhir"]["answer"].startswith("transaction-response: 0 of ")
    finally:
        database.dispose()
