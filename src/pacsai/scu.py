"""The SCU side for people: C-ECHO a peer, and C-STORE files and folders to it as they are."""

from __future__ import annotations

import contextlib
import itertools
import re
import ssl
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from pynetdicom.status import code_to_category

from pacsai._pynetdicom import AE, close_transport, connect_error, send_c_store
from pacsai.errors import ConfigError, DeliveryError

__all__ = [
    "NoAcceptedContextError",
    "PushSummary",
    "Target",
    "echo",
    "find_instances",
    "iter_files",
    "open_association",
    "push",
    "store_file",
]

_TARGET = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d{1,5})$")
_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
_MESSAGE_IDS = itertools.count(1)  # unique among a requester's outstanding messages (PS3.7)


@dataclass(frozen=True, slots=True)
class Target:
    """A DICOM peer written as ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Target:
        """Parse ``AET@HOST:PORT`` (an IPv6 host in brackets).

        Raises
        ------
        ConfigError
            If `text` is not of that form.
        """
        match = _TARGET.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise ConfigError(f"{text!r} is not AET@HOST:PORT (for example ORTHANC@127.0.0.1:4242)")
        return cls(match["aet"], match["host"].strip("[]"), int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _ae(calling_ae_title: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae


def echo(target: Target, *, calling_ae_title: str = "PACSAI", timeout: float = 30.0) -> int:
    """Send C-ECHO; return the status.

    Raises
    ------
    DeliveryError
        If no association could be established (refused, rejected, timed out).
    """
    ae = _ae(calling_ae_title, timeout)
    ae.add_requested_context(Verification)
    with _association(ae, target, None, timeout) as assoc:
        status = assoc.send_c_echo()
    if "Status" not in status:
        raise DeliveryError(f"{target} sent no C-ECHO response")
    return int(status.Status)


class NoAcceptedContextError(DeliveryError):
    """The peer accepted none of the presentation contexts asked for (it does not take the
    SOP class or transfer syntax): sending again cannot help."""


@contextlib.contextmanager
def _association(
    ae: AE, target: Target, tls: ssl.SSLContext | None, timeout: float
) -> Iterator[Any]:
    """An established association with `target`, released on exit (aborted on an error), its
    connection closed whatever happened."""
    assoc = ae.associate(
        target.host,
        target.port,
        ae_title=target.ae_title,
        tls_args=(tls, target.host) if tls is not None else None,
    )
    try:
        if not assoc.is_established:
            raise _refusal(assoc, target)
        yield assoc
        if assoc.is_established:
            assoc.release()
    finally:
        if assoc.is_established:
            assoc.abort()
        close_transport(assoc)


def _refusal(assoc: Any, target: Target) -> DeliveryError:
    error = connect_error(assoc)
    if error is not None:
        return DeliveryError(
            f"could not connect to {target}: {error.strerror or error}: is the peer running, "
            "and are its host and port right?"
        )
    if not assoc.is_rejected and assoc.rejected_contexts and not assoc.accepted_contexts:
        refused = sorted(
            {c.abstract_syntax.name for c in assoc.rejected_contexts if c.abstract_syntax}
        )
        return NoAcceptedContextError(
            f"{target} accepted no presentation context for {', '.join(refused)}"
        )
    return DeliveryError(f"could not associate with {target}: {_why(assoc)}")


def _why(assoc: object) -> str:
    if getattr(assoc, "is_rejected", False):
        return "association rejected (check the AE titles and the peer's allow-list)"
    return (
        "no association (refused, aborted or timed out): is the peer running, and are its "
        "host, port and AE title right?"
    )


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every file under `paths` (folders recursively), in a stable order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


@dataclass
class PushSummary:
    """What a push did, per outcome: ``Success``, ``0xA900 Failure``, ``not sent: ...``."""

    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def succeeded(self) -> int:
        return sum(n for key, n in self.outcomes.items() if key.startswith(("Success", "Warning")))

    @property
    def failed(self) -> int:
        return sum(self.outcomes.values()) - self.succeeded

    def add(self, path: Path, outcome: str, ok: bool, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if not ok:
            self.failures.append((path, f"{outcome}: {detail}" if detail else outcome))


@dataclass(frozen=True, slots=True)
class _Item:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    offset: int  # where the data set starts, after the file meta


def _inspect(path: Path) -> _Item | str:
    try:
        meta, offset = split_dataset(path)
        return _Item(
            path,
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
            offset,
        )
    except (InvalidDicomError, AttributeError):
        return "not sent: not a DICOM file with file meta information"
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        return f"not sent: unreadable ({type(exc).__name__})"


def _batches(items: list[_Item]) -> Iterator[list[_Item]]:
    """Split items so that no association needs more than 128 presentation contexts."""
    batch: list[_Item] = []
    contexts: set[tuple[str, str]] = set()
    for item in items:
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in contexts and len(contexts) == _MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        contexts.add(key)
        batch.append(item)
    if batch:
        yield batch


def push(
    paths: Iterable[Path],
    target: Target,
    *,
    calling_ae_title: str = "PACSAI",
    timeout: float = 60.0,
    on_file: Callable[[Path, str], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> PushSummary:
    """C-STORE every DICOM file under `paths` to `target`, each as it is on disk.

    The data set is sent in the transfer syntax it was written in, without being decoded.
    `on_file` is called after each file with the outcome text (for a progress bar).

    Raises
    ------
    DeliveryError
        If no association could be established at all.
    """
    summary = PushSummary()
    items: list[_Item] = []
    for path in iter_files(paths):
        inspected = _inspect(path)
        if isinstance(inspected, str):
            summary.add(path, inspected, ok=False)
            if on_file:
                on_file(path, inspected)
        else:
            items.append(inspected)
    for batch in _batches(items):
        ae = _ae(calling_ae_title, timeout)
        for sop_class, syntax in sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in batch}):
            ae.add_requested_context(sop_class, syntax)
        with _association(ae, target, tls, timeout) as assoc:
            for number, item in enumerate(batch, start=1):
                outcome, detail, ok = _send(assoc, item, message_id=number % 0x10000 or 1)
                summary.add(item.path, outcome, ok, detail)
                if on_file:
                    on_file(item.path, outcome)
    return summary


def _send(assoc: Any, item: _Item, *, message_id: int) -> tuple[str, str, bool]:
    """Send one file's data set as it is on disk; return (outcome, detail, ok)."""
    if not assoc.is_established:
        return "not sent: the association was lost", "", False
    try:
        with item.path.open("rb") as stream:
            stream.seek(item.offset)
            dataset = stream.read()
    except OSError as exc:
        return f"not sent: unreadable ({type(exc).__name__})", str(exc)[:200], False
    try:
        response = send_c_store(
            assoc,
            sop_class_uid=item.sop_class_uid,
            sop_instance_uid=item.sop_instance_uid,
            transfer_syntax_uid=item.transfer_syntax_uid,
            dataset=dataset,
            message_id=message_id,
        )
    except ValueError as exc:
        return "not sent: the peer accepted no presentation context for it", str(exc)[:200], False
    except RuntimeError as exc:  # the association ended under us
        return "not sent: the association was lost", str(exc)[:200], False
    if "Status" not in response:
        return "no response (association lost or timed out)", "", False
    status = int(response.Status)
    category = code_to_category(status)
    comment = str(response.get("ErrorComment", "")).strip()
    label = "Success" if status == 0 else f"0x{status:04X} {category}"
    return label, comment, category in ("Success", "Warning")


@contextlib.contextmanager
def open_association(
    target: Target,
    contexts: Iterable[tuple[str, str]],
    *,
    calling_ae_title: str = "PACSAI",
    timeout: float = 60.0,
    tls: ssl.SSLContext | None = None,
) -> Iterator[Any]:
    """An established association with `target` proposing one presentation context per
    (SOP Class UID, Transfer Syntax UID), released on exit; send files with :func:`store_file`.

    Raises
    ------
    NoAcceptedContextError
        If the peer accepted none of the presentation contexts.
    DeliveryError
        If no association could be established.
    """
    ae = _ae(calling_ae_title, timeout)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    with _association(ae, target, tls, timeout) as assoc:
        yield assoc


def store_file(assoc: Any, path: Path) -> tuple[str, str, bool]:
    """C-STORE one file's data set as it is on disk (an accepted presentation context must have
    its SOP Class and transfer syntax); return (outcome, detail, ok)."""
    inspected = _inspect(path)
    if isinstance(inspected, str):
        return inspected, "", False
    return _send(assoc, inspected, message_id=next(_MESSAGE_IDS) % 0x10000 or 1)


def find_instances(
    target: Target,
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    calling_ae_title: str = "PACSAI",
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> set[str]:
    """The SOP Instance UIDs of one series that `target` holds: C-FIND, Study Root
    Query/Retrieve Information Model, IMAGE level (PS3.4 C.4.1).

    Raises
    ------
    NoAcceptedContextError
        If the peer does not take Study Root C-FIND (a storage-only SCP).
    DeliveryError
        If no association could be established, or the query failed.
    """
    ae = _ae(calling_ae_title, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = series_instance_uid
    query.SOPInstanceUID = ""
    found: set[str] = set()
    with _association(ae, target, tls, timeout) as assoc:
        try:
            responses = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            for status, identifier in responses:
                if "Status" not in status:
                    raise DeliveryError(f"{target} sent no C-FIND response")
                code = int(status.Status)
                if code in (0xFF00, 0xFF01):
                    if identifier is not None and "SOPInstanceUID" in identifier:
                        found.add(str(identifier.SOPInstanceUID))
                elif code != 0:
                    raise DeliveryError(f"{target} answered C-FIND with 0x{code:04X}")
        except (ValueError, AttributeError) as exc:
            raise NoAcceptedContextError(f"{target} does not take C-FIND: {exc}") from exc
    return found
