"""A DICOM upper layer peer written with struct and a plain socket (PS3.8), for tests that
must send what no well-behaved library would: oversized PDU headers, malformed PDVs, a byte and
then silence. Nothing here uses pynetdicom's encoder, so its checks are not bypassed by its own
politeness."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.9.7433.1.1"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def associate_rq(
    *, calling: str, called: str, contexts: list[tuple[int, str, str]], max_length: int = 16384
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2); `contexts` holds (id, abstract, transfer) syntaxes."""
    items = _item(0x10, _uid(APPLICATION_CONTEXT))
    for context_id, abstract, transfer in contexts:
        sub = _item(0x30, _uid(abstract)) + _item(0x40, _uid(transfer))
        items += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_length)) + _item(0x52, _uid(IMPLEMENTATION_CLASS_UID))
    items += _item(0x50, user)
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16).encode("ascii")
        + calling.ljust(16).encode("ascii")
        + b"\x00" * 32
        + items
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def pdv(context_id: int, control: int, value: bytes) -> bytes:
    """One PDV item: length, presentation context ID, message control header, value."""
    return struct.pack(">LBB", len(value) + 2, context_id, control) + value


def p_data(*pdvs: bytes) -> bytes:
    return pdu(0x04, b"".join(pdvs))


RELEASE_RQ = pdu(0x05, b"\x00" * 4)


def command_set(ds: Dataset) -> bytes:
    """A command set in Implicit VR Little Endian, with its group length (PS3.7 6.3.1)."""
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, ds)
    encoded = body.getvalue()
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(encoded)) + encoded


def c_store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    ds = Dataset()
    ds.AffectedSOPClassUID = sop_class
    ds.CommandField = 0x0001
    ds.MessageID = message_id
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000
    ds.AffectedSOPInstanceUID = sop_instance
    return command_set(ds)


def c_echo_rq(message_id: int) -> bytes:
    ds = Dataset()
    ds.AffectedSOPClassUID = VERIFICATION
    ds.CommandField = 0x0030
    ds.MessageID = message_id
    ds.CommandDataSetType = 0x0101
    return command_set(ds)


def encoded_dataset(ds: Dataset) -> bytes:
    """A data set in Explicit VR Little Endian, without file meta."""
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return body.getvalue()


@dataclass(frozen=True, slots=True)
class Pdu:
    type: int
    body: bytes


class RawPeer:
    """A plain TCP connection speaking upper layer PDUs, with a timeout on every read."""

    def __init__(
        self, port: int, *, host: str = "127.0.0.1", source: str | None = None, timeout: float = 10
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_quietly(self, data: bytes) -> bool:
        """Send; False once the node has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _exactly(self, size: int) -> bytes | None:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def receive(self) -> Pdu | None:
        """The next PDU, or ``None`` once the node closed the connection."""
        try:
            header = self._exactly(6)
            if header is None:
                return None
            pdu_type, _, length = struct.unpack(">BBL", header)
            body = self._exactly(length)
        except ConnectionResetError:
            return None
        return None if body is None else Pdu(pdu_type, body)

    def closed_within(self, seconds: float) -> float | None:
        """Seconds until the node closed the connection (reading and dropping whatever it
        sends first), or ``None`` if it was still open after `seconds`."""
        start = time.monotonic()
        self.sock.settimeout(0.2)
        while time.monotonic() - start < seconds:
            try:
                if not self.sock.recv(65536):
                    return time.monotonic() - start
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - start
        return None

    def associate(
        self,
        *,
        contexts: list[tuple[int, str, str]],
        calling: str = "RAWPEER",
        called: str = "PACSAI",
    ) -> Pdu:
        """Send an A-ASSOCIATE-RQ and return the answer (AC, RJ or A-ABORT)."""
        self.send(associate_rq(calling=calling, called=called, contexts=contexts))
        answer = self.receive()
        assert answer is not None, "the node closed the connection instead of answering"
        return answer

    def echo(self, context_id: int, message_id: int = 1) -> int:
        """C-ECHO on an accepted Verification context; the response status."""
        self.send(p_data(pdv(context_id, 0x03, c_echo_rq(message_id))))
        return response_status(self)


def response_status(peer: RawPeer) -> int:
    """The Status of the next DIMSE response (a command set in one or more PDVs)."""
    command = b""
    while True:
        answer = peer.receive()
        assert answer is not None and answer.type == 0x04, f"no P-DATA-TF but {answer}"
        offset = 0
        last = False
        while offset < len(answer.body):
            (length,) = struct.unpack_from(">L", answer.body, offset)
            control = answer.body[offset + 5]
            command += answer.body[offset + 6 : offset + 4 + length]
            last = bool(control & 0x02)
            offset += 4 + length
        if last:
            break
    # (0000,0900) Status, implicit VR LE: tag, 4-byte length 2, US value
    at = command.find(b"\x00\x00\x00\x09\x02\x00\x00\x00")
    assert at >= 0, "no Status in the response"
    return int(struct.unpack_from("<H", command, at + 8)[0])


VERIFICATION_CONTEXTS = [(1, VERIFICATION, ImplicitVRLittleEndian)]
__all__ = [
    "RELEASE_RQ",
    "VERIFICATION_CONTEXTS",
    "ExplicitVRLittleEndian",
    "RawPeer",
    "associate_rq",
    "c_echo_rq",
    "c_store_rq",
    "encoded_dataset",
    "p_data",
    "pdu",
    "pdv",
    "response_status",
]
