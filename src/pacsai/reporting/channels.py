"""The seam for messages about a finished study: one :class:`MessageChannel` per destination kind.

A delivery of kind ``hl7``, ``fhir``, ``webhook`` or ``email`` carries one
:class:`~pacsai.reporting.study_result.StudyResult`, stored when its job finished. Each attempt
hands it, under the delivery's message key, to the channel of its kind, which builds the
message, sends it and answers with a :class:`MessageReceipt`, or raises
:class:`~pacsai.reporting.delivery.DeliveryFailure` saying whether another attempt could pass.
The delivery workers (:mod:`pacsai.jobs.deliveries`) know nothing more of a kind than its entry
in :data:`CHANNELS`.

What a receiver sees when an attempt is repeated (a lost answer, a retry, a node killed while
sending) is the same message under the same key, byte for byte: every attempt builds it from
the same stored result with the delivery's creation time as its time.

=========  ====================================================  ===============================
kind       the key is                                            a repeat is recognised by
=========  ====================================================  ===============================
hl7        MSH-10 (message control ID)                           MSH-10, as RIS engines do
fhir       the identifiers of the DiagnosticReport/Observations  the server: conditional create
webhook    the ``X-Pacsai-Delivery`` header                      the receiver, by that header
email      the ``Message-ID`` header                             mail clients, by Message-ID
=========  ====================================================  ===============================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Protocol

from pacsai.config import EmailDestination, FhirDestination, Hl7Destination, WebhookDestination
from pacsai.reporting.alerts import message_id, send_email, send_webhook
from pacsai.reporting.delivery import DeliveryFailure
from pacsai.reporting.fhir import send_transaction
from pacsai.reporting.hl7 import send_oru
from pacsai.reporting.study_result import StudyResult

__all__ = [
    "ALERT_KINDS",
    "CHANNELS",
    "RESULT_KINDS",
    "EmailChannel",
    "FhirChannel",
    "Hl7Channel",
    "MessageChannel",
    "MessageReceipt",
    "WebhookChannel",
]


@dataclass(frozen=True)
class MessageReceipt:
    """What the receiver answered to a message it took: ``summary`` in words, ``detail`` for
    the audit trail (no patient data)."""

    summary: str
    detail: dict[str, Any] = field(default_factory=dict)


class MessageChannel(Protocol):
    """Sends a study result to destinations of one kind.

    ``alert``: the channel sends only results that are priority (a route's ``priority:``
    rule holds); the others send every finished study's result.
    """

    kind: ClassVar[str]
    alert: ClassVar[bool]

    def send(self, result: StudyResult, destination: Any, *, now: datetime) -> MessageReceipt:
        """Send ``result`` (``now``: the message's own time); the receiver's answer.

        Raises
        ------
        DeliveryFailure
            ``permanent`` when another attempt cannot pass (the receiver refused the message,
            or it cannot be built), retryable otherwise.
        """
        ...


def _expect(destination: Any, kind: type[Any]) -> None:
    if not isinstance(destination, kind):
        raise DeliveryFailure(
            f"the destination is a {type(destination).__name__}, not a {kind.__name__}",
            permanent=True,
        )


class Hl7Channel:
    """HL7 v2.5.1 ORU^R01 over MLLP (:func:`pacsai.reporting.hl7.send_oru`)."""

    kind: ClassVar[str] = "hl7"
    alert: ClassVar[bool] = False

    def send(self, result: StudyResult, destination: Any, *, now: datetime) -> MessageReceipt:
        _expect(destination, Hl7Destination)
        ack = send_oru(result, destination, now=now)
        return MessageReceipt(
            f"ACK {ack.code} for MSH-10 {ack.control_id}",
            {"ack": ack.code, "control_id": ack.control_id, "ack_text": ack.text or None},
        )


class FhirChannel:
    """A FHIR transaction Bundle (:func:`pacsai.reporting.fhir.send_transaction`)."""

    kind: ClassVar[str] = "fhir"
    alert: ClassVar[bool] = False

    def send(self, result: StudyResult, destination: Any, *, now: datetime) -> MessageReceipt:
        _expect(destination, FhirDestination)
        answer = send_transaction(result, destination, now=now)
        entries = [
            {
                "status": str(entry.get("response", {}).get("status", "")),
                "location": entry.get("response", {}).get("location"),
            }
            for entry in answer.get("entry", [])
            if isinstance(entry, dict)
        ]
        created = sum(1 for e in entries if e["status"].startswith("201"))
        return MessageReceipt(
            f"transaction-response: {created} of {len(entries)} resources created",
            {"responses": entries},
        )


class WebhookChannel:
    """An alert POSTed to a webhook (:func:`pacsai.reporting.alerts.send_webhook`)."""

    kind: ClassVar[str] = "webhook"
    alert: ClassVar[bool] = True

    def send(self, result: StudyResult, destination: Any, *, now: datetime) -> MessageReceipt:
        _expect(destination, WebhookDestination)
        status = send_webhook(result, destination, now=now)
        return MessageReceipt(f"HTTP {status}", {"http_status": status})


class EmailChannel:
    """An alert by e-mail (:func:`pacsai.reporting.alerts.send_email`)."""

    kind: ClassVar[str] = "email"
    alert: ClassVar[bool] = True

    def send(self, result: StudyResult, destination: Any, *, now: datetime) -> MessageReceipt:
        _expect(destination, EmailDestination)
        refused = send_email(result, destination, now=now)
        detail: dict[str, Any] = {
            "message_id": message_id(result.key, destination.from_address),
            "recipients": len(destination.to),
        }
        if refused:
            # Not retried: those who took it would get it again. Said in the audit trail.
            detail["refused"] = {who: code for who, (code, _) in refused.items()}
        return MessageReceipt(
            f"accepted for {len(destination.to) - len(refused)} of {len(destination.to)} "
            "recipients",
            detail,
        )


#: The channel of each destination kind other than ``dicom``.
CHANNELS: Mapping[str, MessageChannel] = {
    channel.kind: channel
    for channel in (Hl7Channel(), FhirChannel(), WebhookChannel(), EmailChannel())
}

#: Kinds that get every finished study's result, and kinds that get alerts only.
RESULT_KINDS = frozenset(kind for kind, channel in CHANNELS.items() if not channel.alert)
ALERT_KINDS = frozenset(kind for kind, channel in CHANNELS.items() if channel.alert)
