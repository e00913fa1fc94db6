"""Sending a result's objects to one destination: C-STORE (DICOM, optionally TLS) or STOW-RS.

One delivery is one association (or one HTTP request) carrying all of its objects. A failure is
either *transient* (the peer is down, out of resources, the network dropped: retry later) or
*permanent* (the peer refused the object: retrying cannot help), and says which.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from pacsai.config import Destination, DestinationTls
from pacsai.errors import DeliveryError
from pacsai.scu import NoAcceptedContextError, Target, push

__all__ = ["DeliveryFailure", "Peer", "send", "tls_context"]


class DeliveryFailure(DeliveryError):
    """A delivery attempt failed; ``permanent`` says whether another attempt could succeed."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Peer:
    """Where one delivery goes, with ``back_to_sender`` resolved to the study's sender."""

    name: str
    destination: Destination
    ae_title: str | None
    host: str | None

    @classmethod
    def resolve(
        cls, name: str, destination: Destination, *, sender_ae: str, sender_host: str | None
    ) -> Peer:
        if destination.back_to_sender:
            return cls(name, destination, sender_ae, sender_host)
        return cls(name, destination, destination.ae_title, destination.host)

    def describe(self) -> str:
        if self.destination.stow_url:
            return f"{self.name} ({self.destination.stow_url})"
        return f"{self.name} ({self.ae_title}@{self.host}:{self.destination.port})"


#: Outcomes another attempt may get past: Out of Resources (0xA7xx), Processing Failure (0x0110,
#: which pacsai's own receiver answers for a transient database error), a lost association.
_TRANSIENT = ("0xA7", "0x0110", "no response")


def send(
    peer: Peer,
    files: Sequence[Path],
    *,
    calling_ae_title: str,
    on_stored: Callable[[Path], None] | None = None,
) -> None:
    """Send ``files`` to ``peer``; return normally only if every object was accepted.

    ``on_stored`` is called with each file as soon as the peer has accepted it (after its
    C-STORE response; after the STOW-RS response for all of them), before the next is sent:
    an exception it raises stops the delivery there.

    Raises
    ------
    DeliveryFailure
        With ``permanent`` set when the peer refused an object (a DIMSE failure status other
        than Out of Resources or Processing Failure, no accepted presentation context, an HTTP
        4xx other than 408/429).
    """
    if peer.destination.stow_url:
        _stow(peer, files)
        if on_stored is not None:
            for path in files:
                on_stored(path)
    else:
        _c_store(peer, files, calling_ae_title, on_stored)


def _c_store(
    peer: Peer,
    files: Sequence[Path],
    calling_ae_title: str,
    on_stored: Callable[[Path], None] | None = None,
) -> None:
    destination = peer.destination
    if peer.host is None or peer.ae_title is None or destination.port is None:
        raise DeliveryFailure(f"{peer.name}: no host or AE title to send to", permanent=True)
    target = Target(peer.ae_title, peer.host, destination.port)

    def stored(path: Path, outcome: str) -> None:
        if on_stored is not None and (outcome == "Success" or outcome.endswith(" Warning")):
            on_stored(path)

    try:
        summary = push(
            files,
            target,
            calling_ae_title=calling_ae_title,
            timeout=destination.timeout_seconds,
            tls=tls_context(destination.tls),
            on_file=stored,
        )
    except NoAcceptedContextError as exc:
        raise DeliveryFailure(f"{peer.describe()}: {exc}", permanent=True) from exc
    except DeliveryError as exc:
        raise DeliveryFailure(f"{peer.describe()}: {exc}", permanent=False) from exc
    if not summary.failures:
        return
    details = "; ".join(f"{path.name}: {why}" for path, why in summary.failures)
    transient = all(why.startswith(_TRANSIENT) for _, why in summary.failures)
    raise DeliveryFailure(f"{peer.describe()} refused: {details}", permanent=not transient)


def tls_context(settings: DestinationTls) -> ssl.SSLContext | None:
    """The TLS context of a destination's ``tls:`` settings (``None`` when TLS is off)."""
    if not settings.enabled:
        return None
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(settings.ca) if settings.ca else None
        )
        context.check_hostname = settings.check_hostname
        if settings.cert and settings.key:
            context.load_cert_chain(str(settings.cert), str(settings.key))
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryFailure(f"TLS settings of the destination: {exc}", permanent=True) from exc
    return context


def _stow(peer: Peer, files: Sequence[Path]) -> None:
    """STOW-RS (PS3.18 10.5): one multipart/related request with every object."""
    assert peer.destination.stow_url is not None
    boundary = f"pacsai-{uuid.uuid4().hex}"
    parts = []
    for path in files:
        parts.append(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
        )
    body = b"\r\n".join(parts) + f"\r\n--{boundary}--\r\n".encode()
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    url = peer.destination.stow_url.rstrip("/") + "/studies"
    verify: ssl.SSLContext | bool = tls_context(peer.destination.tls) or True
    try:
        response = httpx.post(
            url,
            content=body,
            headers=headers,
            timeout=peer.destination.timeout_seconds,
            verify=verify,
        )
    except httpx.HTTPError as exc:
        raise DeliveryFailure(f"{peer.describe()}: {exc}", permanent=False) from exc
    if response.status_code in (200, 202) and not _failed_sops(response):
        return
    transient = response.status_code >= 500 or response.status_code in (408, 429)
    raise DeliveryFailure(
        f"{peer.describe()} answered HTTP {response.status_code}: {response.text[:300]}",
        permanent=not transient,
    )


def _failed_sops(response: httpx.Response) -> bool:
    """Whether a STOW-RS response lists a Failed SOP Sequence (0008,1198)."""
    try:
        payload = response.json()
    except ValueError:
        return False
    return isinstance(payload, dict) and bool(payload.get("00081198", {}).get("Value"))
