"""Alerts for priority findings: a webhook (JSON with an HMAC signature, or a Slack or Teams
body) and e-mail over SMTP with STARTTLS.

An alert says only what a person needs to act and nothing that identifies the patient: the
accession number, the study time, the findings that are present with their values, why the
study is priority, and a link to the study in pacsai (behind its login). No patient name or ID
and no UID is in it.

Webhook: the body is posted as it is signed; with a ``secret`` the request carries
``X-Pacsai-Signature-256: sha256=<hex HMAC-SHA256 of the body>`` (compare it in constant time,
e.g. ``hmac.compare_digest``), and always ``X-Pacsai-Delivery: <result key>``, the same on every
attempt, so that a receiver can drop a repeat. HTTP 2xx is sent; 4xx other than 408 and 429 is
permanent; 408, 429, 5xx and a failed connection are retried.

E-mail: one message to every address in ``to``, with a ``Message-ID`` derived from the result
key (the same on every attempt). SMTP 5xx replies (authentication failed, recipients or sender
refused) and a server without STARTTLS are permanent; 4xx replies, a lost connection and a
failed TLS handshake are retried. Recipients refused while others accepted the message are
returned, not retried (a retry would send it again to those who have it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

import httpx

from pacsai.config import EmailDestination, WebhookDestination
from pacsai.reporting.delivery import DeliveryFailure
from pacsai.reporting.delivery import tls_context as tls_context
from pacsai.reporting.study_result import Finding, StudyResult

__all__ = [
    "DELIVERY_HEADER",
    "SIGNATURE_HEADER",
    "Alert",
    "build_email",
    "message_id",
    "send_email",
    "send_webhook",
    "sign",
    "webhook_body",
]

SIGNATURE_HEADER = "X-Pacsai-Signature-256"
DELIVERY_HEADER = "X-Pacsai-Delivery"


def message_id(key: str, from_address: str) -> str:
    """The e-mail Message-ID of the alert with ``key`` (the same on every attempt)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    domain = from_address.rsplit("@", 1)[-1] or "pacsai"
    return f"<pacsai.{key}.{digest}@{domain}>"


def _value(finding: Finding) -> str:
    if finding.volume_ml is not None:
        return f"{finding.volume_ml:.1f} mL"
    return f"probability {(finding.probability or 0) * 100:.0f}%"


@dataclass(frozen=True, slots=True)
class Alert:
    """What an alert says about a priority study: no patient name, ID or UID."""

    key: str
    accession_number: str | None
    study_time: datetime | None
    findings: tuple[Finding, ...]
    reasons: tuple[str, ...]
    link: str | None

    @classmethod
    def of(cls, result: StudyResult) -> Alert:
        """The alert of a priority result.

        Raises
        ------
        ValueError
            If ``result`` is not priority: there is nothing to alert about.
        """
        if not result.priority:
            raise ValueError(f"result {result.key} is not priority: no alert is sent for it")
        return cls(
            key=result.key,
            accession_number=result.accession_number,
            study_time=result.study_time,
            findings=tuple(f for f in result.findings if f.present),
            reasons=result.priority_reasons,
            link=result.link,
        )

    @property
    def title(self) -> str:
        return f"Priority AI finding, accession {self.accession_number or '(none)'}"

    @property
    def study_time_text(self) -> str:
        if self.study_time is None:
            return "(unknown)"
        return self.study_time.isoformat(sep=" ", timespec="minutes")

    def lines(self) -> list[str]:
        """The alert in words, one fact a line."""
        lines = [
            f"Accession: {self.accession_number or '(none)'}",
            f"Study time: {self.study_time_text}",
        ]
        lines += [f"Finding: {f.label}, {_value(f)}" for f in self.findings]
        lines += [f"Why: {reason}" for reason in self.reasons]
        if self.link:
            lines.append(f"Study: {self.link}")
        lines.append("AI result, not verified by a radiologist.")
        return lines

    def document(self, *, now: datetime) -> dict[str, Any]:
        """pacsai's own JSON document (``format: json``)."""
        return {
            "event": "priority_finding",
            "id": self.key,
            "accession_number": self.accession_number,
            "study_time": self.study_time.isoformat() if self.study_time else None,
            "findings": [
                {
                    "label": f.label,
                    "volume_ml": f.volume_ml,
                    "probability": f.probability,
                }
                for f in self.findings
            ],
            "reasons": list(self.reasons),
            "link": self.link,
            "sent_at": now.astimezone(UTC).isoformat(timespec="seconds"),
        }


def _teams(alert: Alert) -> dict[str, Any]:
    """A Teams Workflows message: one Adaptive Card (schema 1.4)."""
    card: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "text": alert.title, "weight": "Bolder", "wrap": True},
            {
                "type": "FactSet",
                "facts": [
                    {"title": title.strip(), "value": value.strip()}
                    for title, value in (line.split(":", 1) for line in alert.lines()[:-1])
                    if title != "Study"
                ],
            },
            {"type": "TextBlock", "text": alert.lines()[-1], "isSubtle": True, "wrap": True},
        ],
    }
    if alert.link:
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Open study", "url": alert.link}]
    return {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
        ],
    }


def _slack(alert: Alert) -> dict[str, Any]:
    lines = [line for line in alert.lines() if not line.startswith("Study: ")]
    if alert.link:
        lines.append(f"<{alert.link}|Open study>")
    return {"text": f"*{alert.title}*\n" + "\n".join(lines)}


def webhook_body(alert: Alert, body_format: str, *, now: datetime | None = None) -> bytes:
    """The body posted for ``body_format`` (``json``, ``slack`` or ``teams``), UTF-8 JSON."""
    now = now or datetime.now(UTC)
    if body_format == "slack":
        payload = _slack(alert)
    elif body_format == "teams":
        payload = _teams(alert)
    elif body_format == "json":
        payload = alert.document(now=now)
    else:
        raise ValueError(f"unknown webhook format {body_format!r} (json, slack or teams)")
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sign(secret: str, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``body`` with ``secret`` (UTF-8)."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def send_webhook(
    result: StudyResult, destination: WebhookDestination, *, now: datetime | None = None
) -> int:
    """POST the alert of ``result`` to ``destination.url``; return the HTTP status (2xx).

    Raises
    ------
    ValueError
        If ``result`` is not priority.
    DeliveryFailure
        As described in the module docstring.
    """
    alert = Alert.of(result)
    body = webhook_body(alert, destination.format, now=now)
    headers = {"Content-Type": "application/json; charset=utf-8", DELIVERY_HEADER: alert.key}
    if destination.secret is not None:
        headers[SIGNATURE_HEADER] = sign(destination.secret.get_secret_value(), body)
    verify: ssl.SSLContext | bool = tls_context(destination.tls) or True
    where = f"webhook {destination.url.split('?', 1)[0]}"  # a query may hold a token
    try:
        response = httpx.post(
            destination.url,
            content=body,
            headers=headers,
            timeout=destination.timeout_seconds,
            verify=verify,
        )
    except httpx.HTTPError as exc:
        raise DeliveryFailure(f"{where}: {type(exc).__name__}: {exc}", permanent=False) from exc
    if response.is_success:
        return response.status_code
    transient = response.status_code >= 500 or response.status_code in (408, 429)
    raise DeliveryFailure(
        f"{where} answered HTTP {response.status_code}: {response.text[:300]}",
        permanent=not transient,
    )


def build_email(
    result: StudyResult, destination: EmailDestination, *, now: datetime | None = None
) -> EmailMessage:
    """The e-mail of the alert of ``result``.

    Raises
    ------
    ValueError
        If ``result`` is not priority.
    """
    alert = Alert.of(result)
    now = now or datetime.now(UTC)
    message = EmailMessage()
    message["Subject"] = f"{destination.subject_prefix} {alert.title}".strip()
    message["From"] = destination.from_address
    message["To"] = ", ".join(destination.to)
    message["Date"] = format_datetime(now.astimezone(UTC))
    message["Message-ID"] = message_id(alert.key, destination.from_address)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies
    message.set_content("\n".join([alert.title, "", *alert.lines()]) + "\n")
    return message


def _smtp_failure(where: str, exc: smtplib.SMTPException) -> DeliveryFailure:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        refused = ", ".join(f"{who}: {code}" for who, (code, _) in exc.recipients.items())
        return DeliveryFailure(
            f"{where} refused every recipient ({refused})",
            permanent=all(code >= 500 for code in codes),
        )
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return DeliveryFailure(f"{where}: {exc} (the server offers no STARTTLS)", permanent=True)
    if isinstance(exc, smtplib.SMTPResponseException):
        text = (
            exc.smtp_error.decode("utf-8", "replace")
            if isinstance(exc.smtp_error, bytes)
            else exc.smtp_error
        )
        return DeliveryFailure(
            f"{where} answered {exc.smtp_code}: {text}", permanent=exc.smtp_code >= 500
        )
    return DeliveryFailure(f"{where}: {exc}", permanent=False)


def _smtp_tls(destination: EmailDestination) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(destination.ca) if destination.ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryFailure(f"e-mail CA file {destination.ca}: {exc}", permanent=True) from exc
    context.check_hostname = destination.check_hostname  # verified against the CA either way
    return context


def send_email(
    result: StudyResult, destination: EmailDestination, *, now: datetime | None = None
) -> dict[str, tuple[int, bytes]]:
    """Send the alert of ``result`` by e-mail; return the recipients that were refused while
    others took it (empty when everyone did).

    Raises
    ------
    ValueError
        If ``result`` is not priority.
    DeliveryFailure
        As described in the module docstring.
    """
    message = build_email(result, destination, now=now)
    where = f"SMTP {destination.host}:{destination.port}"
    context = _smtp_tls(destination) if destination.starttls else None
    try:
        with smtplib.SMTP(
            destination.host, destination.port, timeout=destination.timeout_seconds
        ) as smtp:
            smtp.ehlo()
            if context is not None:
                smtp.starttls(context=context)
                smtp.ehlo()
            if destination.username is not None and destination.password is not None:
                smtp.login(destination.username, destination.password.get_secret_value())
            refused: dict[str, tuple[int, bytes]] = smtp.send_message(message)
    except smtplib.SMTPException as exc:
        raise _smtp_failure(where, exc) from exc
    except ssl.SSLError as exc:
        raise DeliveryFailure(f"{where}: TLS failed: {exc.reason or exc}", permanent=False) from exc
    except OSError as exc:
        raise DeliveryFailure(f"{where}: {exc.strerror or exc}", permanent=False) from exc
    return refused
