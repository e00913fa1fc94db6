"""Pulling studies from a PACS: C-FIND to list them, then C-MOVE (or C-GET) to fetch each one.

PS3.4 Annex C, Study Root Query/Retrieve Information Model, at the STUDY level:

- :func:`find_studies` asks the PACS for studies matching a :class:`StudyQuery` (accession
  number, Study Instance UID, patient ID, a study date range, a modality). The patient's name is
  neither asked for nor shown.
- :func:`retrieve_studies` fetches each study found. With C-MOVE the PACS sends the instances to
  pacsai's own AE title (it must know pacsai's host and port), where the running node receives
  them like any other C-STORE; with C-GET they come back over the same association and are
  stored through the normal receive path (:class:`pacsai.scp.InstanceStore`) by this process.
  Either way the study then goes through completion and a job like a pushed one.
- Progress comes from the pending responses (remaining, completed, failed and warning
  sub-operations); each study ends with its final DIMSE status, so a failure is reported per
  study with the status the PACS gave.
- :func:`audit_retrieval` records the query (110112 Query) and one 110107 Import per study.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS

from pacsai.config import Destination, Settings, Source
from pacsai.db import (
    AssociationOutcome,
    AuditAction,
    AuditEventId,
    AuditOutcome,
    Database,
    append_event,
)
from pacsai.errors import ConfigError, DeliveryError, PacsaiError
from pacsai.reporting.delivery import tls_context as tls_context
from pacsai.scp.handlers import handle_store
from pacsai.scp.server import TRANSFER_SYNTAXES
from pacsai.scp.store import AssociationState, InstanceStore
from pacsai.scu import Target

__all__ = [
    "FoundStudy",
    "RetrieveError",
    "StudyQuery",
    "StudyRetrieval",
    "audit_retrieval",
    "describe_status",
    "find_studies",
    "resolve_source",
    "retrieve_studies",
]

_STATUS_NAMES: dict[int, tuple[str, str]] = {
    **QR_GET_SERVICE_CLASS_STATUS,
    **QR_MOVE_SERVICE_CLASS_STATUS,
}
_PENDING = (0xFF00, 0xFF01)
_KEY_TEXT = re.compile(r"^[^\\*?]{1,64}$")  # no wildcards or multiple values in a key we send


class RetrieveError(PacsaiError):
    """The PACS could not be queried or asked to retrieve (no association, a failed C-FIND)."""


def _status_text(status: int) -> str:
    category, description = _STATUS_NAMES.get(status, ("", ""))
    if not description and 0xC000 <= status <= 0xCFFF:
        description = "Unable to process"
    return f"0x{status:04X} {description or category or 'unknown status'}".strip()


def describe_status(status: int) -> str:
    """A C-MOVE/C-GET status in words: ``0x0000 Success``, ``0xA801 Refused: Move ...``."""
    return _status_text(status)


@dataclass(frozen=True, slots=True)
class StudyQuery:
    """What to look for; the criteria given are combined (all must match).

    ``since``/``until`` bound the Study Date (inclusive). ``modality`` is matched by the PACS
    on Modalities in Study and checked again here, for a PACS that ignores that key.
    """

    accession_number: str | None = None
    study_instance_uid: str | None = None
    patient_id: str | None = None
    since: date | None = None
    until: date | None = None
    modality: str | None = None

    def __post_init__(self) -> None:
        if not any((self.accession_number, self.study_instance_uid, self.patient_id, self.since)):
            raise ValueError(
                "say what to retrieve: an accession number, a Study Instance UID, a patient ID "
                "or a date to start from (--since)"
            )
        if self.since and self.until and self.until < self.since:
            raise ValueError(f"--until {self.until} is before --since {self.since}")
        for what, value in (
            ("accession number", self.accession_number),
            ("Study Instance UID", self.study_instance_uid),
            ("patient ID", self.patient_id),
            ("modality", self.modality),
        ):
            if value is not None and not _KEY_TEXT.match(value):
                raise ValueError(
                    f"the {what} {value!r} must be 1 to 64 characters without \\, * or ?"
                )

    def describe(self) -> str:
        """The criteria in words, for messages and the audit trail."""
        parts = [
            f"{name} {value}"
            for name, value in (
                ("accession", self.accession_number),
                ("study", self.study_instance_uid),
                ("patient", self.patient_id),
                ("since", self.since),
                ("until", self.until),
                ("modality", self.modality),
            )
            if value
        ]
        return ", ".join(parts)

    def identifier(self) -> Dataset:
        """The C-FIND identifier: these criteria as matching keys, plus the keys to return."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = self.study_instance_uid or ""
        ds.AccessionNumber = self.accession_number or ""
        ds.PatientID = self.patient_id or ""
        if self.since or self.until:
            since = self.since.strftime("%Y%m%d") if self.since else ""
            until = self.until.strftime("%Y%m%d") if self.until else ""
            ds.StudyDate = f"{since}-{until}"
        else:
            ds.StudyDate = ""
        ds.StudyTime = ""
        ds.ModalitiesInStudy = self.modality or ""
        ds.StudyDescription = ""
        ds.NumberOfStudyRelatedInstances = ""
        return ds


@dataclass(frozen=True, slots=True)
class FoundStudy:
    """A study the PACS listed (no patient name)."""

    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    study_date: str | None
    study_time: str | None
    modalities: tuple[str, ...]
    description: str | None
    instances: int | None

    @classmethod
    def from_identifier(cls, ds: Dataset) -> FoundStudy:
        def text(keyword: str) -> str | None:
            value = ds.get(keyword)
            return str(value).strip() or None if value not in (None, "") else None

        modalities = ds.get("ModalitiesInStudy") or []
        if isinstance(modalities, str):
            modalities = [modalities]
        count = text("NumberOfStudyRelatedInstances")
        return cls(
            study_instance_uid=str(ds.StudyInstanceUID).strip(),
            accession_number=text("AccessionNumber"),
            patient_id=text("PatientID"),
            study_date=text("StudyDate"),
            study_time=text("StudyTime"),
            modalities=tuple(str(m).strip() for m in modalities if str(m).strip()),
            description=text("StudyDescription"),
            instances=int(count) if count and count.isdigit() else None,
        )


@dataclass(slots=True)
class StudyRetrieval:
    """How the retrieval of one study went: its last counts and final status."""

    study: FoundStudy
    method: str  # "move" or "get"
    status: int | None = None  # the final DIMSE status; None: no final response
    remaining: int | None = None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    error: str | None = None
    stored: int = field(default=0)  # C-GET: instances stored here

    @property
    def succeeded(self) -> bool:
        """Every sub-operation succeeded (warnings included)."""
        return self.status in (0x0000,) and self.failed == 0 and self.error is None

    @property
    def status_text(self) -> str:
        if self.error is not None:
            return self.error
        if self.status is None:
            return "no final response (association lost or timed out)"
        return _status_text(self.status)


#: Called after each pending response of a study's retrieval with what it says so far.
ProgressCallback = Callable[[StudyRetrieval], None]


def resolve_source(settings: Settings, name: str) -> tuple[str, Source]:
    """The PACS that ``--from NAME`` names: an entry of ``sources:``, else a DICOM entry of
    ``destinations:`` (retrieved by C-MOVE), else ``AET@HOST:PORT``.

    Raises
    ------
    ConfigError
        If ``name`` is none of these.
    """
    if name in settings.sources:
        return name, settings.sources[name]
    destination = settings.destinations.get(name)
    if isinstance(destination, Destination) and destination.stow_url is None:
        if destination.back_to_sender or not destination.host or not destination.ae_title:
            raise ConfigError(f"destination {name!r} has no fixed AE title and host to query")
        assert destination.port is not None  # a DICOM destination without STOW has a port
        return name, Source(
            ae_title=destination.ae_title,
            host=destination.host,
            port=destination.port,
            tls=destination.tls,
            timeout_seconds=max(destination.timeout_seconds, 60.0),
        )
    if "@" in name:
        target = Target.parse(name)
        return str(target), Source(ae_title=target.ae_title, host=target.host, port=target.port)
    known = sorted(settings.sources) + sorted(settings.dicom_destinations)
    raise ConfigError(
        f"{name!r} is not under sources: or a DICOM destination, nor AET@HOST:PORT"
        + (f" (known: {', '.join(known)})" if known else "")
    )


def _ae(calling_ae_title: str, source: Source) -> AE:
    ae = AE(ae_title=calling_ae_title)
    timeout = source.timeout_seconds
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae


def _check_reachable(source: Source) -> None:
    """Connect once ourselves, so that a PACS that is down gives a clear error (pynetdicom
    leaks the socket of a refused connection)."""
    try:
        with socket.create_connection((source.host, source.port), timeout=source.timeout_seconds):
            pass
    except OSError as exc:
        raise RetrieveError(
            f"could not connect to {source.ae_title}@{source.host}:{source.port}: "
            f"{exc.strerror or exc}: is the PACS running, and are its host and port right?"
        ) from exc


@contextlib.contextmanager
def _association(
    ae: AE,
    source: Source,
    *,
    ext_neg: Sequence[Any] | None = None,
    handlers: Sequence[Any] | None = None,
) -> Iterator[Any]:
    """An established association with ``source``, released (and its socket closed) on exit."""
    _check_reachable(source)
    try:
        context: ssl.SSLContext | None = tls_context(source.tls)
    except DeliveryError as exc:
        raise RetrieveError(f"TLS settings of the source: {exc}") from exc
    assoc = ae.associate(
        source.host,
        source.port,
        ae_title=source.ae_title,
        ext_neg=list(ext_neg) if ext_neg else None,
        evt_handlers=list(handlers) if handlers else None,
        tls_args=(context, source.host) if context is not None else None,
    )
    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    try:
        if not assoc.is_established:
            why = (
                "association rejected (does the PACS know this AE title?)"
                if assoc.is_rejected
                else "no association (refused, aborted or timed out)"
            )
            raise RetrieveError(f"{source.ae_title}@{source.host}:{source.port}: {why}")
        yield assoc
        if assoc.is_established:
            assoc.release()
    finally:
        if assoc.is_established:
            assoc.abort()
        if isinstance(raw, socket.socket):
            raw.close()


def find_studies(source: Source, query: StudyQuery, *, calling_ae_title: str) -> list[FoundStudy]:
    """C-FIND (Study Root, STUDY level): the studies on ``source`` matching ``query``.

    Raises
    ------
    RetrieveError
        If the PACS cannot be reached, refuses the association or the query, or answers a
        failure status.
    """
    ae = _ae(calling_ae_title, source)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    found: dict[str, FoundStudy] = {}
    with _association(ae, source) as assoc:
        for status, identifier in assoc.send_c_find(
            query.identifier(), StudyRootQueryRetrieveInformationModelFind
        ):
            if "Status" not in status:
                raise RetrieveError(
                    f"{source.ae_title} gave no answer to the C-FIND: it aborted the association "
                    "or timed out (does it allow queries from this AE title and host?)"
                )
            code = int(status.Status)
            if code in _PENDING and identifier is not None and "StudyInstanceUID" in identifier:
                study = FoundStudy.from_identifier(identifier)
                found.setdefault(study.study_instance_uid, study)
            elif code not in _PENDING and code != 0x0000:
                raise RetrieveError(
                    f"{source.ae_title} refused the C-FIND with status 0x{code:04X} "
                    f"({str(status.get('ErrorComment', '')).strip() or 'no comment'})"
                )
    studies = list(found.values())
    if query.modality:
        wanted = query.modality.upper()
        studies = [s for s in studies if not s.modalities or wanted in s.modalities]
    return studies


def _count(status: Dataset, keyword: str) -> int | None:
    value = status.get(keyword)
    return int(value) if value not in (None, "") else None


def _follow(
    responses: Iterator[Any], retrieval: StudyRetrieval, on_progress: ProgressCallback | None
) -> None:
    """Read one C-MOVE/C-GET's responses into ``retrieval``."""
    for status, _identifier in responses:
        if "Status" not in status:
            retrieval.status = None
            return
        code = int(status.Status)
        retrieval.remaining = _count(status, "NumberOfRemainingSuboperations")
        for keyword, attribute in (
            ("NumberOfCompletedSuboperations", "completed"),
            ("NumberOfFailedSuboperations", "failed"),
            ("NumberOfWarningSuboperations", "warning"),
        ):
            value = _count(status, keyword)
            if value is not None:
                setattr(retrieval, attribute, value)
        if code in _PENDING:
            if on_progress is not None:
                on_progress(retrieval)
            continue
        retrieval.status = code
        comment = str(status.get("ErrorComment", "")).strip()
        if code != 0x0000 and comment:
            retrieval.error = f"{_status_text(code)}: {comment}"
        return


class _GetReceiver:
    """What :func:`pacsai.scp.handlers.handle_store` needs of a receiver, for the instances a
    C-GET brings back over our own association."""

    def __init__(self, instances: InstanceStore, state: AssociationState) -> None:
        self.instances = instances
        self._state = state

    def state_of(self, assoc: Any) -> AssociationState:
        return self._state


def retrieve_studies(
    source: Source,
    studies: Sequence[FoundStudy],
    *,
    calling_ae_title: str,
    move_destination: str | None = None,
    instances: InstanceStore | None = None,
    quiet_seconds: float = 10.0,
    on_progress: ProgressCallback | None = None,
) -> list[StudyRetrieval]:
    """Fetch each study: C-MOVE to ``move_destination`` or, with ``source.retrieve: get``,
    C-GET into ``instances``. One association carries every study; a study's failure does
    not stop the others.

    Raises
    ------
    RetrieveError
        If the PACS cannot be reached or refuses the association, or the arguments do not fit
        the method (C-MOVE needs ``move_destination``, C-GET needs ``instances``).
    """
    method = source.retrieve
    if method == "move" and not move_destination:
        raise RetrieveError("C-MOVE needs the AE title to move the studies to")
    if method == "get" and instances is None:
        raise RetrieveError("C-GET needs the instance store to keep what arrives")
    results = [StudyRetrieval(study=study, method=method) for study in studies]
    if not results:
        return results
    ae = _ae(calling_ae_title, source)
    roles: list[Any] = []
    handlers: list[Any] = []
    state: AssociationState | None = None
    if method == "move":
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        model = StudyRootQueryRetrieveInformationModelMove
    else:
        assert instances is not None
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        model = StudyRootQueryRetrieveInformationModelGet
        for context in StoragePresentationContexts[:127]:  # 128 contexts at most, one is Get
            assert context.abstract_syntax is not None
            ae.add_requested_context(context.abstract_syntax, TRANSFER_SYNTAXES)
            roles.append(build_role(context.abstract_syntax, scp_role=True))
        state = AssociationState(
            id=str(uuid.uuid4()),
            calling_ae_title=source.ae_title,  # the instances come from the PACS
            called_ae_title=calling_ae_title,
            remote_host=source.host,
            remote_port=source.port,
            tls=source.tls.enabled,
            quiet_seconds=quiet_seconds,
        )
        handlers.append((evt.EVT_C_STORE, handle_store, [_GetReceiver(instances, state)]))
    with _association(ae, source, ext_neg=roles, handlers=handlers) as assoc:
        if state is not None and instances is not None:
            instances.open(state)
        outcome = AssociationOutcome.RELEASED
        try:
            for retrieval in results:
                identifier = Dataset()
                identifier.QueryRetrieveLevel = "STUDY"
                identifier.StudyInstanceUID = retrieval.study.study_instance_uid
                if method == "move":
                    responses = assoc.send_c_move(identifier, move_destination, model)
                else:
                    responses = assoc.send_c_get(identifier, model)
                before = state.stored if state is not None else 0
                _follow(responses, retrieval, on_progress)
                if state is not None:
                    retrieval.stored = state.stored - before
                if not assoc.is_established:
                    outcome = AssociationOutcome.ABORTED
                    for rest in results[results.index(retrieval) + 1 :]:
                        rest.error = "not attempted: the association was lost"
                    break
        finally:
            if state is not None and instances is not None:
                instances.close(state, outcome)
    return results


def audit_retrieval(
    database: Database,
    *,
    actor: str,
    source_name: str,
    source: Source,
    query: StudyQuery,
    found: Sequence[FoundStudy],
    retrievals: Sequence[StudyRetrieval],
) -> None:
    """Record the query (110112) and each study retrieved (110107 Import), in one transaction."""
    with database.transaction() as session:
        append_event(
            session=session,
            event_id=AuditEventId.QUERY,
            action=AuditAction.EXECUTE,
            outcome=AuditOutcome.SUCCESS,
            actor=actor,
            remote_address=source.host,
            detail={
                "what": "C-FIND of a PACS, to retrieve",
                "source": source_name,
                "source_ae_title": source.ae_title,
                "criteria": query.describe(),
                "studies_found": len(found),
            },
        )
        for retrieval in retrievals:
            if retrieval.succeeded:
                outcome = AuditOutcome.SUCCESS
            elif retrieval.completed or retrieval.stored:
                outcome = AuditOutcome.MINOR_FAILURE
            else:
                outcome = AuditOutcome.SERIOUS_FAILURE
            append_event(
                session=session,
                event_id=AuditEventId.IMPORT,
                action=AuditAction.CREATE,
                outcome=outcome,
                actor=actor,
                remote_address=source.host,
                study_instance_uid=retrieval.study.study_instance_uid,
                patient_id=retrieval.study.patient_id,
                detail={
                    "what": f"study retrieved by C-{retrieval.method.upper()}",
                    "source": source_name,
                    "source_ae_title": source.ae_title,
                    "status": retrieval.status_text,
                    "completed": retrieval.completed,
                    "failed": retrieval.failed,
                    "warning": retrieval.warning,
                },
            )
