"""HL7 orders that tell study completion what to expect: ORM^O01 and OMI^O23 over MLLP.

A RIS (or an interface engine) sends an order for a study; pacsai reads from it, tolerantly:

- the **study**: Study Instance UID from IPC-3 (OMI) or ZDS-1 (IHE Scheduled Workflow ORM),
  else the **accession number** from IPC-1 (OMI) or OBR-18 (IHE: Placer Field 1);
- the **series to expect**: one OBX per series, ``OBX-3 = 112002^Series Instance UID^DCM``,
  ``OBX-5`` the Series Instance UID, and optionally the number of its instances in an OBX
  ``INSTANCES^Expected instances^99PACSAI`` (NM) with the same OBX-4 sub-ID; an ``INSTANCES``
  OBX without sub-ID is the number of instances of the whole study;
- **complete now**: ORC-5 (order status) ``CM`` with no series or instances named.

An order naming none of these (a new order, NW, before the exam) records nothing and is
acknowledged AA: the study keeps its quiet window. An order that names what to expect is
recorded (the same order sent again replaces it) and acknowledged AA; one that cannot be read,
or names no study, is answered AE with the reason; another message type is answered AR; a
database failure is answered AR, so that the sender tries again.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from hl7apy.v2_5_1 import FT

from pacsai.config import OrdersSettings
from pacsai.db import Database, utcnow
from pacsai.db.expectations import record_order
from pacsai.errors import InvalidInstanceError, PacsaiError
from pacsai.mllp import MllpServer
from pacsai.scp.uids import validate_uid

__all__ = ["Order", "OrderListener", "acknowledge", "read_order"]

log = logging.getLogger(__name__)

ORDER_TYPES = ("ORM^O01", "OMI^O23")
SERIES_CODE = "112002"  # DCM Series Instance UID
INSTANCES_CODE = "INSTANCES"  # 99PACSAI Expected instances


@dataclass(frozen=True, slots=True)
class Order:
    """What one order message says about its study."""

    control_id: str
    sending_application: str
    reference: str  # identifies the order across messages: sending application | order number
    study_instance_uid: str | None
    accession_number: str | None
    expected_series: dict[str, int | None] = field(default_factory=dict)
    expected_instances: int | None = None
    complete_now: bool = False

    @property
    def expects_something(self) -> bool:
        return bool(self.expected_series or self.expected_instances or self.complete_now)


def _value(segment: object | None, name: str) -> str | None:
    """The text of a field (its first component), or ``None`` when empty or absent."""
    if segment is None:
        return None
    try:
        field_ = getattr(segment, name)
        text = field_.children[0].value if field_.children else field_.value
    except (HL7apyException, AttributeError, IndexError):
        return None
    text = str(text or "").strip()
    return text or None


def _first_component(text: str | None) -> str | None:
    return text.split("^", 1)[0].strip() or None if text else None


def _message_type(msh: object) -> str:
    """MSH-9 as ``TYPE^EVENT``."""
    try:
        field_ = msh.msh_9  # type: ignore[attr-defined]
        parts = [str(c.value or "").strip() for c in field_.children][:2]
    except (HL7apyException, AttributeError):
        return ""
    return "^".join(parts)


def read_order(message: bytes) -> Order:
    """Read an ORM^O01 or OMI^O23.

    Raises
    ------
    ValueError
        If the message cannot be parsed, is of another type (the message says which), names no
        study, or carries a malformed UID or count.
    """
    text = message.decode("utf-8", errors="replace").replace("\r\n", "\r").replace("\n", "\r")
    try:
        parsed = parse_message(
            text.strip("\r"), find_groups=False, validation_level=VALIDATION_LEVEL.TOLERANT
        )
    except HL7apyException as exc:
        raise ValueError(f"not an HL7 v2 message: {exc}") from exc
    segments: dict[str, list[object]] = {}
    for segment in parsed.children:
        segments.setdefault(segment.name, []).append(segment)
    msh = segments["MSH"][0]
    kind = _message_type(msh)
    if kind not in ORDER_TYPES:
        raise ValueError(f"{kind or 'a message without MSH-9'} is not an order (ORM^O01, OMI^O23)")
    control_id = _value(msh, "msh_10") or ""
    sender = _value(msh, "msh_3") or "(unknown)"
    ipc = segments.get("IPC", [None])[0]
    obr = segments.get("OBR", [None])[0]
    orc = segments.get("ORC", [None])[0]
    zds = segments.get("ZDS", [None])[0]
    study = _value(ipc, "ipc_3") or _first_component(_value(zds, "zds_1"))
    accession = _value(ipc, "ipc_1") or _value(obr, "obr_18")
    if study:
        try:
            validate_uid(study, "Study Instance UID")
        except InvalidInstanceError as exc:
            raise ValueError(str(exc)) from exc
    if not study and not accession:
        raise ValueError(
            "the order names no study: give IPC-3 or ZDS-1 (Study Instance UID), or IPC-1 or "
            "OBR-18 (accession number)"
        )
    series: dict[str, int | None] = {}
    series_by_sub_id: dict[str, str] = {}
    counts: dict[str | None, int] = {}
    for obx in segments.get("OBX", []):
        code = _first_component(_value(obx, "obx_3"))
        sub_id = _value(obx, "obx_4")
        value = _first_component(_value(obx, "obx_5"))
        if code == SERIES_CODE and value:
            try:
                validate_uid(value, "Series Instance UID (OBX-5)")
            except InvalidInstanceError as exc:
                raise ValueError(str(exc)) from exc
            series[value] = None
            if sub_id:
                series_by_sub_id[sub_id] = value
        elif code == INSTANCES_CODE and value:
            if not value.isdigit():
                raise ValueError(f"expected instances (OBX-5) must be a whole number: {value!r}")
            counts[sub_id] = int(value)
    for sub_id, count in counts.items():
        if sub_id is not None and sub_id in series_by_sub_id:
            series[series_by_sub_id[sub_id]] = count
    order_number = _value(orc, "orc_2") or _value(obr, "obr_2") or accession or study or control_id
    status = _value(orc, "orc_5")
    expected_instances = counts.get(None)
    return Order(
        control_id=control_id,
        sending_application=sender,
        reference=f"{sender}|{order_number}"[:200],
        study_instance_uid=study or None,
        accession_number=accession[:16] if accession else None,
        expected_series=series,
        expected_instances=expected_instances,
        complete_now=status == "CM" and not series and not expected_instances,
    )


def acknowledge(message: bytes, code: str, text: str = "", *, application: str = "PACSAI") -> bytes:
    """An ACK of ``message`` (original mode) with MSA-1 ``code`` and MSA-3 ``text``, built with
    hl7apy; it echoes the version and control ID of ``message`` when they can be read."""
    try:
        request = parse_message(
            message.decode("utf-8", errors="replace").replace("\n", "\r").strip("\r"),
            find_groups=False,
            validation_level=VALIDATION_LEVEL.TOLERANT,
        )
        msh = request.children[0]
        version = _value(msh, "msh_12") or "2.5.1"
        control_id = _value(msh, "msh_10") or ""
        sender = _value(msh, "msh_3")
        facility = _value(msh, "msh_4")
        trigger = _message_type(msh).partition("^")[2]
    except (HL7apyException, IndexError):
        version, control_id, sender, facility, trigger = "2.5.1", "", None, None, ""
    if version not in ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8"):
        version = "2.5.1"
    ack = Message("ACK", version=version, validation_level=VALIDATION_LEVEL.TOLERANT)
    ack.msh.msh_3 = application
    if sender:
        ack.msh.msh_5 = sender
    if facility:
        ack.msh.msh_6 = facility
    ack.msh.msh_7 = datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
    ack.msh.msh_9 = f"ACK^{trigger}^ACK" if trigger else "ACK"
    ack.msh.msh_10 = uuid.uuid4().hex[:20]
    ack.msh.msh_11 = "P"
    ack.msh.msh_12 = version
    ack.msa.msa_1 = code
    ack.msa.msa_2 = control_id
    if text:
        ack.msa.msa_3 = FT(text[:80]).to_er7()  # escaped: the text may hold | ^ & ~ \
    encoded: str = ack.to_er7()
    return encoded.encode("utf-8")


class OrderListener:
    """Listens for orders over MLLP and records what each expects of its study.

    Parameters
    ----------
    settings
        The ``orders:`` section (host, port, allowed hosts, idle timeout).
    database
        Where expectations are recorded.
    application
        MSH-3 of the ACKs (this node's AE title, say).
    """

    def __init__(
        self, settings: OrdersSettings, database: Database, *, application: str = "PACSAI"
    ) -> None:
        self.settings = settings
        self.database = database
        self.application = application
        self._server = MllpServer(
            settings.host,
            settings.port,
            self.handle,
            allowed_hosts=settings.allowed_hosts,
            idle_timeout=settings.timeout_seconds,
        )

    @property
    def port(self) -> int:
        """The port bound."""
        return self._server.port

    def start(self) -> None:
        """Listen in a background thread (see :meth:`pacsai.mllp.MllpServer.start`)."""
        self._server.start()
        log.info("listening for HL7 orders on %s:%d", self.settings.host, self.port)

    def stop(self) -> None:
        """Stop listening."""
        self._server.stop()

    def handle(self, message: bytes, peer: str) -> bytes:
        """Record what one order expects; the ACK to answer with."""
        try:
            order = read_order(message)
        except ValueError as exc:
            code = "AR" if "is not an order" in str(exc) else "AE"
            log.warning("HL7 order from %s not taken: %s", peer, exc, extra={"action": "order"})
            return acknowledge(message, code, str(exc), application=self.application)
        if not order.expects_something:
            return acknowledge(message, "AA", "nothing to expect", application=self.application)
        try:
            with self.database.transaction() as session:
                record_order(
                    session=session,
                    reference=order.reference,
                    study_instance_uid=order.study_instance_uid,
                    accession_number=order.accession_number,
                    expected_series=order.expected_series,
                    expected_instances=order.expected_instances,
                    complete_now=order.complete_now,
                    actor=f"hl7:{order.sending_application}"[:128],
                    remote_address=peer,
                    now=utcnow(),
                )
        except PacsaiError as exc:
            log.error("could not record an HL7 order: %s", exc, extra={"action": "order"})
            return acknowledge(
                message,
                "AR",
                "could not record the order; send it again",
                application=self.application,
            )
        log.info(
            "HL7 order from %s: %d series, %s instances expected%s",
            order.sending_application,
            len(order.expected_series),
            order.expected_instances if order.expected_instances is not None else "no count of",
            ", complete now" if order.complete_now else "",
            extra={"action": "order_recorded"},
        )
        return acknowledge(message, "AA", application=self.application)
