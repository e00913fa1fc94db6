"""Results to a RIS as HL7 v2.5.1 ORU^R01 over MLLP, against real listeners: hl7apy's own
MLLPServer answering AA, AE or CR or closing without an answer, a refused connection, and a TLS
listener."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from pacsai.config import Hl7Destination
from pacsai.mllp import FrameReader, frame
from pacsai.reporting.delivery import DeliveryFailure
from pacsai.reporting.hl7 import send_oru
from tests.certificates import make_server_certificate
from tests.study_results import PATIENT_ID, PATIENT_NAME, STUDY_UID, make_study_result
from tests.support import free_port


def _ack(incoming: str, code: str, text: str = "") -> Message:
    """An ACK of ``incoming``, built with hl7apy."""
    request = parse_message(incoming, find_groups=False)
    ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    ack.msh.msh_3 = "RIS"
    ack.msh.msh_5 = request.msh.msh_3.value
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = "ACK-1"
    ack.msh.msh_11 = "P"
    ack.msh.msh_12 = "2.5.1"
    ack.msa.msa_1 = code
    ack.msa.msa_2 = request.msh.msh_10.value
    if text:
        ack.msa.msa_3 = text
    return ack


class _Ris:
    """hl7apy's MLLPServer in a thread; ``answer`` is the MSA-1 code to reply with, or
    ``"close"`` to close the connection without answering."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.answer = "AA"
        ris = self

        class Handler(AbstractHandler):  # type: ignore[misc]
            def reply(self) -> str:
                ris.received.append(self.incoming_message)
                if ris.answer == "close":
                    raise ConnectionAbortedError("closing without an answer")
                framed: str = _ack(self.incoming_message, ris.answer, "the RIS says no").to_mllp()
                return framed  # hl7apy's server sends the reply as it is

        self.server = MLLPServer("127.0.0.1", 0, {"ORU^R01^ORU_R01": (Handler,)}, timeout=10)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


@pytest.fixture
def ris() -> Iterator[_Ris]:
    server = _Ris()
    yield server
    server.stop()


def _destination(port: int, **extra: Any) -> Hl7Destination:
    return Hl7Destination(
        kind="hl7",
        host="127.0.0.1",
        port=port,
        receiving_application="RIS",
        receiving_facility="RADIOLOGY",
        patient_id_authority="HOSP",
        timeout_seconds=10,
        **extra,
    )


def _segments(message: str, name: str) -> list[Any]:
    parsed = parse_message(message, find_groups=False)
    return [segment for segment in parsed.children if segment.name == name]


def test_an_oru_is_acknowledged_and_carries_the_result(ris: _Ris) -> None:
    result = make_study_result()
    ack = send_oru(result, _destination(ris.port))

    assert ack.code == "AA"
    assert ack.control_id == result.key
    [message] = ris.received
    assert PATIENT_NAME.split("^")[0] not in message  # no name leaves pacsai
    # The RIS validates what it got against the v2.5.1 ORU_R01 structure.
    parse_message(message, validation_level=VALIDATION_LEVEL.STRICT).validate()
    [msh] = _segments(message, "MSH")
    assert msh.msh_9.value == "ORU^R01^ORU_R01"
    assert msh.msh_10.value == result.key
    assert msh.msh_12.value == "2.5.1"
    assert msh.msh_5.value == "RIS"
    [pid] = _segments(message, "PID")
    assert pid.pid_3.cx_1.value == PATIENT_ID
    assert pid.pid_3.cx_4.value == "HOSP"
    assert pid.pid_5.to_er7() == "^^^^^^S"
    [obr] = _segments(message, "OBR")
    assert obr.obr_3.value == "ACC-2024-0042"
    assert obr.obr_7.value == "20240501103000"
    assert obr.obr_25.value == "P"

    rows = [
        tuple(
            field or None
            for field in (
                obx.obx_2.value,
                obx.obx_3.ce_1.value,
                obx.obx_4.value,
                obx.obx_5.value,
                obx.obx_8.value,
            )
        )
        for obx in _segments(message, "OBX")
    ]
    assert ("ST", "110180", None, STUDY_UID, None) in rows
    assert ("ST", "111001", "1", "ct_abdomen_demo", None) in rows
    assert ("ST", "111003", "1", "1.0.0+3f2a9c1d", None) in rows
    assert ("NM", "liver", "1", "1523.4", "A") in rows  # present
    assert ("NM", "spleen", "1", "0.0", "N") in rows  # absent
    assert ("CWE", "PRIORITY", None, "Y^Yes^HL70136", "AA") in rows
    assert ("ST", "112002", "SEG.1", "1.2.826.0.1.3680043.8.498.2001", None) in rows
    assert ("ST", "SOPIUID", "SR.1", "1.2.826.0.1.3680043.8.498.3002", None) in rows
    notes = [nte.nte_3.value for nte in _segments(message, "NTE")]
    assert notes == ["Present", "Absent", "ct-abdomen: liver 1523.4 ml >= 1000 ml"]


def test_delimiters_in_values_are_escaped_not_structure(ris: _Ris) -> None:
    result = make_study_result(accession_number="A|B^C&D")
    send_oru(result, _destination(ris.port))
    [obr] = _segments(ris.received[0], "OBR")
    assert obr.obr_3.to_er7() == "A\\F\\B\\S\\C\\T\\D"


@pytest.mark.parametrize(("code", "permanent"), [("AE", False), ("AR", False), ("CR", True)])
def test_a_negative_ack_fails_the_attempt(ris: _Ris, code: str, permanent: bool) -> None:
    ris.answer = code
    with pytest.raises(DeliveryFailure, match=f"answered {code}: the RIS says no") as caught:
        send_oru(make_study_result(), _destination(ris.port))
    assert caught.value.permanent is permanent
    assert len(ris.received) == 1


def test_a_listener_that_closes_without_an_ack_is_retried(ris: _Ris) -> None:
    ris.answer = "close"
    with pytest.raises(DeliveryFailure, match="closed the connection") as caught:
        send_oru(make_study_result(), _destination(ris.port))
    assert caught.value.permanent is False


def test_a_refused_connection_is_retried() -> None:
    with pytest.raises(DeliveryFailure, match="could not exchange") as caught:
        send_oru(make_study_result(), _destination(free_port()))
    assert caught.value.permanent is False


def test_an_ack_of_another_message_is_not_taken() -> None:
    """A listener that acknowledges some other control ID has not acknowledged ours."""

    def wrong(connection: socket.socket) -> None:
        FrameReader(connection).read()
        connection.sendall(frame(b"MSH|^~\\&|RIS||PACSAI||20240101||ACK|X|P|2.5.1\rMSA|AA|OTHER"))

    with _OneShot(wrong, None) as port, pytest.raises(DeliveryFailure) as caught:
        send_oru(make_study_result(), _destination(port))
    assert "acknowledged message 'OTHER'" in str(caught.value)
    assert caught.value.permanent is False


class _OneShot:
    """A listener for one connection (optionally TLS), served by ``serve``; the context gives
    its port."""

    def __init__(self, serve: Callable[[socket.socket], None], context: ssl.SSLContext | None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.serve = serve
        self.context = context
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        connection, _ = self.listener.accept()
        if self.context is not None:
            try:
                connection = self.context.wrap_socket(connection, server_side=True)
            except OSError:  # the client refused our certificate: nothing more to serve
                connection.close()
                return
        with connection:
            connection.settimeout(10)
            self.serve(connection)

    def __enter__(self) -> int:
        self.thread.start()
        return self.port

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=10)
        self.listener.close()


def test_oru_over_tls(tmp_path: Path) -> None:
    certificate = make_server_certificate(tmp_path / "tls")
    received: list[bytes] = []

    def answer(connection: socket.socket) -> None:
        message = FrameReader(connection).read()
        assert message is not None
        received.append(message)
        connection.sendall(frame(_ack(message.decode(), "AA").to_er7().encode()))

    tls = {"enabled": True, "ca": certificate.ca, "check_hostname": True}
    with _OneShot(answer, certificate.server_context()) as port:
        ack = send_oru(make_study_result(), _destination(port, tls=tls))
    assert ack.code == "AA"
    assert b"ORU^R01^ORU_R01" in received[0]


def test_a_server_certificate_from_another_ca_is_refused_and_retried(tmp_path: Path) -> None:
    certificate = make_server_certificate(tmp_path / "tls")
    stranger = make_server_certificate(tmp_path / "other")

    def nothing(connection: socket.socket) -> None:
        return None

    tls = {"enabled": True, "ca": stranger.ca}
    with (
        _OneShot(nothing, certificate.server_context()) as port,
        pytest.raises(DeliveryFailure, match="TLS") as caught,
    ):
        send_oru(make_study_result(), _destination(port, tls=tls))
    assert caught.value.permanent is False
