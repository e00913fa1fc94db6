"""Audit exports (DICOM PS3.15 A.5.1 XML, JSON lines, CSV), syslog framing, filters and cursors.

No database: records are built as the chain builds them, so that the hashes are real.
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from pacsai.audit_syslog import frame, syslog_message
from pacsai.db import AuditEvent
from pacsai.db.audit import GENESIS_HASH, row_digest
from pacsai.db.audit_export import (
    CSV_COLUMNS,
    EVENT_ID_MEANINGS,
    audit_message,
    audit_message_xml,
    export_csv,
    export_dicom_xml,
    export_jsonl,
    export_records,
    neutralise_cell,
)
from pacsai.db.audit_query import (
    AuditFilter,
    AuditQueryError,
    AuditRecord,
    decode_cursor,
    encode_cursor,
    parse_time,
)

NODE = "PACSAI"
T0 = datetime(2026, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)
STUDY = "1.2.826.0.1.3680043.8.498.1"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def chain(*rows: dict[str, Any]) -> list[AuditRecord]:
    """Records linked as :func:`pacsai.db.audit.append_event` links them."""
    records: list[AuditRecord] = []
    previous = GENESIS_HASH
    for index, row in enumerate(rows, start=1):
        fields: dict[str, Any] = {
            "occurred_at": T0 + timedelta(seconds=index),
            "event_type": None,
            "action": "C",
            "outcome": 0,
            "actor": "ORTHANC",
            "remote_address": None,
            "study_instance_uid": None,
            "patient_id": None,
            "model_name": None,
            "model_version": None,
            "detail": None,
            **row,
        }
        if isinstance(fields["detail"], dict):
            fields["detail"] = json.dumps(fields["detail"], sort_keys=True)
        event = AuditEvent(id=index, prev_hash=previous, **fields)
        event.row_hash = row_digest(event)
        records.append(AuditRecord.from_row(event))
        previous = event.row_hash
    return records


TRANSFER = {
    "event_id": "110104",
    "actor": "CT_SCANNER",
    "remote_address": "10.1.2.3",
    "study_instance_uid": STUDY,
    "patient_id": "PAT-0042",
    "detail": {"instances": 64, "association_id": "a1"},
}
INFERENCE = {
    "event_id": "110103",
    "action": "C",
    "actor": NODE,
    "study_instance_uid": STUDY,
    "patient_id": "PAT-0042",
    "model_name": "ct_abdomen_demo",
    "model_version": "0.1.0+0123456789ab",
    "detail": {"object": "SEG", "sop_class_uid": SEG, "sop_instance_uid": "1.2.3.4.5"},
}
START = {"event_id": "110100", "event_type": "110120", "action": "E", "actor": NODE}
EXPORT = {
    "event_id": "110106",
    "action": "R",
    "actor": NODE,
    "study_instance_uid": STUDY,
    "patient_id": "PAT-0042",
    "outcome": 8,
    "detail": {"destination": "pacs", "status": "RETRYING"},
}
AUDIT_READ = {
    "event_id": "110101",
    "action": "R",
    "actor": "api:alice",
    "remote_address": "192.0.2.7",
    "patient_id": "PAT-0042",
    "detail": {"route": "GET /audit", "uri": "/api/v1/audit"},
}
ALERT = {
    "event_id": "110113",
    "event_type": "110126",
    "action": "E",
    "outcome": 4,
    "actor": "INTRUDER",
    "remote_address": "203.0.113.9",
    "detail": {"reason": "calling AE title not allowed"},
}
QUERY = {"event_id": "110112", "action": "E", "actor": "api:bob", "remote_address": "host.example"}
ALL_KINDS = (TRANSFER, INFERENCE, START, EXPORT, AUDIT_READ, ALERT, QUERY)


def _b64(element: ET.Element) -> str:
    return base64.b64decode(element.attrib["value"]).decode("utf-8")


def _details(obj: ET.Element) -> dict[str, str]:
    return {d.attrib["type"]: _b64(d) for d in obj.findall("ParticipantObjectDetail")}


def _objects(message: ET.Element) -> dict[str, ET.Element]:
    """Participant objects by their ID type code."""
    found = {}
    for obj in message.findall("ParticipantObjectIdentification"):
        id_type = obj.find("ParticipantObjectIDTypeCode")
        assert id_type is not None
        found[id_type.attrib["csd-code"]] = obj
    return found


# --- the DICOM audit message ----------------------------------------------------------------------

# Children in the order of the PS3.15 A.5.1 schema (an element may repeat or be absent).
_ORDER = {
    "AuditMessage": [
        "EventIdentification",
        "ActiveParticipant",
        "AuditSourceIdentification",
        "ParticipantObjectIdentification",
    ],
    "EventIdentification": ["EventID", "EventTypeCode", "EventOutcomeDescription"],
    "ActiveParticipant": ["RoleIDCode", "MediaIdentifier"],
    "AuditSourceIdentification": ["AuditSourceTypeCode"],
    "ParticipantObjectIdentification": [
        "ParticipantObjectIDTypeCode",
        "ParticipantObjectName",
        "ParticipantObjectDetail",
        "ParticipantObjectDescription",
    ],
}
_CODED = {"EventID", "EventTypeCode", "RoleIDCode", "ParticipantObjectIDTypeCode"}


def assert_schema_shape(message: ET.Element) -> None:
    """What the A.5.1 schema requires of the elements pacsai writes."""
    assert message.tag == "AuditMessage"
    for element in message.iter():
        if element.tag in _ORDER:
            tags = [child.tag for child in element]
            allowed = _ORDER[element.tag]
            assert set(tags) <= set(allowed), (element.tag, tags)
            assert tags == sorted(tags, key=allowed.index), (element.tag, tags)
        if element.tag in _CODED:
            assert {"csd-code", "codeSystemName", "originalText"} <= set(element.attrib)
    event = message.find("EventIdentification")
    assert event is not None
    assert event.attrib["EventActionCode"] in {"C", "R", "U", "D", "E"}
    assert event.attrib["EventOutcomeIndicator"] in {"0", "4", "8", "12"}
    datetime.fromisoformat(event.attrib["EventDateTime"])  # an xsd:dateTime with its zone
    assert message.findall("ActiveParticipant")
    for participant in message.findall("ActiveParticipant"):
        assert participant.attrib["UserIsRequestor"] in {"true", "false"}
        assert participant.attrib["UserID"]
    assert len(message.findall("AuditSourceIdentification")) == 1
    for obj in message.findall("ParticipantObjectIdentification"):
        assert obj.attrib["ParticipantObjectID"]
        assert obj.attrib["ParticipantObjectTypeCode"] in {"1", "2", "3", "4"}
        for detail in obj.findall("ParticipantObjectDetail"):
            base64.b64decode(detail.attrib["value"], validate=True)


@pytest.mark.parametrize("row", ALL_KINDS, ids=lambda row: row["event_id"])
def test_each_event_kind_is_a_well_formed_audit_message(row: dict[str, Any]) -> None:
    (record,) = chain(row)

    document = audit_message_xml(record, audit_source_id=NODE)
    message = ET.fromstring(document)

    assert document.startswith('<?xml version="1.0" encoding="UTF-8"?><AuditMessage>')
    assert_schema_shape(message)
    event_id = message.find("EventIdentification/EventID")
    assert event_id is not None
    assert event_id.attrib == {
        "csd-code": row["event_id"],
        "codeSystemName": "DCM",
        "originalText": EVENT_ID_MEANINGS[row["event_id"]],
    }
    source = message.find("AuditSourceIdentification")
    assert source is not None and source.attrib["AuditSourceID"] == NODE


def test_a_transfer_names_source_destination_study_and_patient() -> None:
    (record,) = chain(TRANSFER)

    message = audit_message(record, audit_source_id=NODE)

    event = message.find("EventIdentification")
    assert event is not None
    assert event.attrib == {
        "EventActionCode": "C",
        "EventDateTime": "2026-03-01T08:30:16.123456Z",
        "EventOutcomeIndicator": "0",
    }
    sender, receiver = message.findall("ActiveParticipant")
    assert sender.attrib == {
        "UserID": "CT_SCANNER",
        "UserIsRequestor": "true",
        "NetworkAccessPointID": "10.1.2.3",
        "NetworkAccessPointTypeCode": "2",
    }
    assert sender.find("RoleIDCode").attrib["csd-code"] == "110153"  # type: ignore[union-attr]
    assert receiver.attrib == {"UserID": NODE, "UserIsRequestor": "false"}
    assert receiver.find("RoleIDCode").attrib["csd-code"] == "110152"  # type: ignore[union-attr]
    objects = _objects(message)
    study, patient = objects["110180"], objects["2"]
    assert study.attrib == {
        "ParticipantObjectID": STUDY,
        "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3",
    }
    assert study.find("ParticipantObjectIDTypeCode").attrib == {  # type: ignore[union-attr]
        "csd-code": "110180",
        "codeSystemName": "DCM",
        "originalText": "Study Instance UID",
    }
    assert patient.attrib == {
        "ParticipantObjectID": "PAT-0042",
        "ParticipantObjectTypeCode": "1",
        "ParticipantObjectTypeCodeRole": "1",
    }
    assert patient.find("ParticipantObjectIDTypeCode").attrib == {  # type: ignore[union-attr]
        "csd-code": "2",
        "codeSystemName": "RFC-3881",
        "originalText": "Patient Number",
    }
    details = _details(study)
    assert json.loads(details["pacsai:detail"]) == TRANSFER["detail"]
    assert details["pacsai:audit-row"] == f"1 {record.row_hash}"


def test_an_inference_carries_the_model_and_the_object_written() -> None:
    (record,) = chain(INFERENCE)

    message = audit_message(record, audit_source_id=NODE)

    (participant,) = message.findall("ActiveParticipant")
    assert participant.attrib == {"UserID": NODE, "UserIsRequestor": "true"}
    study = _objects(message)["110180"]
    details = _details(study)
    assert details["ModelName"] == "ct_abdomen_demo"
    assert details["ModelVersion"] == "0.1.0+0123456789ab"
    sop_class = study.find("ParticipantObjectDescription/SOPClass")
    assert sop_class is not None
    assert sop_class.attrib == {"UID": SEG, "NumberOfInstances": "1"}
    assert sop_class.find("Instance").attrib == {"UID": "1.2.3.4.5"}  # type: ignore[union-attr]


def test_application_start_is_the_application_with_its_event_type() -> None:
    (record,) = chain(START)

    message = audit_message(record, audit_source_id=NODE)

    event_type = message.find("EventIdentification/EventTypeCode")
    assert event_type is not None
    assert event_type.attrib == {
        "csd-code": "110120",
        "codeSystemName": "DCM",
        "originalText": "Application Start",
    }
    (application,) = message.findall("ActiveParticipant")
    assert application.attrib == {"UserID": NODE, "UserIsRequestor": "false"}
    assert application.find("RoleIDCode").attrib["csd-code"] == "110150"  # type: ignore[union-attr]
    assert message.findall("ParticipantObjectIdentification") == []


def test_an_export_names_its_destination_and_outcome() -> None:
    (record,) = chain(EXPORT)

    message = audit_message(record, audit_source_id=NODE)

    assert message.find("EventIdentification").attrib["EventOutcomeIndicator"] == "8"  # type: ignore[union-attr]
    users = {p.attrib["UserID"]: p for p in message.findall("ActiveParticipant")}
    assert set(users) == {NODE, "pacs"}
    assert users["pacs"].find("RoleIDCode").attrib["csd-code"] == "110152"  # type: ignore[union-attr]


def test_audit_log_used_names_the_trail_as_a_security_resource() -> None:
    (record,) = chain(AUDIT_READ)

    message = audit_message(record, audit_source_id=NODE)

    (requestor,) = message.findall("ActiveParticipant")
    assert requestor.attrib["UserID"] == "api:alice"
    assert requestor.attrib["NetworkAccessPointID"] == "192.0.2.7"
    trail = _objects(message)["12"]
    assert trail.attrib == {
        "ParticipantObjectID": "/api/v1/audit",
        "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "13",
    }
    assert "2" in _objects(message)  # the patient whose events were read


def test_a_security_alert_names_the_subject_and_the_reporting_node() -> None:
    (record,) = chain(ALERT)

    message = audit_message(record, audit_source_id=NODE)

    users = {p.attrib["UserID"]: p.attrib for p in message.findall("ActiveParticipant")}
    assert users["INTRUDER"]["UserIsRequestor"] == "true"
    assert users[NODE]["UserIsRequestor"] == "false"
    subject = _objects(message)["110182"]
    assert subject.attrib["ParticipantObjectID"] == "203.0.113.9"
    assert _details(subject)["Alert Description"] == "calling AE title not allowed"


def test_a_host_name_is_a_machine_name_access_point() -> None:
    (record,) = chain(QUERY)

    participant = audit_message(record, audit_source_id=NODE).find("ActiveParticipant")

    assert participant is not None
    assert participant.attrib["NetworkAccessPointTypeCode"] == "1"


@pytest.mark.parametrize(
    "hostile",
    [
        '"><Injected attr="1"/><x',
        "A&B <c> 'quoted' \"double\"",
        "nul\x00bell\x07esc\x1b",
        "lone surrogate \ud800 end",
        "ümlaut ☢ 𝄞",
        "tab\tnew\nline\rreturn",
    ],
)
def test_hostile_values_stay_inside_their_attributes(hostile: str) -> None:
    (record,) = chain({**TRANSFER, "actor": hostile, "detail": {"reason": hostile}})

    message = ET.fromstring(audit_message_xml(record, audit_source_id=NODE))

    assert message.find(".//Injected") is None
    user_id = message.find("ActiveParticipant").attrib["UserID"]  # type: ignore[union-attr]
    printable = hostile.replace("\x00", "\ufffd").replace("\x07", "\ufffd")
    printable = printable.replace("\x1b", "\ufffd").replace("\ud800", "\ufffd")
    assert user_id == printable
    detail = _details(_objects(message)["110180"])["pacsai:detail"]
    assert json.loads(detail)["reason"] == hostile  # base64 keeps it byte for byte


def test_the_xml_export_is_one_document_streamed_row_by_row() -> None:
    records = chain(*ALL_KINDS)
    consumed: list[int] = []

    def feed() -> Iterator[AuditRecord]:
        for record in records:
            consumed.append(record.id)
            yield record

    chunks = export_dicom_xml(feed(), audit_source_id=NODE)
    header = next(chunks)
    assert consumed == []  # nothing read before it is needed
    first = next(chunks)
    assert consumed == [1]
    document = header + first + "".join(chunks)

    root = ET.fromstring(document)
    assert root.tag == "AuditMessages"
    messages = root.findall("AuditMessage")
    assert len(messages) == len(records)
    for message in messages:
        assert_schema_shape(message)
    assert [m.find("EventIdentification/EventID").attrib["csd-code"] for m in messages] == [  # type: ignore[union-attr]
        row["event_id"] for row in ALL_KINDS
    ]


def test_an_empty_xml_export_is_still_a_document() -> None:
    root = ET.fromstring("".join(export_dicom_xml([], audit_source_id=NODE)))
    assert root.tag == "AuditMessages" and len(root) == 0


# --- JSON lines and CSV ---------------------------------------------------------------------------


def _reparsed(data: dict[str, Any]) -> AuditEvent:
    """An AuditEvent from an exported row, to recompute its hash."""
    fields = dict(data)
    fields["occurred_at"] = datetime.fromisoformat(fields["occurred_at"])
    fields["outcome"] = int(fields["outcome"])
    fields["id"] = int(fields["id"])
    return AuditEvent(**fields)


def test_jsonl_rows_round_trip_and_their_hashes_can_be_checked() -> None:
    records = chain(*ALL_KINDS)

    lines = "".join(export_jsonl(records)).splitlines()

    assert len(lines) == len(records)
    for line, record in zip(lines, records, strict=True):
        data = json.loads(line)
        assert list(data) == [column for column in CSV_COLUMNS]
        assert data["detail"] == record.details
        data["detail"] = (
            None if data["detail"] is None else json.dumps(data["detail"], sort_keys=True)
        )
        event = _reparsed(data)
        assert row_digest(event) == record.row_hash  # an export can be verified offline


def test_csv_quotes_what_needs_quoting_and_keeps_the_hashed_text() -> None:
    records = chain(
        *ALL_KINDS, {**TRANSFER, "actor": 'AE,with "quotes"', "detail": {"note": "line\nbreak"}}
    )

    text = "".join(export_csv(records))
    rows = list(csv.DictReader(io.StringIO(text, newline="")))

    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(records)
    assert rows[-1]["actor"] == 'AE,with "quotes"'
    for row, record in zip(rows, records, strict=True):
        data: dict[str, Any] = {k: (v if v != "" else None) for k, v in row.items()}
        assert row_digest(_reparsed(data)) == record.row_hash


FORMULAS = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "\rCR", "\uff1d1+1"]


def test_csv_neutralises_formulas_by_default_and_raw_keeps_them_for_hash_checks() -> None:
    hostile = [
        {
            **TRANSFER,
            "actor": formula,
            "patient_id": formula,
            "remote_address": formula[:20],
            "detail": {"SeriesDescription": formula},
        }
        for formula in FORMULAS
    ]
    records = chain(*hostile)

    safe = list(csv.DictReader(io.StringIO("".join(export_csv(records)), newline="")))
    raw = list(csv.DictReader(io.StringIO("".join(export_csv(records, raw=True)), newline="")))

    for row, formula in zip(safe, FORMULAS, strict=True):
        for column in ("actor", "patient_id", "remote_address"):
            assert row[column].startswith("'") and row[column][1:].startswith(formula[:20])
            assert row[column][0] not in "=+-@\t\r"
        assert row["detail"].startswith("{")  # JSON is never a formula
        assert row["id"].isdigit() and row["outcome"] == "0"  # numbers stay numbers
    for row, record in zip(raw, records, strict=True):
        assert row["actor"] == record.actor
        data: dict[str, Any] = {k: (v if v != "" else None) for k, v in row.items()}
        assert row_digest(_reparsed(data)) == record.row_hash
    via = "".join(export_records(records, "csv", audit_source_id=NODE, raw_csv=True))
    assert via == "".join(export_csv(records, raw=True))
    assert neutralise_cell("plain") == "plain" and neutralise_cell("a=b") == "a=b"


CONTROLS = "".join(chr(c) for c in range(32)) + "\x7f\ud800\ufffe\uffff"


def test_the_xml_export_stays_well_formed_whatever_any_column_holds() -> None:
    """Control characters, markup and lone surrogates in every text column, the coded ones
    included (a tampered row must still export as a document that names it)."""
    hostile = f'{CONTROLS}"><x a="1"/>&amp;<!--'
    rows = [
        {
            **kind,
            "actor": hostile,
            "remote_address": hostile,
            "study_instance_uid": hostile,
            "patient_id": hostile,
            "model_name": hostile,
            "model_version": hostile,
            "detail": {"destination": hostile, "reason": hostile, "uri": hostile},
        }
        for kind in ALL_KINDS
    ]
    records = [
        replace(record, event_id=record.event_id + hostile, event_type=hostile, action=hostile)
        for record in chain(*rows)
    ]

    document = "".join(export_dicom_xml(records, audit_source_id=hostile))
    root = ET.fromstring(document)

    assert root.tag == "AuditMessages" and len(root) == len(records)
    assert root.find(".//x") is None
    for message in root:
        for element in message.iter():
            for value in element.attrib.values():
                assert not any(ord(c) < 32 and c not in "\t\n\r" for c in value)
    single = audit_message_xml(records[0], audit_source_id=hostile)
    assert ET.fromstring(single).tag == "AuditMessage"
    for line in "".join(export_jsonl(records)).splitlines():
        assert json.loads(line)["actor"] == records[0].actor  # JSON escapes, one line per row


def test_export_records_dispatches_and_refuses_unknown_formats() -> None:
    records = chain(TRANSFER)
    assert "".join(export_records(records, "jsonl", audit_source_id=NODE)).count("\n") == 1
    assert "".join(export_records(records, "csv", audit_source_id=NODE)).startswith("id,")
    assert "<AuditMessages>" in "".join(export_records(records, "dicom-xml", audit_source_id=NODE))
    with pytest.raises(ValueError, match="format must be one of"):
        export_records(records, "pdf", audit_source_id=NODE)  # type: ignore[arg-type]


# --- syslog ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("outcome", "pri"), [(0, 85), (4, 84), (8, 83), (12, 83)])
def test_a_syslog_message_is_rfc_5424_with_the_audit_message_as_msg(outcome: int, pri: int) -> None:
    (record,) = chain({**TRANSFER, "outcome": outcome, "actor": "ÜBER AE"})

    message = syslog_message(
        record, audit_source_id=NODE, hostname="node 1.example", app_name="pacsai", procid=4242
    )

    header, _, body = message.partition(b" <?xml")
    assert header.decode("ascii").split(" ") == [
        f"<{pri}>1",
        "2026-03-01T08:30:16.123456Z",
        "node_1.example",  # a space is not allowed in HOSTNAME
        "pacsai",
        "4242",
        "IHE+RFC-3881",
        "-",
    ]
    assert not body.startswith(b"\xef\xbb\xbf")  # no BOM (IHE ITI CP 477)
    xml = ET.fromstring(b"<?xml" + body)
    assert xml.find("ActiveParticipant").attrib["UserID"] == "ÜBER AE"  # type: ignore[union-attr]


def test_octet_counting_frames_count_bytes_not_characters() -> None:
    (record,) = chain({**TRANSFER, "actor": "☢☢☢"})
    message = syslog_message(record, audit_source_id=NODE, hostname="h", app_name="a")

    framed = frame(message)

    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest) == len(message)
    assert len(message) > len(message.decode("utf-8"))


# --- filters and cursors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"event_ids": ("11010x",)}, "event_id"),
        ({"event_types": ("",)}, "event_type"),
        ({"actor": ""}, "actor"),
        ({"actor": "a" * 129}, "actor"),
        ({"patient_id": "P\x00"}, "patient_id"),
        ({"study_instance_uid": "1.2\n"}, "study_uid"),
        ({"outcomes": (5,)}, "outcome"),
        ({"outcomes": (True,)}, "outcome"),
        ({"since": datetime(2026, 1, 1)}, "time zone"),
    ],
)
def test_malformed_filters_are_refused_with_a_reason(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(AuditQueryError, match=message):
        AuditFilter(**kwargs)


def test_filter_times_are_normalised_to_utc() -> None:
    tokyo = timezone(timedelta(hours=9))
    audit_filter = AuditFilter(since=datetime(2026, 1, 1, 9, tzinfo=tokyo))
    assert audit_filter.since == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_time("2026-01-01") == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_time("2026-01-01T09:00+09:00") == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(AuditQueryError, match="ISO 8601"):
        parse_time("yesterday")


def test_a_cursor_round_trips_and_is_short() -> None:
    audit_filter = AuditFilter(patient_id="P" * 64, event_ids=("110104", "110106"))
    cursor = encode_cursor(2**31 - 1, newest_first=True, filters=audit_filter)
    assert len(cursor) <= 64
    assert decode_cursor(cursor, newest_first=True, filters=audit_filter) == 2**31 - 1


@pytest.mark.parametrize(
    "cursor",
    ["", "!!!", "bm90IGEgY3Vyc29y", base64.urlsafe_b64encode(b"a1.n.-1.000000000000").decode()],
)
def test_a_malformed_cursor_is_refused(cursor: str) -> None:
    with pytest.raises(AuditQueryError, match="malformed"):
        decode_cursor(cursor, newest_first=True, filters=AuditFilter())


def test_a_cursor_is_refused_with_other_filters_or_order() -> None:
    mine = AuditFilter(actor="ORTHANC")
    cursor = encode_cursor(10, newest_first=True, filters=mine)
    with pytest.raises(AuditQueryError, match="other filters"):
        decode_cursor(cursor, newest_first=True, filters=AuditFilter(actor="OTHER"))
    with pytest.raises(AuditQueryError, match="other filters or order"):
        decode_cursor(cursor, newest_first=False, filters=mine)


def test_records_are_immutable_values() -> None:
    (record,) = chain(TRANSFER)
    with pytest.raises(AttributeError):
        record.actor = "MALLORY"  # type: ignore[misc]
    assert replace(record, actor="X").actor == "X"
    assert record.as_json()["occurred_at"] == "2026-03-01T08:30:16.123456+00:00"
    assert list(itertools.islice(export_jsonl([record]), 1))
