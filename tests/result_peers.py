"""Receivers of study results and alerts for the tests that run a whole node: a RIS (hl7apy's own
MLLP server), a FHIR server stand-in (FastAPI validating with fhir.resources, honouring
conditional creates), a webhook receiver checking the HMAC signature, and a mail server
(aiosmtpd, STARTTLS and a login required).

Each records every arrival as it came over the wire, before it answers, and what it *files*:
a receiver acts on a message once, whatever number of times it arrives under the same key (the
RIS by MSH-10, the FHIR server by the resources' identifiers, the webhook receiver by
``X-Pacsai-Delivery``, the mailbox by Message-ID). ``hold`` makes a receiver keep its answer
back (until :meth:`release`), so that a test can kill the node while it waits for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fhir.resources.R4B.bundle import Bundle
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message
from pydantic import ValidationError

from pacsai.reporting.alerts import DELIVERY_HEADER, SIGNATURE_HEADER
from tests.certificates import ServerCertificate, make_server_certificate
from tests.http_peers import serving
from tests.support import free_port

HOLD_SECONDS = 120.0  # a held answer goes out after this long at the latest
WEBHOOK_SECRET = "webhook-shared-secret"
FHIR_TOKEN = "fhir-test-token"
SMTP_USER, SMTP_PASSWORD = "pacsai", "smtp-password"
FHIR_JSON = "application/fhir+json"


class _Holding:
    """Arrivals, and an answer that can be held back."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hold = False
        self._released = threading.Event()

    def hold_answers(self) -> None:
        """From now on, answer only once released."""
        self._released.clear()
        self.hold = True

    def release(self) -> None:
        """Answer what is held, and answer at once from now on."""
        self.hold = False
        self._released.set()

    def wait_if_held(self) -> None:
        if self.hold:
            self._released.wait(HOLD_SECONDS)


# --- HL7 v2 over MLLP -----------------------------------------------------------------------


def _ack(incoming: str, code: str) -> Message:
    request = parse_message(incoming, find_groups=False)
    ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    ack.msh.msh_3 = "RIS"
    ack.msh.msh_5 = request.msh.msh_3.value
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = f"ACK-{request.msh.msh_10.value}"
    ack.msh.msh_11 = "P"
    ack.msh.msh_12 = "2.5.1"
    ack.msa.msa_1 = code
    ack.msa.msa_2 = request.msh.msh_10.value
    if code != "AA":
        ack.msa.msa_3 = "the RIS does not know this order yet"
    return ack


class Ris(_Holding):
    """hl7apy's MLLPServer in a thread: ``answer`` is the MSA-1 code it replies with. It files
    each MSH-10 once, as a RIS engine's duplicate detection does."""

    def __init__(self, port: int = 0) -> None:
        super().__init__()
        self.arrivals: list[str] = []  # every message, as received
        self.filed: dict[str, str] = {}  # MSH-10 -> the message, filed once
        self.answer = "AA"
        ris = self

        class Handler(AbstractHandler):  # type: ignore[misc]
            def reply(self) -> str:
                message = self.incoming_message
                control_id = parse_message(message, find_groups=False).msh.msh_10.value
                with ris.lock:
                    ris.arrivals.append(message)
                    code = ris.answer
                    if code == "AA":
                        ris.filed.setdefault(control_id, message)
                ris.wait_if_held()
                framed: str = _ack(message, code).to_mllp()
                return framed

        self.server = MLLPServer("127.0.0.1", port, {"ORU^R01^ORU_R01": (Handler,)}, timeout=30)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def control_ids(self) -> list[str]:
        """MSH-10 of every arrival, in order."""
        with self.lock:
            messages = list(self.arrivals)
        return [parse_message(m, find_groups=False).msh.msh_10.value for m in messages]

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


@contextmanager
def ris(port: int = 0) -> Iterator[Ris]:
    server = Ris(port)
    try:
        yield server
    finally:
        server.stop()


# --- FHIR -----------------------------------------------------------------------------------


@dataclass
class FhirServer:
    """What the stand-in received (``bodies``) and holds (``resources``, by ifNoneExist)."""

    bodies: list[bytes] = field(default_factory=list)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    holding: _Holding = field(default_factory=_Holding)
    url: str = ""

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return [r for r in self.resources.values() if r["resourceType"] == resource_type]


def _outcome(status: int, text: str) -> JSONResponse:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": text}],
    }
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def _fhir_app(state: FhirServer) -> FastAPI:
    app = FastAPI()

    @app.post("/fhir")
    async def transaction(request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {FHIR_TOKEN}":
            return _outcome(401, "no or wrong token")
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
            location = f"{kind}/{len(state.resources)}"
            answers.append({"response": {"status": "201 Created", "location": location}})
        await asyncio.to_thread(state.holding.wait_if_held)
        answer = {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        return JSONResponse(answer, media_type=FHIR_JSON)

    return app


@contextmanager
def fhir_server() -> Iterator[FhirServer]:
    state = FhirServer()
    with serving(_fhir_app(state)) as base:
        state.url = f"{base}/fhir"
        try:
            yield state
        finally:
            state.holding.release()


# --- webhook --------------------------------------------------------------------------------


@dataclass
class WebhookReceiver:
    """Signed requests received (``bodies``, ``keys``) and acted on once per key (``acted``)."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    acted: dict[str, dict[str, Any]] = field(default_factory=dict)
    unsigned: int = 0
    holding: _Holding = field(default_factory=_Holding)
    url: str = ""


def _webhook_app(state: WebhookReceiver) -> FastAPI:
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        body = await request.body()
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get(SIGNATURE_HEADER, ""), expected):
            state.unsigned += 1
            return Response(status_code=401)
        key = request.headers.get(DELIVERY_HEADER, "")
        document = json.loads(body)
        state.raw.append(body)
        state.bodies.append(document)
        state.keys.append(key)
        state.acted.setdefault(key, document)
        await asyncio.to_thread(state.holding.wait_if_held)
        return Response(status_code=204)

    return app


@contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    state = WebhookReceiver()
    with serving(_webhook_app(state)) as base:
        state.url = f"{base}/hook"
        try:
            yield state
        finally:
            state.holding.release()


# --- e-mail ---------------------------------------------------------------------------------


class Mailbox(_Holding):
    """aiosmtpd handler: keeps every message received (``messages``) and each Message-ID once
    (``inbox``), as a mail client shows a repeat once."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[EmailMessage] = []
        self.inbox: dict[str, EmailMessage] = {}

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert session.ssl is not None, "the message arrived without STARTTLS"
        message = message_from_bytes(envelope.original_content or b"", policy=policy.default)
        assert isinstance(message, EmailMessage)
        with self.lock:
            self.messages.append(message)
            self.inbox.setdefault(str(message["Message-ID"]), message)
        await asyncio.to_thread(self.wait_if_held)
        return "250 Message accepted for delivery"


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        SMTP_USER.encode(),
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)


@dataclass
class Smtp:
    mailbox: Mailbox
    port: int
    certificate: ServerCertificate


@contextmanager
def smtp_server(directory: Path) -> Iterator[Smtp]:
    certificate = make_server_certificate(directory)
    mailbox = Mailbox()
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
    try:
        yield Smtp(mailbox, port, certificate)
    finally:
        mailbox.release()
        controller.stop()


# --- the node's destinations for them -------------------------------------------------------


def destinations(
    *,
    ris_port: int,
    fhir_url: str,
    webhook_url: str,
    smtp: Smtp,
    **retries: Any,
) -> dict[str, dict[str, Any]]:
    """``destinations:`` naming the four receivers (``ris``, ``fhir``, ``hook``, ``mail``)."""
    return {
        "ris": {
            "kind": "hl7",
            "host": "127.0.0.1",
            "port": ris_port,
            "receiving_application": "RIS",
            "timeout_seconds": 10,
            **retries,
        },
        "fhir": {
            "kind": "fhir",
            "base_url": fhir_url,
            "token": FHIR_TOKEN,
            "timeout_seconds": 10,
            **retries,
        },
        "hook": {
            "kind": "webhook",
            "url": webhook_url,
            "secret": WEBHOOK_SECRET,
            "timeout_seconds": 10,
            **retries,
        },
        "mail": {
            "kind": "email",
            "host": "127.0.0.1",
            "port": smtp.port,
            "ca": str(smtp.certificate.ca),
            "username": SMTP_USER,
            "password": SMTP_PASSWORD,
            "from_address": "pacsai@hospital.example",
            "to": ["radiologist@hospital.example"],
            "timeout_seconds": 10,
            **retries,
        },
    }
