"""Alerts for priority findings: a webhook receiver (FastAPI under uvicorn) that checks the
HMAC signature, and a local SMTP server (aiosmtpd) that requires STARTTLS and a login. Neither
may see the patient's name, ID or any UID."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from fastapi import FastAPI, Request, Response

from pacsai.config import EmailDestination, WebhookDestination
from pacsai.reporting.alerts import SIGNATURE_HEADER, send_email, send_webhook
from pacsai.reporting.delivery import DeliveryFailure
from tests.certificates import ServerCertificate, make_server_certificate
from tests.http_peers import serving
from tests.study_results import PATIENT_ID, PATIENT_NAME, STUDY_UID, make_study_result
from tests.support import free_port

SECRET = "webhook-shared-secret"
#: Nothing of these may appear in an alert.
IDENTIFYING = [PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, "1.2.826.0.1.3680043.8.498"]


def _anonymous(text: str) -> bool:
    # The link names the study in pacsai's console (behind its login), so it holds the UID.
    without_link = text.replace(f"/studies/{STUDY_UID}", "/studies/<link>")
    return not any(value in without_link for value in IDENTIFYING)


@dataclass
class _Receiver:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    deliveries: list[str] = field(default_factory=list)
    answer: int = 204
    url: str = ""


def _receiver_app(state: _Receiver) -> FastAPI:
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        body = await request.body()
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get(SIGNATURE_HEADER, ""), expected):
            return Response(status_code=401)
        state.raw.append(body)
        state.bodies.append(json.loads(body))
        state.deliveries.append(request.headers.get("x-pacsai-delivery", ""))
        return Response(status_code=state.answer)

    return app


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    state = _Receiver()
    with serving(_receiver_app(state)) as base:
        state.url = f"{base}/hook"
        yield state


def _webhook(url: str, **extra: Any) -> WebhookDestination:
    return WebhookDestination(
        kind="webhook",
        url=url,
        secret=SECRET,  # type: ignore[arg-type]  # pydantic turns it into a SecretStr
        timeout_seconds=10,
        **extra,
    )


def test_the_webhook_is_signed_and_anonymous(receiver: _Receiver) -> None:
    send_webhook(make_study_result(), _webhook(receiver.url))

    [body] = receiver.bodies
    assert _anonymous(receiver.raw[0].decode())
    assert body["event"] == "priority_finding"
    assert body["accession_number"] == "ACC-2024-0042"
    assert body["study_time"] == "2024-05-01T10:30:00"
    assert body["findings"] == [{"label": "liver", "volume_ml": 1523.44, "probability": None}]
    assert body["reasons"] == ["ct-abdomen: liver 1523.4 ml >= 1000 ml"]
    assert body["link"] == f"https://pacsai.example.org/studies/{STUDY_UID}"
    assert set(body) == {
        "event",
        "id",
        "accession_number",
        "study_time",
        "findings",
        "reasons",
        "link",
        "sent_at",
    }
    assert receiver.deliveries == ["J42-R1"]


def test_a_wrong_secret_is_refused_and_not_retried(receiver: _Receiver) -> None:
    destination = _webhook(receiver.url).model_copy(update={"secret": None})
    with pytest.raises(DeliveryFailure, match="HTTP 401") as caught:
        send_webhook(make_study_result(), destination)
    assert caught.value.permanent is True
    assert receiver.bodies == []


@pytest.mark.parametrize("body_format", ["slack", "teams"])
def test_slack_and_teams_bodies(receiver: _Receiver, body_format: str) -> None:
    send_webhook(make_study_result(), _webhook(receiver.url, format=body_format))
    [body] = receiver.bodies
    assert _anonymous(receiver.raw[0].decode())
    if body_format == "slack":
        assert body["text"].startswith("*Priority AI finding, accession ACC-2024-0042*")
        assert f"<https://pacsai.example.org/studies/{STUDY_UID}|Open study>" in body["text"]
    else:
        [attachment] = body["attachments"]
        assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
        card = attachment["content"]
        assert card["type"] == "AdaptiveCard"
        facts = {fact["title"]: fact["value"] for fact in card["body"][1]["facts"]}
        assert facts["Accession"] == "ACC-2024-0042"
        assert facts["Finding"] == "liver, 1523.4 mL"
        assert card["actions"][0]["url"].endswith(STUDY_UID)


@pytest.mark.parametrize(("status", "permanent"), [(404, True), (429, False), (502, False)])
def test_webhook_errors(receiver: _Receiver, status: int, permanent: bool) -> None:
    receiver.answer = status
    with pytest.raises(DeliveryFailure, match=f"HTTP {status}") as caught:
        send_webhook(make_study_result(), _webhook(receiver.url))
    assert caught.value.permanent is permanent


def test_a_receiver_that_is_down_is_retried() -> None:
    with pytest.raises(DeliveryFailure) as caught:
        send_webhook(make_study_result(), _webhook(f"http://127.0.0.1:{free_port()}/hook"))
    assert caught.value.permanent is False


def test_no_alert_for_a_result_that_is_not_priority(receiver: _Receiver) -> None:
    with pytest.raises(ValueError, match="not priority"):
        send_webhook(make_study_result(priority=False, priority_reasons=()), _webhook(receiver.url))
    assert receiver.bodies == []


# --- e-mail -------------------------------------------------------------------------------------

USER, PASSWORD = "pacsai", "smtp-password"


class _Mailbox:
    """aiosmtpd handler: keeps each message; refuses recipients at refused.example."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.endswith("@refused.example"):
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert session.ssl is not None, "the message arrived without STARTTLS"
        content = envelope.original_content or b""
        message = message_from_bytes(content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)  # a failure is answered 535


@dataclass
class _Smtp:
    mailbox: _Mailbox
    port: int
    certificate: ServerCertificate


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[_Smtp]:
    certificate = make_server_certificate(tmp_path / "smtp-tls")
    mailbox = _Mailbox()
    port = free_port()
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=certificate.server_context(),
        require_starttls=True,
        authenticator=_authenticate,
        auth_require_tls=True,
    )
    controller.start()
    yield _Smtp(mailbox, port, certificate)
    controller.stop()


def _email(smtp: _Smtp, **extra: Any) -> EmailDestination:
    settings: dict[str, Any] = {
        "kind": "email",
        "host": "127.0.0.1",
        "port": smtp.port,
        "ca": smtp.certificate.ca,
        "username": USER,
        "password": PASSWORD,
        "from_address": "pacsai@hospital.example",
        "to": ["radiologist@hospital.example", "oncall@hospital.example"],
        "timeout_seconds": 10,
    }
    return EmailDestination(**{**settings, **extra})


def test_the_email_goes_over_starttls_and_is_anonymous(smtp_server: _Smtp) -> None:
    refused = send_email(make_study_result(), _email(smtp_server))

    assert refused == {}
    [message] = smtp_server.mailbox.messages
    assert smtp_server.mailbox.envelopes == [
        ("pacsai@hospital.example", ["radiologist@hospital.example", "oncall@hospital.example"])
    ]
    assert message["Subject"] == "[pacsai] Priority AI finding, accession ACC-2024-0042"
    assert message["Message-ID"].startswith("<pacsai.J42-R1.")
    text = message.get_content()
    assert "Finding: liver, 1523.4 mL" in text
    assert "Study time: 2024-05-01 10:30" in text
    assert f"Study: https://pacsai.example.org/studies/{STUDY_UID}" in text
    assert _anonymous(message.as_string())


def test_a_wrong_password_is_permanent(smtp_server: _Smtp) -> None:
    with pytest.raises(DeliveryFailure, match="535") as caught:
        send_email(make_study_result(), _email(smtp_server, password="wrong"))
    assert caught.value.permanent is True
    assert smtp_server.mailbox.messages == []


def test_a_refused_recipient_among_others_is_returned(smtp_server: _Smtp) -> None:
    destination = _email(smtp_server, to=["radiologist@hospital.example", "x@refused.example"])
    refused = send_email(make_study_result(), destination)
    assert list(refused) == ["x@refused.example"]
    assert refused["x@refused.example"][0] == 550
    assert len(smtp_server.mailbox.messages) == 1


def test_every_recipient_refused_is_permanent(smtp_server: _Smtp) -> None:
    with pytest.raises(DeliveryFailure, match="refused every recipient") as caught:
        send_email(make_study_result(), _email(smtp_server, to=["x@refused.example"]))
    assert caught.value.permanent is True


def test_a_server_certificate_that_does_not_verify_is_retried(
    smtp_server: _Smtp, tmp_path: Path
) -> None:
    stranger = make_server_certificate(tmp_path / "other-ca")
    with pytest.raises(DeliveryFailure, match="TLS") as caught:
        send_email(make_study_result(), _email(smtp_server, ca=stranger.ca))
    assert caught.value.permanent is False
    assert smtp_server.mailbox.messages == []


def test_a_mail_server_that_is_down_is_retried(smtp_server: _Smtp) -> None:
    with pytest.raises(DeliveryFailure) as caught:
        send_email(make_study_result(), _email(smtp_server, port=free_port()))
    assert caught.value.permanent is False
