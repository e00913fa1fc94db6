"""A study's AI results to a RIS as an HL7 v2.5.1 ORU^R01 message over MLLP.

The message is built and validated with hl7apy against the v2.5.1 ORU_R01 structure, never by
joining strings, and every text value is escaped by hl7apy's own data types:

- MSH: the destination's applications and facilities, MSH-10 = :attr:`StudyResult.key` (the
  same on every attempt, so a RIS can drop a repeat), MSH-11 processing ID, MSH-18 UTF-8.
- PID (only when the study has a patient ID): PID-3 = the patient ID (``^^^authority^MR``).
  PID-5 is required by v2.5.1, and no name leaves pacsai: it is sent empty with name type ``S``
  (HL7 table 0200: coded pseudo-name to ensure anonymity).
- ORC-1 ``RE``; OBR-3 (filler order number) = the accession number, OBR-4 LOINC 18748-4
  Diagnostic imaging study, OBR-7 the study time, OBR-25 ``P`` (preliminary: the AI result is not
  verified by a radiologist, as the SR's VerificationFlag says).
- OBX, all with status ``P``:

  ===============  =========================================  ================================
  value type       OBX-3 (observation identifier)             OBX-5
  ===============  =========================================  ================================
  ST               110180^Study Instance UID^DCM              the study
  ST (sub-ID n)    111001^Algorithm Name^DCM                  model n's name
  ST (sub-ID n)    111003^Algorithm Version^DCM               model n's version
  NM (sub-ID n)    label^label^99PACSAI                       volume in mL, or probability in %
  CWE              PRIORITY^AI priority finding^99PACSAI      Y or N (HL7 table 0136)
  ST (SEG.k/SR.k)  112002^Series Instance UID^DCM             the SEG or SR series
  ST (SEG.k/SR.k)  SOPIUID^SOP Instance UID^99PACSAI          the SEG or SR instance
  RP               LINK^Study in pacsai^99PACSAI              the console/API link
  ===============  =========================================  ================================

  A finding's OBX-8 (abnormal flag) is ``A`` when present and ``N`` when absent, and an NTE
  after it says ``Present`` or ``Absent`` in words; the priority OBX has OBX-8 ``AA`` and one NTE
  per reason.

Acknowledgements (original mode, MSA-1): ``AA``/``CA`` is sent. ``AE``, ``AR`` and ``CE`` are
retried: AR means the receiver could not process the message for reasons unrelated to its
content (system down), and an AE from a RIS is commonly "order not known yet", which a later
attempt gets past; the last attempt dead-letters it. ``CR`` (commit reject: the receiver does not
take this message type, version or processing ID) is permanent, as is a message pacsai cannot
build. A refused connection, a timeout or an answer that is not an ACK of this message is retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message, Segment
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from hl7apy.v2_5_1 import FT, ST

from pacsai.config import Hl7Destination
from pacsai.errors import DeliveryError
from pacsai.mllp import exchange
from pacsai.reporting.delivery import DeliveryFailure
from pacsai.reporting.delivery import tls_context as tls_context
from pacsai.reporting.study_result import Finding, StudyResult

__all__ = ["Acknowledgement", "build_oru", "send_oru"]

VERSION = "2.5.1"
LOCAL = "99PACSAI"  # HL7 table 0396: 99zzz, a local coding system
_DCM = "DCM"
_ACCEPTED = ("AA", "CA")
_PERMANENT = ("CR",)


def _text(value: str) -> str:
    """``value`` with HL7's delimiters escaped (``|`` -> ``\\F\\``, ``^`` -> ``\\S\\``, ...)."""
    escaped: str = FT(value).to_er7()
    return escaped


def _hl7_time(moment: datetime) -> str:
    """DTM with seconds and the UTC offset (``YYYYMMDDHHMMSS+0000``); a naive time is taken
    as it is, without an offset (DICOM Study Time carries none)."""
    if moment.tzinfo is None:
        return moment.strftime("%Y%m%d%H%M%S")
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _number(value: float) -> str:
    return f"{value:.1f}"


class _Observations:
    """Adds OBX segments (and their NTEs) to an order observation, numbering OBX-1."""

    def __init__(self, order: Group) -> None:
        self.order = order
        self.count = 0

    def add(
        self,
        value_type: str,
        identifier: tuple[str, str, str],
        value: str,
        *,
        sub_id: str | None = None,
        units: tuple[str, str, str] | None = None,
        abnormal_flag: str | None = None,
        notes: tuple[str, ...] = (),
    ) -> Segment:
        self.count += 1
        group = self.order.add_group("ORU_R01_OBSERVATION")
        obx = group.obx
        obx.obx_1 = str(self.count)
        obx.obx_2 = value_type
        code, text, system = identifier
        obx.obx_3.ce_1 = ST(code[:20])
        obx.obx_3.ce_2 = ST(text)
        obx.obx_3.ce_3 = system
        if sub_id is not None:
            obx.obx_4 = _text(sub_id)
        obx.obx_5 = value
        if units is not None:
            obx.obx_6.ce_1 = units[0]
            obx.obx_6.ce_2 = units[1]
            obx.obx_6.ce_3 = units[2]
        if abnormal_flag is not None:
            obx.obx_8 = abnormal_flag
        obx.obx_11 = "P"
        for index, note in enumerate(notes, start=1):
            nte = group.add_segment("NTE")
            nte.nte_1 = str(index)
            nte.nte_3 = _text(note)
        return obx


def _finding(observations: _Observations, finding: Finding, sub_id: str) -> None:
    label = finding.label
    if finding.volume_ml is not None:
        value, units = _number(finding.volume_ml), ("mL", "milliliter", "UCUM")
    else:
        assert finding.probability is not None  # StudyResult checks that one is given
        value, units = _number(finding.probability * 100), ("%", "percent", "UCUM")
    observations.add(
        "NM",
        (label, label, LOCAL),
        value,
        sub_id=sub_id,
        units=units,
        abnormal_flag="A" if finding.present else "N",
        notes=("Present" if finding.present else "Absent",),
    )


def build_oru(
    result: StudyResult, destination: Hl7Destination, *, now: datetime | None = None
) -> Message:
    """The ORU^R01 message of ``result``, validated against the v2.5.1 structure.

    Raises
    ------
    HL7apyException
        If the message does not validate (a value too long for its field, say).
    """
    now = now or datetime.now(UTC)
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = message.msh
    msh.msh_3 = _text(destination.sending_application)
    if destination.sending_facility:
        msh.msh_4 = _text(destination.sending_facility)
    if destination.receiving_application:
        msh.msh_5 = _text(destination.receiving_application)
    if destination.receiving_facility:
        msh.msh_6 = _text(destination.receiving_facility)
    msh.msh_7 = _hl7_time(now)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = result.key
    msh.msh_11 = destination.processing_id
    msh.msh_12 = VERSION
    msh.msh_18 = "UNICODE UTF-8"

    patient_result = message.add_group("ORU_R01_PATIENT_RESULT")
    if result.patient_id:
        pid = patient_result.add_group("ORU_R01_PATIENT").pid
        pid.pid_3.cx_1 = _text(result.patient_id)
        if destination.patient_id_authority:
            pid.pid_3.cx_4 = _text(destination.patient_id_authority)
        pid.pid_3.cx_5 = "MR"
        pid.pid_5.xpn_7 = "S"  # coded pseudo-name: no name is sent
    order = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.orc.orc_1 = "RE"
    obr = order.obr
    obr.obr_1 = "1"
    if result.accession_number:
        obr.obr_3 = _text(result.accession_number)
    obr.obr_4 = "18748-4^Diagnostic imaging study^LN"
    if result.study_time is not None:
        obr.obr_7 = _hl7_time(result.study_time)
    obr.obr_22 = _hl7_time(now)
    obr.obr_24 = "RAD"
    obr.obr_25 = "P"

    observations = _Observations(order)
    observations.add("ST", ("110180", "Study Instance UID", _DCM), result.study_instance_uid)
    sub_ids: dict[str, str] = {}
    for index, run in enumerate(result.models, start=1):
        sub_ids[run.name] = str(index)
        observations.add(
            "ST", ("111001", "Algorithm Name", _DCM), _text(run.name), sub_id=str(index)
        )
        observations.add(
            "ST", ("111003", "Algorithm Version", _DCM), _text(run.version), sub_id=str(index)
        )
    for finding in result.findings:
        _finding(observations, finding, sub_ids[finding.model])
    observations.add(
        "CWE",
        ("PRIORITY", "AI priority finding", LOCAL),
        "Y^Yes^HL70136" if result.priority else "N^No^HL70136",
        abnormal_flag="AA" if result.priority else "N",
        notes=result.priority_reasons,
    )
    counters: dict[str, int] = {}
    for obj in result.objects:
        counters[obj.kind] = counters.get(obj.kind, 0) + 1
        sub_id = f"{obj.kind}.{counters[obj.kind]}"
        observations.add(
            "ST", ("112002", "Series Instance UID", _DCM), obj.series_instance_uid, sub_id=sub_id
        )
        observations.add(
            "ST", ("SOPIUID", "SOP Instance UID", LOCAL), obj.sop_instance_uid, sub_id=sub_id
        )
    if result.link:
        observations.add(
            "RP", ("LINK", "Study in pacsai", LOCAL), f"{_text(result.link)}^PACSAI^TEXT^HTML"
        )
    message.validate()
    return message


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    """What the receiver answered (MSA-1 code, MSA-2 control ID, MSA-3 and ERR text)."""

    code: str
    control_id: str
    text: str

    @classmethod
    def parse(cls, answer: bytes) -> Acknowledgement:
        """Read an ACK, tolerantly (any version, no structure check).

        Raises
        ------
        ValueError
            If ``answer`` is not an HL7 message with an MSA segment.
        """
        try:
            message = parse_message(
                answer.decode("utf-8", errors="replace").replace("\n", "\r"),
                find_groups=False,
                validation_level=VALIDATION_LEVEL.TOLERANT,
            )
        except HL7apyException as exc:
            raise ValueError(f"the answer is not an HL7 message: {exc}") from exc
        segments = {segment.name: segment for segment in reversed(message.children)}
        msa = segments.get("MSA")
        if msa is None:
            raise ValueError("the answer has no MSA segment")
        texts = [msa.msa_3.value or ""]
        if "ERR" in segments:
            texts.append(segments["ERR"].to_er7())
        return cls(
            code=(msa.msa_1.value or "").strip(),
            control_id=(msa.msa_2.value or "").strip(),
            text="; ".join(t for t in texts if t)[:500],
        )


def send_oru(
    result: StudyResult, destination: Hl7Destination, *, now: datetime | None = None
) -> Acknowledgement:
    """Send ``result`` as an ORU^R01 and wait for its ACK; return the (positive) ACK.

    Raises
    ------
    DeliveryFailure
        ``permanent`` for a message that cannot be built, TLS files that cannot be loaded, or a
        commit reject (CR); retryable for a refused connection, a timeout, an answer that is not
        an ACK of this message, and a negative ACK (AE, AR, CE).
    """
    where = f"HL7 {destination.host}:{destination.port}"
    try:
        message = build_oru(result, destination, now=now)
    except HL7apyException as exc:
        raise DeliveryFailure(f"{where}: cannot build the ORU^R01: {exc}", permanent=True) from exc
    payload = message.to_er7().encode("utf-8")
    context = tls_context(destination.tls)
    try:
        answer = exchange(
            destination.host,
            destination.port,
            payload,
            timeout=destination.timeout_seconds,
            ssl_context=context,
        )
    except DeliveryError as exc:
        raise DeliveryFailure(f"{where}: {exc}", permanent=False) from exc
    try:
        ack = Acknowledgement.parse(answer)
    except ValueError as exc:
        raise DeliveryFailure(f"{where}: {exc}", permanent=False) from exc
    if ack.control_id != result.key:
        raise DeliveryFailure(
            f"{where} acknowledged message {ack.control_id!r}, not {result.key!r}", permanent=False
        )
    if ack.code in _ACCEPTED:
        return ack
    raise DeliveryFailure(
        f"{where} answered {ack.code or 'no code'}: {ack.text or '(no text)'}",
        permanent=ack.code in _PERMANENT,
    )
