"""Study completion that knows what to expect: an MPPS step COMPLETED (sent by a pynetdicom SCU)
or an HL7 order naming the series (sent over MLLP) completes a study as soon as all of it has
arrived, long before its quiet window; a study nobody announced still completes on the window."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from pacsai.config import OrdersSettings
from pacsai.db import Job, Study, StudyStatus
from pacsai.db.models import ExpectationState, StudyExpectation
from pacsai.mllp import exchange
from pacsai.reporting.hl7 import Acknowledgement
from pacsai.scp.orders import OrderListener
from pacsai.scu import Target, push
from pacsai.service import Node
from tests.support import db_rows, free_port, make_ct_series, wait_for, write_datasets

QUIET = 60.0  # far longer than any wait below: a job before it came from the expectation


def _push(node: Node, datasets: list[Dataset], folder: Path) -> None:
    summary = push(
        write_datasets(datasets, folder),
        Target("PACSAI", "127.0.0.1", node.receiver.port),
        calling_ae_title="MODALITY",
    )
    assert summary.failed == 0, summary.failures


def _study(node: Node, uid: str) -> Study:
    [study] = db_rows(node.database, Study, Study.study_instance_uid == uid)
    return study


# --- MPPS -----------------------------------------------------------------------------------------


class _Modality:
    """A modality's MPPS SCU (pynetdicom) on one association with the node."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ModalityPerformedProcedureStep)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
        assert self.assoc.is_established

    def create(self, uid: str, study_uid: str, accession: str, status: str = "IN PROGRESS") -> int:
        ds = Dataset()
        step = Dataset()
        step.StudyInstanceUID = study_uid
        step.AccessionNumber = accession
        ds.ScheduledStepAttributesSequence = [step]
        ds.PerformedProcedureStepStatus = status
        ds.PerformedProcedureStepID = "PPS1"
        ds.Modality = "CT"
        ds.PerformedSeriesSequence = []
        answer, _ = self.assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
        return int(answer.Status)

    def complete(
        self, uid: str, series: dict[str, list[Dataset]], status: str = "COMPLETED"
    ) -> int:
        ds = Dataset()
        ds.PerformedProcedureStepStatus = status
        performed = []
        for series_uid, instances in series.items():
            item = Dataset()
            item.SeriesInstanceUID = series_uid
            item.ReferencedImageSequence = []
            for instance in instances:
                reference = Dataset()
                reference.ReferencedSOPClassUID = instance.SOPClassUID
                reference.ReferencedSOPInstanceUID = instance.SOPInstanceUID
                item.ReferencedImageSequence.append(reference)
            performed.append(item)
        ds.PerformedSeriesSequence = performed
        answer, _ = self.assoc.send_n_set(ds, ModalityPerformedProcedureStep, uid)
        return int(answer.Status)

    def release(self) -> None:
        self.assoc.release()


@pytest.fixture
def modality(
    database_url: str, start_node: Callable[..., Node]
) -> Iterator[tuple[Node, _Modality]]:
    """A node (on SQLite, then on PostgreSQL) and a modality associated with it."""
    node = start_node(database_url, node={"study_quiet_seconds": QUIET})
    scu = _Modality(node.receiver.port)
    yield node, scu
    scu.release()


def test_mpps_completed_completes_the_study_once_its_images_are_in(
    modality: tuple[Node, _Modality], tmp_path: Path
) -> None:
    node, scu = modality
    first, second = make_ct_series(3), make_ct_series(2)
    study_uid = first[0].StudyInstanceUID
    for ds in second:
        ds.StudyInstanceUID = study_uid
    mpps_uid = generate_uid()
    assert scu.create(mpps_uid, study_uid, "ACC0001") == 0x0000
    _push(node, first, tmp_path / "first")

    expected = {first[0].SeriesInstanceUID: first, second[0].SeriesInstanceUID: second}
    assert scu.complete(mpps_uid, expected) == 0x0000
    node.completion.run_once()  # one series of the two is in: not complete yet
    assert _study(node, study_uid).status is StudyStatus.RECEIVING

    _push(node, second, tmp_path / "second")
    [job] = wait_for(lambda: db_rows(node.database, Job), timeout=QUIET / 3)
    assert job.instance_count == 5
    study = _study(node, study_uid)
    assert study.status is StudyStatus.COMPLETE
    [step] = db_rows(node.database, StudyExpectation)
    assert (step.source, step.state, step.study_id) == ("MPPS", ExpectationState.MET, study.id)


def test_mpps_statuses(modality: tuple[Node, _Modality]) -> None:
    node, scu = modality
    study_uid, mpps_uid = generate_uid(), generate_uid()
    assert scu.create(mpps_uid, study_uid, "ACC1", status="COMPLETED") == 0x0106
    assert scu.complete(generate_uid(), {}) == 0x0112  # no such step
    assert scu.create(mpps_uid, study_uid, "ACC1") == 0x0000
    assert scu.create(mpps_uid, study_uid, "ACC1") == 0x0111  # duplicate
    assert scu.complete(mpps_uid, {}, status="DISCONTINUED") == 0x0000
    assert scu.complete(mpps_uid, {}) == 0xA710  # may no longer be updated
    [step] = db_rows(node.database, StudyExpectation)
    assert step.state is ExpectationState.DISCONTINUED


def test_mpps_can_be_turned_off(start_node: Callable[..., Node]) -> None:
    node = start_node(node={"mpps": False})
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title="PACSAI")
    try:
        assert not assoc.is_established or not assoc.accepted_contexts
    finally:
        if assoc.is_established:
            assoc.release()


# --- HL7 orders -----------------------------------------------------------------------------------


def _order(
    *,
    accession: str,
    study_uid: str | None = None,
    series: dict[str, int] | None = None,
    status: str = "SC",
    message_type: str = "OMI^O23^OMI_O23",
) -> bytes:
    """An order built with hl7apy: OMI^O23 with IPC (accession, study), one OBX per series."""
    structure = message_type.rsplit("^", 1)[-1]
    message = Message(structure, version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    message.msh.msh_3 = "RIS"
    message.msh.msh_5 = "PACSAI"
    message.msh.msh_7 = "20260101120000"
    message.msh.msh_9 = message_type
    message.msh.msh_10 = generate_uid()[-20:]
    message.msh.msh_11 = "P"
    message.msh.msh_12 = "2.5.1"
    segments = [
        message.msh.to_er7(),
        "PID|||PACSAI-TEST-001||Test^Patient",
        f"ORC|SC|PL-{accession}|||{status}",
        f"OBR|1|PL-{accession}||CT^CT ABDOMEN",
        f"IPC|{accession}|RP1|{study_uid or ''}|SPS1|CT",
    ]
    for index, (uid, count) in enumerate((series or {}).items(), start=1):
        segments.append(f"OBX|{2 * index - 1}|ST|112002^Series Instance UID^DCM|{index}|{uid}")
        segments.append(f"OBX|{2 * index}|NM|INSTANCES^Expected instances^99PACSAI|{index}|{count}")
    return "\r".join(segments).encode()


@pytest.fixture
def orders(database_url: str, start_node: Callable[..., Node]) -> Iterator[tuple[Node, int]]:
    """A node (on SQLite, then on PostgreSQL) and an order listener beside it."""
    node = start_node(database_url, node={"study_quiet_seconds": QUIET})
    listener = OrderListener(OrdersSettings(enabled=True, host="127.0.0.1", port=0), node.database)
    listener.start()
    yield node, listener.port
    listener.stop()


def _send(port: int, message: bytes) -> Acknowledgement:
    return Acknowledgement.parse(exchange("127.0.0.1", port, message, timeout=10))


def test_an_order_naming_the_series_completes_the_study_early(
    orders: tuple[Node, int], tmp_path: Path
) -> None:
    node, port = orders
    datasets = make_ct_series(4)
    for ds in datasets:
        ds.AccessionNumber = "ORD-1"
    series_uid = datasets[0].SeriesInstanceUID
    ack = _send(port, _order(accession="ORD-1", series={series_uid: 4}))
    assert ack.code == "AA", ack.text

    _push(node, datasets[:3], tmp_path / "part")
    node.completion.run_once()
    assert _study(node, datasets[0].StudyInstanceUID).status is StudyStatus.RECEIVING
    _push(node, datasets[3:], tmp_path / "rest")

    [job] = wait_for(lambda: db_rows(node.database, Job), timeout=QUIET / 3)
    assert job.instance_count == 4
    [expectation] = db_rows(node.database, StudyExpectation)
    assert expectation.source == "HL7" and expectation.state is ExpectationState.MET
    assert expectation.actor == "hl7:RIS"


def test_an_order_marked_complete_completes_at_once(
    orders: tuple[Node, int], tmp_path: Path
) -> None:
    node, port = orders
    datasets = make_ct_series(2)
    _push(node, datasets, tmp_path / "s")
    study_uid = datasets[0].StudyInstanceUID
    ack = _send(port, _order(accession="X", study_uid=study_uid, status="CM"))
    assert ack.code == "AA"
    [job] = wait_for(lambda: db_rows(node.database, Job), timeout=QUIET / 3)
    assert job.instance_count == 2


@pytest.mark.parametrize(
    ("message", "code", "text"),
    [
        (_order(accession="", series={}), "AE", "names no study"),
        (_order(accession="A", series={"1.2.x": 3}), "AE", "not a UID"),
        (_order(accession="A", message_type="ADT^A01^ADT_A01"), "AR", "not an order"),
    ],
)
def test_orders_that_cannot_be_taken_are_answered(
    orders: tuple[Node, int], message: bytes, code: str, text: str
) -> None:
    node, port = orders
    ack = _send(port, message)
    assert (ack.code, text in ack.text) == (code, True), ack.text
    assert db_rows(node.database, StudyExpectation) == []


def test_a_study_whose_order_never_comes_completes_on_its_window(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(node={"study_quiet_seconds": 1.0})
    listener = OrderListener(OrdersSettings(enabled=True, host="127.0.0.1", port=0), node.database)
    listener.start()
    try:
        # An order for another study, and a study nobody ordered.
        other = generate_uid()
        assert _send(listener.port, _order(accession="OTHER", series={other: 9})).code == "AA"
        datasets = make_ct_series(3)
        _push(node, datasets, tmp_path / "s")
        [job] = wait_for(lambda: db_rows(node.database, Job), timeout=30)
        assert job.instance_count == 3
        [expectation] = db_rows(node.database, StudyExpectation)
        assert expectation.state is ExpectationState.WAITING  # still waiting for its own study
    finally:
        listener.stop()


def test_serve_listens_for_orders_when_enabled(start_node: Callable[..., Node]) -> None:
    port = free_port()
    node = start_node(orders={"enabled": True, "host": "127.0.0.1", "port": port})
    ack = _send(port, _order(accession="SERVE-1", study_uid=generate_uid(), status="CM"))
    assert ack.code == "AA", ack.text
    [expectation] = db_rows(node.database, StudyExpectation)
    assert expectation.complete_now and expectation.accession_number == "SERVE-1"
