"""Audit rows as JSON lines, CSV, or DICOM audit messages (PS3.15 A.5.1), streamed.

Every exporter takes an iterable of :class:`~pacsai.db.audit_query.AuditRecord` (typically
:func:`~pacsai.db.audit_query.iter_records`) and yields text chunks, one per row plus a header
and a footer where the format has them, so that a million rows never sit in memory at once.

The DICOM format writes one ``AuditMessage`` per row, following the schema of PS3.15 A.5.1 and
the message descriptions of A.5.3:

- ``EventIdentification``: ``EventID`` (the row's DCM event ID), ``EventTypeCode`` (where the row
  has one), ``EventActionCode``, ``EventDateTime``, ``EventOutcomeIndicator``;
- ``ActiveParticipant``: the actor (``UserID``), with ``NetworkAccessPointID`` = the remote
  address, ``UserIsRequestor`` and a ``RoleIDCode`` where A.5.3 gives one (Application, Source,
  Destination), and this node where it takes part (as destination of a transfer, as the
  reporter of a security alert);
- ``AuditSourceIdentification``: this node's AE title, source type 4 (application server);
- ``ParticipantObjectIdentification``: the study (type 2, role 3 Report, ID type 110180 Study
  Instance UID), the patient (type 1, role 1 Patient, ID type 2 Patient Number), the audit trail
  itself for Audit Log Used (role 13 Security Resource, ID type 12 URI), the alert subject for a
  Security Alert (ID type 110182 Node ID). The model name and version and the row's detail travel
  as ``ParticipantObjectDetail`` values (base64, as the schema requires) on the first object.

A file of several messages wraps them in one ``AuditMessages`` element so that it is a single
well-formed XML document; :func:`audit_message_xml` gives the one-message document a syslog
collector expects (PS3.15 A.5.1, RFC 5424 MSG).
"""

from __future__ import annotations

import base64
import csv
import io
import ipaddress
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Literal

from pacsai.db._audit_record import AUDIT_COLUMNS
from pacsai.db.audit_query import AuditRecord

__all__ = [
    "CSV_COLUMNS",
    "EVENT_ID_MEANINGS",
    "EVENT_TYPE_MEANINGS",
    "EXPORT_FORMATS",
    "ExportFormat",
    "audit_message",
    "audit_message_xml",
    "export_csv",
    "export_dicom_xml",
    "export_jsonl",
    "export_records",
    "neutralise_cell",
]

ExportFormat = Literal["dicom-xml", "jsonl", "csv"]
EXPORT_FORMATS: Final[tuple[ExportFormat, ...]] = ("dicom-xml", "jsonl", "csv")

#: The columns of a CSV export: those of ``audit_events``, in table order.
CSV_COLUMNS: Final = tuple(column.key for column in AUDIT_COLUMNS)

#: Code meanings of the PS3.15 A.5.3 event IDs (DCM), the EventID's ``originalText``.
EVENT_ID_MEANINGS: Final = {
    "110100": "Application Activity",
    "110101": "Audit Log Used",
    "110103": "DICOM Instances Accessed",
    "110104": "DICOM Instances Transferred",
    "110105": "DICOM Study Deleted",
    "110106": "Export",
    "110107": "Import",
    "110112": "Query",
    "110113": "Security Alert",
    "110114": "User Authentication",
}
#: Code meanings of the PS3.15 event type codes (DCM) pacsai uses.
EVENT_TYPE_MEANINGS: Final = {
    "110120": "Application Start",
    "110121": "Application Stop",
    "110126": "Node Authentication",
    "110122": "Login",
    "110123": "Logout",
    "110132": "Use of a restricted function",
}

_DCM = "DCM"
_RFC_3881 = "RFC-3881"
_APPLICATION = ("110150", _DCM, "Application")
_SOURCE = ("110153", _DCM, "Source Role ID")
_DESTINATION = ("110152", _DCM, "Destination Role ID")
_STUDY_UID = ("110180", _DCM, "Study Instance UID")
_NODE_ID = ("110182", _DCM, "Node ID")
_PATIENT_NUMBER = ("2", _RFC_3881, "Patient Number")
_URI = ("12", _RFC_3881, "URI")
_AUDIT_TRAIL_URI = "pacsai:audit_events"
_APPLICATION_EVENT_TYPES = frozenset({"110120", "110121"})
_INBOUND = frozenset({"110104", "110107", "110112"})  # the actor sends to (or asks) this node

# What must be escaped in a double-quoted attribute value (& first).
_ENTITIES: Final = (
    ("&", "&amp;"),
    ("<", "&lt;"),
    (">", "&gt;"),
    ('"', "&quot;"),
    ("\n", "&#10;"),
    ("\r", "&#13;"),
    ("\t", "&#9;"),
)
_SPECIAL = re.compile('[&<>"\n\r\t]')
# First characters that make a spreadsheet read a cell as a formula (and their full-width forms).
_FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
# Characters XML 1.0 cannot carry at all (not even escaped): replaced, never dropped silently.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


# --- JSON lines and CSV ---------------------------------------------------------------------------


def export_jsonl(records: Iterable[AuditRecord]) -> Iterator[str]:
    """One JSON object per line: every column, ``detail`` decoded, the chain hashes included."""
    for record in records:
        yield json.dumps(record.as_json(), separators=(",", ":")) + "\n"


def neutralise_cell(value: str) -> str:
    """``value`` made inert for spreadsheets: prefixed with ``'`` when it starts with a
    character that makes a spreadsheet read a cell as a formula (``= + - @``, their full-width
    forms, tab or carriage return; OWASP "CSV Injection")."""
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def export_csv(records: Iterable[AuditRecord], *, raw: bool = False) -> Iterator[str]:
    """A header line, then one line per row (RFC 4180); ``detail`` is the JSON text as hashed.

    By default a text value that a spreadsheet would run as a formula (an AE title or patient ID
    starting with ``=``, ``+``, ``-`` or ``@``...) is written with a leading ``'`` (see
    :func:`neutralise_cell`). With ``raw`` every value is written exactly as stored, so that the
    hashes can be checked against the file; never open such a file in a spreadsheet.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def line(values: Iterable[Any]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(values)
        return buffer.getvalue()

    def cell(record: AuditRecord, column: str) -> Any:
        if column == "occurred_at":
            return record.occurred_at.isoformat(timespec="microseconds")
        value = getattr(record, column)
        return neutralise_cell(value) if isinstance(value, str) and not raw else value

    yield line(CSV_COLUMNS)
    for record in records:
        yield line(cell(record, column) for column in CSV_COLUMNS)


# --- DICOM PS3.15 A.5.1 ---------------------------------------------------------------------------


def _clean(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _code(parent: ET.Element, tag: str, code: tuple[str, str, str]) -> ET.Element:
    value, scheme, meaning = code
    return ET.SubElement(
        parent, tag, {"csd-code": value, "codeSystemName": scheme, "originalText": meaning}
    )


def _b64(value: str) -> str:
    return base64.b64encode(value.encode("utf-8", "surrogatepass")).decode("ascii")


def _access_point_type(address: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"
    return "2"


def _participant(
    message: ET.Element,
    user_id: str,
    *,
    requestor: bool,
    address: str | None = None,
    role: tuple[str, str, str] | None = None,
) -> None:
    attributes = {"UserID": _clean(user_id), "UserIsRequestor": "true" if requestor else "false"}
    if address:
        attributes["NetworkAccessPointID"] = _clean(address)
        attributes["NetworkAccessPointTypeCode"] = _access_point_type(address)
    element = ET.SubElement(message, "ActiveParticipant", attributes)
    if role is not None:
        _code(element, "RoleIDCode", role)


def _object(
    message: ET.Element,
    object_id: str,
    *,
    type_code: str,
    role: str | None,
    id_type: tuple[str, str, str],
) -> ET.Element:
    attributes = {"ParticipantObjectID": _clean(object_id), "ParticipantObjectTypeCode": type_code}
    if role is not None:
        attributes["ParticipantObjectTypeCodeRole"] = role
    element = ET.SubElement(message, "ParticipantObjectIdentification", attributes)
    _code(element, "ParticipantObjectIDTypeCode", id_type)
    return element


def _details(record: AuditRecord) -> list[tuple[str, str]]:
    """The ParticipantObjectDetail (type, text) pairs of a row: model, detail, chain link."""
    pairs: list[tuple[str, str]] = []
    if record.model_name:
        pairs.append(("ModelName", record.model_name))
    if record.model_version:
        pairs.append(("ModelVersion", record.model_version))
    if record.detail:
        pairs.append(("pacsai:detail", record.detail))
    pairs.append(("pacsai:audit-row", f"{record.id} {record.row_hash}"))
    return pairs


def audit_message(record: AuditRecord, *, audit_source_id: str) -> ET.Element:
    """The ``AuditMessage`` element (PS3.15 A.5.1) of one audit row.

    Parameters
    ----------
    record
        The audit row.
    audit_source_id
        ``AuditSourceID``: the AE title of the node that recorded the event.
    """
    event_id, event_type = record.event_id, record.event_type
    message = ET.Element("AuditMessage")
    identification = ET.SubElement(
        message,
        "EventIdentification",
        {
            "EventActionCode": record.action,
            "EventDateTime": record.occurred_at.isoformat(timespec="microseconds").replace(
                "+00:00", "Z"
            ),
            "EventOutcomeIndicator": str(record.outcome),
        },
    )
    _code(identification, "EventID", (event_id, _DCM, EVENT_ID_MEANINGS.get(event_id, event_id)))
    if event_type:
        meaning = EVENT_TYPE_MEANINGS.get(event_type, event_type)
        _code(identification, "EventTypeCode", (event_type, _DCM, meaning))
    details = record.details or {}

    # Active participants (A.5.3): who did it, and this node where it is the other party.
    if event_id == "110100" and event_type in _APPLICATION_EVENT_TYPES:
        _participant(message, record.actor, requestor=False, role=_APPLICATION)
    elif event_id in _INBOUND:
        _participant(
            message, record.actor, requestor=True, address=record.remote_address, role=_SOURCE
        )
        _participant(message, audit_source_id, requestor=False, role=_DESTINATION)
    elif event_id == "110106":
        _participant(
            message, record.actor, requestor=True, address=record.remote_address, role=_SOURCE
        )
        destination = details.get("destination")
        if isinstance(destination, str) and destination:
            _participant(message, destination, requestor=False, role=_DESTINATION)
    else:
        _participant(message, record.actor, requestor=True, address=record.remote_address)
        if event_id == "110113" and record.actor != audit_source_id:
            _participant(message, audit_source_id, requestor=False)  # the reporting node

    source = ET.SubElement(
        message, "AuditSourceIdentification", {"AuditSourceID": _clean(audit_source_id)}
    )
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server

    # Participant objects: what the event was about.
    objects: list[ET.Element] = []
    if record.study_instance_uid:
        study = _object(
            message, record.study_instance_uid, type_code="2", role="3", id_type=_STUDY_UID
        )
        objects.append(study)
    if record.patient_id:
        objects.append(
            _object(message, record.patient_id, type_code="1", role="1", id_type=_PATIENT_NUMBER)
        )
    if event_id == "110101":
        uri = details.get("uri")
        trail = uri if isinstance(uri, str) and uri else _AUDIT_TRAIL_URI
        objects.append(_object(message, trail, type_code="2", role="13", id_type=_URI))
    if event_id == "110113":
        subject = record.remote_address or record.actor
        alert = _object(message, subject, type_code="2", role=None, id_type=_NODE_ID)
        reason = details.get("reason")
        if isinstance(reason, str) and reason:
            ET.SubElement(
                alert,
                "ParticipantObjectDetail",
                {"type": "Alert Description", "value": _b64(reason)},
            )
        objects.append(alert)
    if objects:
        first = objects[0]
        for kind, text in _details(record):
            ET.SubElement(first, "ParticipantObjectDetail", {"type": kind, "value": _b64(text)})
        if record.study_instance_uid and isinstance(details.get("sop_class_uid"), str):
            _describe_instance(first, details)
    return message


def _describe_instance(study: ET.Element, details: dict[str, Any]) -> None:
    """ParticipantObjectDescription/SOPClass of the one instance a row is about (a SEG, an SR)."""
    description = ET.SubElement(study, "ParticipantObjectDescription")
    sop_class = ET.SubElement(
        description,
        "SOPClass",
        {"UID": _clean(str(details["sop_class_uid"])), "NumberOfInstances": "1"},
    )
    instance = details.get("sop_instance_uid")
    if isinstance(instance, str) and instance:
        ET.SubElement(sop_class, "Instance", {"UID": _clean(instance)})


def _serialize(element: ET.Element, out: list[str]) -> None:
    """Write an element of attributes and children only (what audit messages are made of).

    Several times faster than :func:`xml.etree.ElementTree.tostring`, which spends most of its
    time on namespace handling these messages do not use; attribute values are escaped the same
    way (``& < > "`` and the whitespace characters that attribute normalisation would eat).
    """
    out.append("<" + element.tag)
    for name, raw_value in element.attrib.items():
        # Every value is cleaned here, once: whatever a row holds (an AE title, a description,
        # an ID with control characters, a tampered code), the document stays well formed.
        value = _clean(raw_value)
        if _SPECIAL.search(value):
            for character, entity in _ENTITIES:
                value = value.replace(character, entity)
        out.append(f' {name}="{value}"')
    if len(element):
        out.append(">")
        for child in element:
            _serialize(child, out)
        out.append(f"</{element.tag}>")
    else:
        out.append(" />")


def _to_text(element: ET.Element) -> str:
    out: list[str] = []
    _serialize(element, out)
    return "".join(out)


def audit_message_xml(record: AuditRecord, *, audit_source_id: str) -> str:
    """One audit row as a complete XML document holding one ``AuditMessage``."""
    body = _to_text(audit_message(record, audit_source_id=audit_source_id))
    return '<?xml version="1.0" encoding="UTF-8"?>' + body


def export_dicom_xml(records: Iterable[AuditRecord], *, audit_source_id: str) -> Iterator[str]:
    """One XML document: ``AuditMessages`` holding an ``AuditMessage`` per row, streamed."""
    yield (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<!-- Each AuditMessage follows the DICOM audit message schema, PS3.15 A.5.1. -->\n"
        "<AuditMessages>\n"
    )
    for record in records:
        yield _to_text(audit_message(record, audit_source_id=audit_source_id)) + "\n"
    yield "</AuditMessages>\n"


def export_records(
    records: Iterable[AuditRecord],
    fmt: ExportFormat,
    *,
    audit_source_id: str,
    raw_csv: bool = False,
) -> Iterator[str]:
    """Stream `records` in one of :data:`EXPORT_FORMATS` (``raw_csv``: see :func:`export_csv`).

    Raises
    ------
    ValueError
        If `fmt` is not one of :data:`EXPORT_FORMATS`.
    """
    exporters: dict[str, Callable[[Iterable[AuditRecord]], Iterator[str]]] = {
        "jsonl": export_jsonl,
        "csv": lambda rows: export_csv(rows, raw=raw_csv),
        "dicom-xml": lambda rows: export_dicom_xml(rows, audit_source_id=audit_source_id),
    }
    if fmt not in exporters:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    return exporters[fmt](records)
