"""Sending a result's objects to one destination: C-STORE (DICOM, optionally TLS) or STOW-RS.

One delivery is one association (or one HTTP request) carrying all of its objects. A failure is
either *transient* (the peer is down, out of resources, the network dropped: retry later) or
*permanent* (the peer refused the object: retrying cannot help), and says which.

What is sent is negotiated per destination, at each attempt:

- **SEG type.** A result written as a Label Map Segmentation is offered both as that SOP Class
  and as Segmentation Storage. A peer that accepts the Label Map Segmentation SOP Class gets the
  LABELMAP SEG and its SR; one that accepts only Segmentation Storage gets the BINARY form of
  both (:func:`pacsai.reporting.variants.binary_variant`, written on first need and kept). A
  STOW-RS server is sent the LABELMAP first and the BINARY form if it refuses it.
- **Transfer syntax.** Each object is offered in the transfer syntax it was written in (JPEG-LS
  Lossless, Deflated Explicit VR Little Endian: lossless compression) and, in separate
  presentation contexts, in Explicit and Implicit VR Little Endian; it is sent compressed when
  the peer accepts that, else re-encoded (:func:`pacsai.reporting.transfer.reencode`).

:func:`send` returns a :class:`DeliveryReceipt` saying which SEG type and which objects, in which
transfer syntax, the peer received.
"""

from __future__ import annotations

import ssl
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, SegmentationStorage

from pacsai.config import Destination, DestinationTls
from pacsai.errors import DeliveryError, ReportError
from pacsai.reporting.sop_classes import LABEL_MAP_SEGMENTATION_STORAGE
from pacsai.reporting.transfer import (
    FALLBACK_TRANSFER_SYNTAXES,
    STORED_TRANSFER_SYNTAXES,
    reencode,
)
from pacsai.reporting.variants import binary_variant
from pacsai.scu import NoAcceptedContextError, Target, open_association, store_file

__all__ = [
    "DeliveryFailure",
    "DeliveryReceipt",
    "Peer",
    "SentObject",
    "send",
    "tls_context",
]


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

_SEGMENTATION_CLASSES = {
    str(LABEL_MAP_SEGMENTATION_STORAGE): "LABELMAP",
    str(SegmentationStorage): "BINARY",
}


@dataclass(frozen=True)
class SentObject:
    """One object a peer received.

    Attributes
    ----------
    path : pathlib.Path
        The result's file it was sent for.
    sent : pathlib.Path
        The file sent: ``path``, or the BINARY form of it (the same object in the other SEG
        type, or the SR referring to that).
    sop_class_uid, sop_instance_uid, transfer_syntax_uid : str
        What the peer received.
    """

    path: Path
    sent: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class DeliveryReceipt:
    """What one successful delivery sent.

    Attributes
    ----------
    seg_type : str or None
        ``LABELMAP`` or ``BINARY``: the type of the SEG sent; None if no SEG was.
    objects : tuple of SentObject
        In the order sent.
    """

    seg_type: str | None
    objects: tuple[SentObject, ...]


@dataclass(frozen=True)
class _Object:
    """A file to send, from its header."""

    path: Path
    sent: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    references: frozenset[str]  # SOP Instance UIDs an SR lists as evidence

    def receipt(self, transfer_syntax_uid: str) -> SentObject:
        return SentObject(
            self.path, self.sent, self.sop_class_uid, self.sop_instance_uid, transfer_syntax_uid
        )


OnStored = Callable[["SentObject"], None]


def send(
    peer: Peer,
    files: Sequence[Path],
    *,
    calling_ae_title: str,
    on_stored: OnStored | None = None,
) -> DeliveryReceipt:
    """Send ``files`` to ``peer``; return normally only if every object was accepted.

    ``on_stored`` is called with each object as soon as the peer has accepted it (after its
    C-STORE response; after the STOW-RS response of its request), before the next is sent: an
    exception it raises stops the delivery there. Its ``path`` is the file of ``files`` it was
    sent for, its ``sop_instance_uid`` what the peer holds (the BINARY form's, when sent so).

    Returns
    -------
    DeliveryReceipt
        The SEG type and the objects the peer received.

    Raises
    ------
    DeliveryFailure
        With ``permanent`` set when the peer refused an object (a DIMSE failure status other
        than Out of Resources or Processing Failure, no accepted presentation context, an HTTP
        4xx other than 408/429), or an object cannot be read or converted.
    """
    objects = [_inspect(path, peer) for path in files]
    if peer.destination.stow_url:
        return _stow(peer, objects, on_stored)
    return _c_store(peer, objects, calling_ae_title, on_stored)


def _inspect(path: Path, peer: Peer) -> _Object:
    try:
        meta = read_file_meta_info(path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        references: frozenset[str] = frozenset()
        if sop_class not in _SEGMENTATION_CLASSES:  # an SR may refer to a LABELMAP SEG
            evidence = dcmread(path, stop_before_pixels=True).get(
                "CurrentRequestedProcedureEvidenceSequence", []
            )
            references = frozenset(
                str(item.ReferencedSOPInstanceUID)
                for study in evidence
                for series in study.get("ReferencedSeriesSequence", [])
                for item in series.get("ReferencedSOPSequence", [])
            )
        return _Object(
            path,
            path,
            sop_class,
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
            references,
        )
    except (OSError, InvalidDicomError, AttributeError, KeyError, ValueError) as exc:
        raise DeliveryFailure(
            f"{peer.describe()}: cannot read {path.name}: {exc}", permanent=True
        ) from exc


def _labelmap_result(objects: Sequence[_Object]) -> tuple[list[_Object], list[_Object]]:
    """The LABELMAP SEGs among ``objects`` and the SRs that refer to them."""
    labelmaps = [o for o in objects if o.sop_class_uid == LABEL_MAP_SEGMENTATION_STORAGE]
    uids = {o.sop_instance_uid for o in labelmaps}
    return labelmaps, [o for o in objects if o.references & uids]


def _as_binary(objects: Sequence[_Object], peer: Peer) -> list[_Object]:
    """``objects`` with each LABELMAP SEG, and the SRs referring to it, in their BINARY form."""
    labelmaps, reports = _labelmap_result(objects)
    swapped: dict[Path, _Object] = {}
    for labelmap in labelmaps:
        tied = [o for o in reports if labelmap.sop_instance_uid in o.references]
        try:
            variant = binary_variant(labelmap.path, [o.path for o in tied])
        except ReportError as exc:  # a full disk passes; a damaged result does not
            raise DeliveryFailure(
                f"{peer.describe()}: {exc}", permanent=not isinstance(exc.__cause__, OSError)
            ) from exc
        for original, path in [(labelmap, variant.seg)] + [
            (o, variant.reports[o.path]) for o in tied
        ]:
            form = _inspect(path, peer)
            swapped[original.path] = replace(form, path=original.path, sent=path)
    return [swapped.get(o.path, o) for o in objects]


def _contexts(objects: Sequence[_Object]) -> list[tuple[str, str]]:
    """One presentation context per SOP Class and transfer syntax: each object's own, and the
    uncompressed ones to fall back on."""
    contexts: set[tuple[str, str]] = set()
    for o in objects:
        contexts.add((o.sop_class_uid, o.transfer_syntax_uid))
        contexts.update((o.sop_class_uid, str(syntax)) for syntax in FALLBACK_TRANSFER_SYNTAXES)
    return sorted(contexts)


def _c_store(
    peer: Peer,
    objects: Sequence[_Object],
    calling_ae_title: str,
    on_stored: OnStored | None = None,
) -> DeliveryReceipt:
    destination = peer.destination
    if peer.host is None or peer.ae_title is None or destination.port is None:
        raise DeliveryFailure(f"{peer.name}: no host or AE title to send to", permanent=True)
    target = Target(peer.ae_title, peer.host, destination.port)
    labelmaps, _ = _labelmap_result(objects)
    offered = list(objects)
    if labelmaps:  # the BINARY form is offered as well; it is made only if the peer needs it
        offered += [
            replace(
                o,
                sop_class_uid=str(SegmentationStorage),
                transfer_syntax_uid=str(STORED_TRANSFER_SYNTAXES["BINARY"]),
            )
            for o in labelmaps
        ]
    try:
        with (
            open_association(
                target,
                _contexts(offered),
                calling_ae_title=calling_ae_title,
                timeout=destination.timeout_seconds,
                tls=tls_context(destination.tls),
            ) as assoc,
            tempfile.TemporaryDirectory(prefix="pacsai-send-") as temp,
        ):
            accepted = {
                (str(context.abstract_syntax), str(context.transfer_syntax[0]))
                for context in assoc.accepted_contexts
            }
            classes = {sop_class for sop_class, _ in accepted}
            plan = list(objects)
            if labelmaps and LABEL_MAP_SEGMENTATION_STORAGE not in classes:
                if SegmentationStorage not in classes:
                    raise DeliveryFailure(
                        f"{peer.describe()} accepts neither Label Map Segmentation Storage nor "
                        "Segmentation Storage",
                        permanent=True,
                    )
                plan = _as_binary(objects, peer)
            failures: list[tuple[Path, str]] = []
            sent: list[SentObject] = []
            for index, o in enumerate(plan):
                syntax = _syntax_for(o, accepted)
                if syntax is None:
                    failures.append(
                        (o.sent, "not sent: the peer accepted no presentation context for it")
                    )
                    continue
                path = o.sent
                if syntax != o.transfer_syntax_uid:
                    path = Path(temp) / f"{index}-{o.sent.name}"
                    try:
                        reencode(o.sent, path, UID(syntax))
                    except DeliveryError as exc:
                        raise DeliveryFailure(
                            f"{peer.describe()}: {exc}",
                            permanent=not isinstance(exc.__cause__, OSError),
                        ) from exc
                outcome, detail, ok = store_file(assoc, path)
                if ok:
                    sent.append(o.receipt(syntax))
                    if on_stored is not None:
                        on_stored(sent[-1])
                else:
                    failures.append((o.sent, f"{outcome}: {detail}" if detail else outcome))
    except NoAcceptedContextError as exc:
        raise DeliveryFailure(f"{peer.describe()}: {exc}", permanent=True) from exc
    except DeliveryFailure:
        raise
    except DeliveryError as exc:
        raise DeliveryFailure(f"{peer.describe()}: {exc}", permanent=False) from exc
    if not failures:
        return DeliveryReceipt(_seg_type(sent), tuple(sent))
    details = "; ".join(f"{path.name}: {why}" for path, why in failures)
    transient = all(why.startswith(_TRANSIENT) for _, why in failures)
    raise DeliveryFailure(f"{peer.describe()} refused: {details}", permanent=not transient)


def _syntax_for(o: _Object, accepted: set[tuple[str, str]]) -> str | None:
    """The object's own transfer syntax if accepted, else the first uncompressed one that is."""
    for syntax in (o.transfer_syntax_uid, *map(str, FALLBACK_TRANSFER_SYNTAXES)):
        if (o.sop_class_uid, syntax) in accepted:
            return syntax
    return None


def _seg_type(sent: Sequence[SentObject]) -> str | None:
    """LABELMAP or BINARY: the type of the SEG sent (None: no SEG)."""
    types = {_SEGMENTATION_CLASSES.get(o.sop_class_uid) for o in sent}
    return next((kind for kind in ("LABELMAP", "BINARY") if kind in types), None)


def tls_context(settings: DestinationTls) -> ssl.SSLContext | None:
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


def _stow(
    peer: Peer, objects: Sequence[_Object], on_stored: OnStored | None = None
) -> DeliveryReceipt:
    """STOW-RS (PS3.18 10.5): the LABELMAP SEGs alone first, so that a server refusing that SOP
    Class can be sent the BINARY form before any SR referring to them; then the rest."""
    labelmaps, _ = _labelmap_result(objects)
    sent: list[SentObject] = []
    rest = list(objects)
    if labelmaps:
        try:
            _post(peer, labelmaps)
            sent += _stored([o.receipt(o.transfer_syntax_uid) for o in labelmaps], on_stored)
            rest = [o for o in objects if o not in labelmaps]
        except DeliveryFailure as exc:
            if not exc.permanent:
                raise
            rest = _as_binary(objects, peer)
    _post(peer, rest)
    sent += _stored([o.receipt(o.transfer_syntax_uid) for o in rest], on_stored)
    return DeliveryReceipt(_seg_type(sent), tuple(sent))


def _stored(objects: list[SentObject], on_stored: OnStored | None) -> list[SentObject]:
    """``objects``, after telling ``on_stored`` of each (a STOW-RS request was answered)."""
    if on_stored is not None:
        for o in objects:
            on_stored(o)
    return objects


def _post(peer: Peer, objects: Sequence[_Object]) -> None:
    """One multipart/related request with every object, as written."""
    if not objects:
        return
    assert peer.destination.stow_url is not None
    boundary = f"pacsai-{uuid.uuid4().hex}"
    parts = []
    for o in objects:
        parts.append(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + o.sent.read_bytes()
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
