"""Everything pacsai changes in pynetdicom's behaviour, in one place (pynetdicom 3.0).

pynetdicom is the DICOM upper layer of both the receiver and the SCU. What it does not do, or
does in a way that hurts a node that runs for months against untrusted peers, is fixed here and
nowhere else; each fix names what it works around, so that it can go once pynetdicom has its
own answer.

Reading the network (:class:`_DUL`)
    pynetdicom reads a PDU's whole length, as its header claims, before looking at it, so a
    header claiming 0xFFFFFFF0 bytes makes it buffer whatever follows; it reads in 4 KiB pieces;
    it decodes every PDV of a P-DATA-TF into an object (a million empty PDVs cost 17 times their
    size); and once a byte has arrived a read blocks without a deadline, so a peer that sends one
    byte holds a connection (and three threads) for ever. Here the header is checked first (the
    PDU limit), the PDU is read into one buffer with a deadline (the ACSE timeout until the
    association is accepted, the network timeout after), and the PDVs are checked and counted
    before anything is decoded. A protocol violation is an A-ABORT, and its reason is kept.
    After an A-ABORT (state Sta13) pynetdicom decodes whatever the peer still sends, answering
    each invalid PDU with another A-ABORT and an error line (600 KB of 0xFF: 100,000 lines);
    here it is discarded.
Assembling messages (:class:`_DIMSE`)
    A data set is collected up to ``max_dataset_bytes``; beyond it the fragments are counted
    and dropped, and the C-STORE is answered with a refusal instead of being buffered. A
    malformed PDV (length 1, a data fragment before its command) killed pynetdicom's DUL thread
    without an abort event: the association stayed open in the node's books and its memory was
    never freed. Here it is a protocol violation like any other.
Waiting (:class:`_Association`, :class:`_DUL`)
    pynetdicom's reactors poll: the DUL thread and the association thread each sleep 1 ms
    between checks. Here they block until there is something to do (data on the socket, a
    primitive to send, a message to serve, a timer due), which removes most of the per-instance
    latency. pynetdicom's reactor can also take the response a ``send_*()`` call waits for (it
    marks itself paused, then works, without looking at the checkpoint again): the sender waits
    out its DIMSE timeout and aborts. The faster the peer answers, the likelier; here the
    reactor announces its work before it looks again. Idle associations are released (A-RELEASE)
    after the network timeout, not aborted.
Encoding and sending (:class:`_DIMSE`, :func:`send_c_store`, :class:`_DUL`)
    pynetdicom encodes every C-STORE request and response through pydicom data sets, reads a
    file's data set again in PDU-sized pieces, and sends each P-DATA-TF with its own trip through
    the state machine and its own system call. Here C-STORE requests and responses are encoded
    directly (byte for byte as pynetdicom would), and whatever P-DATA is queued goes out in one
    call. A received data set is hashed (SHA-256) as its fragments arrive.
Sockets (:class:`_AssociationSocket`, :class:`AcceptorServer`, :class:`AcceptorHandler`)
    pynetdicom skips ``close()`` when ``shutdown()`` fails on a connection the peer has already
    dropped (the socket is left to the garbage collector); leaves Nagle's algorithm on (with a
    peer's delayed ACKs each C-STORE stalls about 40 ms), and ACKs late to senders that have it
    on; does the TLS handshake in the accept loop (one slow client stalls every other); counts a
    connection only once it is an association, in a listen backlog of 5; runs a full
    ``gc.collect()`` in the accept loop; keeps a bare TCP connect (a port probe) as a half-open
    association until its ACSE timeout; and logs why a connect failed instead of telling the
    caller (:func:`connect_error`).

Nothing here knows about pacsai's policy: the receiver passes :class:`AcceptorHooks`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from typing import TYPE_CHECKING, Any, Protocol, cast

from pydicom.dataset import Dataset
from pynetdicom import AE as _AE
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import _MESSAGE_TYPES, DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_STORE, N_EVENT_REPORT
from pynetdicom.dsutils import decode
from pynetdicom.dul import _PDU_TYPES, DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

if TYPE_CHECKING:
    from pynetdicom.transport import T_CONNECT

__all__ = [
    "AE",
    "AcceptorHandler",
    "AcceptorHooks",
    "AcceptorServer",
    "NetworkLimits",
    "close_transport",
    "connect_error",
    "dataset_sha256",
    "no_delay",
    "protocol_error",
    "refusal",
    "send_c_store",
]

log = logging.getLogger(__name__)

_KIB = 1024
_MIB = 1024 * 1024
_LONGEST_WAIT = 1.0  # seconds: no reactor sleeps longer than this without looking around
_DISCARD_CHUNK = 64 * _KIB
_DISCARD_LIMIT = 1 * _MIB  # after an A-ABORT, read no more than this before closing
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux
_REFUSAL = "_pacsai_refusal"  # attribute of a C-STORE primitive whose data set was not kept
_SHA256 = "_pacsai_sha256"  # attribute of a received primitive: its data set's SHA-256


@dataclass(frozen=True, slots=True)
class NetworkLimits:
    """What one association may make the node hold in memory.

    Attributes
    ----------
    max_pdu_length
        The longest P-DATA-TF PDU accepted (its length field; the Maximum Length announced in
        the A-ASSOCIATE-AC). A longer one is an A-ABORT before any of it is read.
    max_dataset_bytes
        The largest data set kept for one DIMSE message; a larger one is read and dropped and
        the C-STORE answered with a refusal (``None``: no limit).
    max_pdvs_per_pdu
        PDVs in one P-DATA-TF; senders use one or two.
    max_command_bytes
        The largest command set (they are a few hundred bytes).
    max_control_pdu_length
        A-ASSOCIATE-RQ/AC/RJ, A-RELEASE and A-ABORT PDUs (an RQ with 128 presentation contexts
        of 20 transfer syntaxes each is under 200 KiB).
    """

    max_pdu_length: int = 16 * _MIB
    max_dataset_bytes: int | None = None
    max_pdvs_per_pdu: int = 64
    max_command_bytes: int = 64 * _KIB
    max_control_pdu_length: int = 1 * _MIB


def no_delay(connection: socket.socket) -> None:
    """Switch Nagle's algorithm off: a C-STORE otherwise waits ~40 ms for the peer's ACK."""
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def refusal(primitive: Any) -> str | None:
    """Why the data set of a received C-STORE was not kept (``None`` when it was)."""
    reason = getattr(primitive, _REFUSAL, None)
    return reason if isinstance(reason, str) else None


def dataset_sha256(primitive: Any) -> str | None:
    """The SHA-256 (hex) of a received message's data set, hashed as its fragments arrived
    (beside the network transfer rather than after it); ``None`` when not known."""
    digest = getattr(primitive, _SHA256, None)
    return digest if isinstance(digest, str) else None


def protocol_error(assoc: Association) -> str | None:
    """The protocol violation an association was aborted for, if any."""
    dul = assoc.dul
    return dul.violation if isinstance(dul, _DUL) else None


class _SignallingQueue(queue.Queue[Any]):
    """A queue that calls `notify` after each put, so that its reader need not poll."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _PDataPDU:
    """A checked P-DATA-TF: its PDVs as (context ID, message control header, value) views.

    It stands in for pynetdicom's ``P_DATA_TF`` in the DUL's receive queue; the state machine
    only calls :meth:`to_primitive` on it, and :class:`_DIMSE` knows what it gets.
    """

    __slots__ = ("pdvs",)

    def __init__(self, pdvs: list[tuple[int, int, memoryview]]) -> None:
        self.pdvs = pdvs

    def to_primitive(self) -> _PDataPDU:
        return self


class _AssociationSocket(AssociationSocket):
    """pynetdicom's socket wrapper, closing what it opens and without Nagle's algorithm."""

    def _shutdown_socket(self) -> None:
        # pynetdicom calls close() only if shutdown() succeeded; a peer that already went
        # leaves the socket to the garbage collector (and ResourceWarnings).
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    def close(self) -> None:
        super().close()
        dul = self.assoc.dul
        if isinstance(dul, _DUL):
            dul.note_closed()

    connect_error: OSError | None = None

    def connect(self, primitive: T_CONNECT) -> None:
        """pynetdicom's connect, keeping why it failed (for the caller's error message) and
        switching Nagle's algorithm off."""
        if self.socket is None:
            raise ValueError("a socket must be created before connecting")
        try:
            if self.tls_args:
                context, server_hostname = self.tls_args
                self.socket = context.wrap_socket(
                    self.socket, server_side=False, server_hostname=server_hostname
                )
            self.socket.settimeout(self.assoc.connection_timeout)
            self.socket.connect(primitive.address_info.as_tuple)
            self.socket.settimeout(None)
            no_delay(self.socket)
            self.assoc.requestor.address_info = AddressInformation.from_tuple(
                self.socket.getsockname()
            )
            self._is_connected = True
            evt.trigger(self.assoc, evt.EVT_CONN_OPEN, {"address": primitive.address_info.as_tuple})
            primitive.result = "Evt2"
        except OSError as exc:
            self.connect_error = exc
            self._shutdown_socket()
            self.socket = None
            primitive.result = "Evt17"
        finally:
            self.provider_queue.put(primitive)
            self._ready.set()


class _DUL(DULServiceProvider):
    """The upper layer: bounded reads with deadlines, checked PDVs, no polling."""

    def __init__(self, assoc: Association, limits: NetworkLimits) -> None:
        super().__init__(assoc)
        self.daemon = True  # a process must be able to exit whatever a peer does
        self.limits = limits
        self.violation: str | None = None
        self.closed = threading.Event()  # the transport connection is gone
        self._discarded = 0
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._wake_lock = threading.Lock()
        self._woken = False
        self._finalizer = weakref.finalize(self, _close_all, (self._wake_reader, self._wake_writer))
        self._notify_user: Callable[[], None] = lambda: None
        self.to_provider_queue = _SignallingQueue(self._wake)
        self.event_queue = _SignallingQueue(self._wake)
        self.to_user_queue = _SignallingQueue(self._user_event)

    # --- waking the reactor -----------------------------------------------------------------

    def _wake(self) -> None:
        if threading.current_thread() is self:
            return  # the reactor itself: it looks at its queues before it waits
        with self._wake_lock:
            if self._woken:
                return
            self._woken = True
        with contextlib.suppress(OSError):  # full (it is awake anyway) or closed (it ended)
            self._wake_writer.send(b"\0")

    def _user_event(self) -> None:
        self._notify_user()

    def note_closed(self) -> None:
        """The transport connection was closed (by either side)."""
        self.closed.set()
        self._notify_user()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._wake()
        if threading.current_thread() is not self:
            self.join(timeout=_LONGEST_WAIT * 5)
        return True

    # --- the reactor ------------------------------------------------------------------------

    def run_reactor(self) -> None:
        try:
            self._react()
        finally:
            self.closed.set()
            self._notify_user()
            self._finalizer()

    def _react(self) -> None:
        self._idle_timer.start()
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                return
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - pynetdicom's own last resort, kept
                self._give_up(exc)
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                self._wait()
                continue
            try:
                self.state_machine.do_action(event)
            except Exception as exc:  # noqa: BLE001 - an invalid event for the state
                self._give_up(exc)
                return

    def _give_up(self, exc: BaseException) -> None:
        """pynetdicom's reaction to an exception in its reactor, plus telling the user."""
        log.error("upper layer failure, aborting the association: %s", exc)
        self.violation = self.violation or f"upper layer failure: {type(exc).__name__}: {exc}"
        sock = self.socket
        if sock is not None and sock.socket is not None:
            with contextlib.suppress(OSError):
                sock.socket.sendall(_abort_pdu())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True
        if sock is not None:
            sock.close()

    def _wait(self) -> None:
        """Block until the socket is readable, someone queued work, or a timer is due."""
        connection = self._connection()
        if isinstance(connection, ssl.SSLSocket) and connection.pending():
            return
        timeout = _LONGEST_WAIT
        timer = self.artim_timer
        if timer.timeout is not None and timer._start_time is not None and timer._end_time is None:
            timeout = max(0.0, min(timeout, timer.remaining))
        watched: list[Any] = [self._wake_reader]
        if connection is not None:
            watched.append(connection)
        try:
            ready, _, _ = select.select(watched, [], [], timeout)
        except (OSError, ValueError):  # closed meanwhile: the loop finds out
            ready = []
        if self._wake_reader in ready:
            with contextlib.suppress(OSError):
                self._wake_reader.recv(4096)
        with self._wake_lock:
            self._woken = False

    def _process_recv_primitive(self) -> bool:
        try:
            head = self.to_provider_queue.queue[0]
        except IndexError:
            return False
        if isinstance(head, P_DATA) and self.state_machine.current_state == "Sta6":
            self._send_p_data()
            return True
        return super()._process_recv_primitive()

    def _send_p_data(self) -> None:
        """Sta6 + P-DATA request (Evt9 -> DT-1): every P-DATA queued now goes out as its
        P-DATA-TF PDUs in one send, instead of one trip through the state machine and one
        system call each (a 512 KiB data set to a peer taking 16 KiB PDUs is 32 of them)."""
        pdus: list[bytes] = []
        size = 0
        while size < 4 * _MIB:
            try:
                head = self.to_provider_queue.queue[0]
            except IndexError:
                break
            if not isinstance(head, P_DATA):
                break
            self.to_provider_queue.get_nowait()
            if isinstance(head, _EncodedPData):
                pdus.append(head.encoded)
                size += len(head.encoded)
                continue
            items = b"".join(
                struct.pack(">LB", len(value) + 1, context_id) + value
                for context_id, value in head.presentation_data_value_list
            )
            pdus.append(struct.pack(">BBL", 0x04, 0, len(items)) + items)
            size += len(items) + 6
        wrapper = self.socket
        if wrapper is not None and pdus:
            wrapper.send(b"".join(pdus))  # a failure is Evt17, as pynetdicom's send

    def _connection(self) -> socket.socket | None:
        wrapper = self.socket
        if wrapper is None or not wrapper._is_connected:
            return None
        return wrapper.socket

    def _is_transport_event(self) -> bool:
        if self.state_machine.current_state == "Sta13":
            return self._discard_until_closed()
        wrapper = self.socket
        if wrapper is not None and wrapper.ready:
            self._read_pdu_data()
            return True
        return False

    def _discard_until_closed(self) -> bool:
        """Sta13 (awaiting close): whatever the peer still sends is dropped undecoded."""
        wrapper = self.socket
        connection = self._connection()
        if wrapper is None or connection is None:
            return False
        # (a TLS connection is closed at once: a partial record would keep it "readable")
        plain = not isinstance(connection, ssl.SSLSocket)
        if plain and wrapper.ready and self._discarded < _DISCARD_LIMIT:
            try:
                connection.settimeout(0)
                data = connection.recv(_DISCARD_CHUNK)
                if data:
                    self._discarded += len(data)
                    return True
            except BlockingIOError:
                return True
            except OSError:
                pass
        wrapper.close()
        return True

    # --- reading PDUs -----------------------------------------------------------------------

    def _deadline(self) -> float | None:
        """When the PDU now being read must be complete: the ARTIM (ACSE) timeout until the
        association is established, the network timeout after."""
        if self.assoc.is_established:
            timeout = self.assoc.network_timeout
        else:
            timeout = self.assoc.acse_timeout
            timer = self.artim_timer
            if timeout is not None and timer._start_time is not None and timer._end_time is None:
                timeout = max(0.0, timer.remaining)
        return None if timeout is None else time.monotonic() + timeout

    def _read_exactly(self, size: int, deadline: float | None) -> bytearray | None:
        """`size` bytes in one buffer, or ``None`` if the peer closed or missed the deadline."""
        connection = self._connection()
        if connection is None:
            return None
        buffer = bytearray(size)
        view = memoryview(buffer)
        received = 0
        try:
            while received < size:
                if deadline is None:
                    connection.settimeout(None)
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    connection.settimeout(remaining)
                if _QUICKACK is not None:
                    # ACK at once: a sender with Nagle's algorithm on (DCMTK without
                    # TCP_NODELAY) holds its last segment until our ACK, which Linux would
                    # otherwise delay by up to 40 ms: most of an instance's time on the wire.
                    with contextlib.suppress(OSError):
                        connection.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                count = connection.recv_into(view[received:], size - received)
                if count == 0:
                    return None
                received += count
        except TimeoutError:
            if received or size > 6:
                self.violation = self.violation or (
                    f"the peer sent {received} of {size} bytes of a PDU and then nothing "
                    "within the timeout"
                )
            return None
        except OSError:
            return None
        finally:
            view.release()
            # sends (responses, A-ABORT) get the network timeout, not what this read left
            with contextlib.suppress(OSError):
                connection.settimeout(self.assoc.network_timeout)
        return buffer

    def _read_pdu_data(self) -> None:
        deadline = self._deadline()
        header = self._read_exactly(6, deadline)
        if header is None:
            self.event_queue.put("Evt17")  # transport connection closed (or timed out)
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if bytes((pdu_type,)) not in _PDU_TYPES:
            self._violate(f"unknown PDU type 0x{pdu_type:02X}")
            return
        limits = self.limits
        limit = limits.max_pdu_length if pdu_type == 0x04 else limits.max_control_pdu_length
        if length > limit:
            self._violate(
                f"a PDU of type 0x{pdu_type:02X} claims {length} bytes; at most {limit} are "
                "accepted"
            )
            return
        if pdu_type in (0x05, 0x06, 0x07) and length != 4:
            self._violate(f"a PDU of type 0x{pdu_type:02X} must be 4 bytes long, not {length}")
            return
        body = self._read_exactly(length, deadline)
        if body is None:
            self.event_queue.put("Evt17")
            return
        if pdu_type == 0x04:
            pdvs = self._check_pdvs(body)
            if pdvs is None:
                return
            self._recv_pdu.put(_PDataPDU(pdvs))  # type: ignore[arg-type]
            self.event_queue.put("Evt10")
            return
        pdu_class, event = _PDU_TYPES[bytes((pdu_type,))]
        pdu = pdu_class()
        try:
            pdu.decode(bytes(header + body))
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises anything on bad bytes
            self._violate(f"a PDU of type 0x{pdu_type:02X} cannot be decoded: {exc}")
            return
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        self._recv_pdu.put(pdu)
        self.event_queue.put(event)

    def _check_pdvs(self, body: bytearray) -> list[tuple[int, int, memoryview]] | None:
        """The PDVs of a P-DATA-TF (PS3.8 9.3.5), counted and checked before any is decoded."""
        view = memoryview(body)
        size = len(body)
        pdvs: list[tuple[int, int, memoryview]] = []
        offset = 0
        while offset < size:
            if len(pdvs) == self.limits.max_pdvs_per_pdu:
                self._violate(f"more than {self.limits.max_pdvs_per_pdu} PDVs in one P-DATA-TF")
                return None
            if size - offset < 6:
                self._violate("a PDV item is cut short")
                return None
            (length,) = struct.unpack_from(">L", body, offset)
            if length < 2:
                self._violate(
                    f"a PDV item of length {length}: it needs at least a presentation context "
                    "ID and a message control header"
                )
                return None
            end = offset + 4 + length
            if end > size:
                self._violate("a PDV item runs past the end of its P-DATA-TF")
                return None
            pdvs.append((body[offset + 4], body[offset + 5], view[offset + 6 : end]))
            offset = end
        if not pdvs:
            self._violate("a P-DATA-TF without a PDV")
            return None
        return pdvs

    def _violate(self, reason: str) -> None:
        """A protocol violation: A-ABORT (Evt19), keep the reason, read no further."""
        if self.violation is None:
            self.violation = reason
            log.warning(
                "protocol violation by %s: %s",
                _peer_of(self.assoc),
                reason,
                extra={"action": "protocol_violation"},
            )
        self.event_queue.put("Evt19")


class _DIMSE(DIMSEServiceProvider):
    """DIMSE messages assembled from checked fragments, data sets only up to their limit."""

    def __init__(self, assoc: Association, limits: NetworkLimits) -> None:
        super().__init__(assoc)
        self.limits = limits
        self.msg_queue = _SignallingQueue(lambda: _notify(assoc))
        self._reset()
        self._failed = False

    def _reset(self) -> None:
        self._context_id: int | None = None
        self._command: list[bytes] = []
        self._command_bytes = 0
        self._command_set: Any = None
        self._data: list[memoryview] = []
        self._data_bytes = 0
        self._hash = hashlib.sha256()

    def receive_primitive(self, primitive: Any) -> None:
        if not isinstance(primitive, _PDataPDU):
            super().receive_primitive(primitive)
            return
        for context_id, control, value in primitive.pdvs:
            if self._failed:
                return
            self._fragment(context_id, control, value)

    def _fragment(self, context_id: int, control: int, value: memoryview) -> None:
        if self._context_id is None:
            if context_id not in self.assoc._accepted_cx:
                self._fail(f"a PDV for presentation context {context_id}, which was not accepted")
                return
            self._context_id = context_id
        elif context_id != self._context_id:
            self._fail("a message's fragments arrived on different presentation contexts")
            return
        last = bool(control & 0x02)
        if control & 0x01:
            if self._command_set is not None:
                self._fail("a command fragment after the command set was complete")
                return
            self._command_bytes += len(value)
            if self._command_bytes > self.limits.max_command_bytes:
                self._fail(f"a command set over {self.limits.max_command_bytes} bytes")
                return
            self._command.append(bytes(value))
            if last:
                self._end_command()
            return
        if self._command_set is None:
            self._fail("a data set fragment before its command set")
            return
        self._data_bytes += len(value)
        limit = self.limits.max_dataset_bytes
        if limit is not None and self._data_bytes > limit:
            self._data.clear()  # counted from now on, never kept
        else:
            self._data.append(value)
            self._hash.update(value)  # hashlib lets other threads run meanwhile
        if last:
            self._deliver()

    def _end_command(self) -> None:
        try:
            command_set = decode(BytesIO(b"".join(self._command)), True, True)
            message_type = _MESSAGE_TYPES[int(command_set.CommandField)][1]
            has_data = int(command_set.CommandDataSetType) != 0x0101
        except Exception as exc:  # noqa: BLE001 - a command set can be any bytes
            self._fail(f"the command set cannot be decoded: {type(exc).__name__}: {exc}")
            return
        self._command_set = command_set
        self._message_type = message_type
        if not has_data:
            self._deliver()

    def _deliver(self) -> None:
        message = DIMSEMessage()
        message.__class__ = self._message_type
        message.context_id = self._context_id
        message.encoded_command_set = BytesIO(b"".join(self._command))
        message.command_set = self._command_set
        limit = self.limits.max_dataset_bytes
        oversized = limit is not None and self._data_bytes > limit
        message.data_set = BytesIO(b"" if oversized else b"".join(self._data))
        size = self._data_bytes
        digest = None if oversized else self._hash.hexdigest()
        self._reset()
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        try:
            primitive = message.message_to_primitive()
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: an invalid message aborts
            self._fail(f"an invalid DIMSE message: {type(exc).__name__}: {exc}")
            return
        if oversized:
            setattr(
                primitive,
                _REFUSAL,
                f"data set of {size} bytes over the limit of {limit}",
            )
        elif digest is not None and getattr(primitive, "DataSet", None) is not None:
            setattr(primitive, _SHA256, digest)
        context_id = cast(int, message.context_id)
        if isinstance(primitive, C_CANCEL):
            if len(self.cancel_req) < 10:
                self.cancel_req[cast(int, primitive.MessageIDBeingRespondedTo)] = primitive
            return
        if isinstance(primitive, N_EVENT_REPORT) and primitive.is_valid_request:
            # as pynetdicom: served at once, beside whatever the association is doing
            threading.Thread(
                target=self.assoc._serve_request, args=(primitive, context_id), daemon=True
            ).start()
            return
        self.msg_queue.put((context_id, primitive))

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """C-STORE responses are encoded here (a few bytes), the rest by pynetdicom, which
        builds them through pydicom data sets: a third of the receiver's time per instance."""
        command = _store_response(primitive)
        if command is None or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)

    def _fail(self, reason: str) -> None:
        self._failed = True
        self._reset()
        dul = self.assoc.dul
        if isinstance(dul, _DUL):
            dul._violate(reason)
        else:  # pragma: no cover - every association here has a _DUL
            dul.event_queue.put("Evt19")


def _command_element(element: int, value: bytes) -> bytes:
    """A group 0000 element in Implicit VR Little Endian (PS3.7 6.3.1)."""
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _store_response(primitive: Any) -> bytes | None:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2), or ``None`` for anything else (a
    request, or a response carrying more than a status and an error comment)."""
    if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.OffendingElement is not None or primitive.Status is None:
        return None
    sop_class = primitive.AffectedSOPClassUID
    sop_instance = primitive.AffectedSOPInstanceUID
    if sop_class is None or sop_instance is None:
        return None
    parts = [
        _command_element(0x0002, _even(str(sop_class).encode("ascii"), b"\x00")),
        _command_element(0x0100, struct.pack("<H", 0x8001)),
        _command_element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
        _command_element(0x0800, struct.pack("<H", 0x0101)),
        _command_element(0x0900, struct.pack("<H", primitive.Status)),
    ]
    if primitive.ErrorComment:
        comment = str(primitive.ErrorComment)[:64].replace("\\", "/")
        parts.append(_command_element(0x0902, _even(comment.encode("ascii", "replace"), b" ")))
    parts.append(_command_element(0x1000, _even(str(sop_instance).encode("ascii"), b"\x00")))
    body = b"".join(parts)
    return _command_element(0x0000, struct.pack("<L", len(body))) + body


def _store_request(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    """The command set of a C-STORE-RQ with a data set, medium priority (PS3.7 9.3.1.1)."""
    body = b"".join(
        (
            _command_element(0x0002, _even(sop_class.encode("ascii"), b"\x00")),
            _command_element(0x0100, struct.pack("<H", 0x0001)),
            _command_element(0x0110, struct.pack("<H", message_id)),
            _command_element(0x0700, struct.pack("<H", 0x0000)),
            _command_element(0x0800, struct.pack("<H", 0x0001)),
            _command_element(0x1000, _even(sop_instance.encode("ascii"), b"\x00")),
        )
    )
    return _command_element(0x0000, struct.pack("<L", len(body))) + body


class _EncodedPData(P_DATA):
    """P-DATA whose P-DATA-TF PDUs are already encoded (one or more, back to back)."""

    def __init__(self, encoded: bytes) -> None:
        super().__init__()
        self.encoded = encoded


def _pdu_header(context_id: int, control: int, length: int) -> bytes:
    """A P-DATA-TF PDU header with its one PDV's header, for a value of `length` bytes."""
    return struct.pack(">BBLLBB", 0x04, 0, length + 6, length + 2, context_id, control)


def send_c_store(
    assoc: Association,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    dataset: bytes,
    message_id: int,
) -> Any:
    """C-STORE a data set already encoded in `transfer_syntax_uid` (the bytes of a Part 10
    file after its meta), as it is; return the response's status data set (empty when none
    came: the association is then aborted, as pynetdicom's ``send_c_store`` does).

    pynetdicom's own ``send_c_store`` builds the command set through pydicom data sets and
    reads the file again in PDU-sized pieces; this encodes both directly.

    Raises
    ------
    ValueError
        If the peer accepted no presentation context for the SOP class and transfer syntax.
    RuntimeError
        If the association is not established.
    """
    if not assoc.is_established:
        raise RuntimeError("the association is not established")
    context = assoc._get_valid_context(
        sop_class_uid, transfer_syntax_uid, "scu", allow_conversion=False
    )
    context_id = cast(int, context.context_id)
    peer_maximum = assoc.acceptor.maximum_length or 0
    step = max(1, peer_maximum - 6) if peer_maximum else max(1, len(dataset))
    command = _store_request(message_id, sop_class_uid, sop_instance_uid)
    parts: list[bytes | memoryview] = [_pdu_header(context_id, 0x03, len(command)), command]
    view = memoryview(dataset)
    for start in range(0, max(len(dataset), 1), step):
        fragment = view[start : start + step]
        last = start + step >= len(dataset)
        parts += [_pdu_header(context_id, 0x02 if last else 0x00, len(fragment)), fragment]
    message = _EncodedPData(b"".join(parts))
    # pause the reactor, so that it does not take the response (as pynetdicom does)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dul.send_pdu(message)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if response is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(response)


def _notify(assoc: Association) -> None:
    activity = getattr(assoc, "_activity", None)
    if activity is not None:
        activity.set()


class _Association(Association):
    """An association whose reactor waits for events instead of polling every millisecond."""

    _activity: threading.Event

    def run_reactor(self) -> None:
        if not self._started_dul:
            self.dul.start()
            self._started_dul = True
            self._dul_ready.wait()
        if not self.is_acceptor:
            if not (self.is_established or self.is_aborted or self.is_released or self.is_rejected):
                self.acse.negotiate_association()
            if self.is_established:
                self._run_reactor()
            return
        try:
            primitive = self._await_request()
            if primitive is None:  # nothing (complete) within the ACSE timeout, or it left
                return
            self.requestor.primitive = primitive
            evt.trigger(self, evt.EVT_REQUESTED, {})
            if not self.is_aborted and not self.is_rejected:
                self.acse.negotiate_association()
            if self.is_established:
                self._run_reactor()
        finally:
            if self.dul.is_alive():
                self.kill()

    def _await_request(self) -> Any:
        """The A-ASSOCIATE-RQ indication, or ``None`` once the ACSE timeout passes, the
        connection closes or the association is killed."""
        timeout = self.acse_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        dul = cast(_DUL, self.dul)
        while True:
            self._activity.clear()
            primitive = dul.receive_pdu(wait=False)
            if primitive is not None:
                return primitive
            if self._kill or dul.closed.is_set() or not dul.is_alive():
                return None
            wait = _LONGEST_WAIT
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return None
            self._activity.wait(wait)

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._activity.wait(self._until_idle())
            self._activity.clear()
            self._reactor_checkpoint.wait()
            # Announce the work before looking at the checkpoint again: a send_*() that paused
            # us in between would otherwise see us paused while we take its response off the
            # queue (pynetdicom's reactor has that race; the sender then waits out its DIMSE
            # timeout and aborts).
            self._is_paused = False
            if not self._reactor_checkpoint.is_set():
                continue
            if self._kill:
                return
            context_id, message = self.dimse.get_msg(block=False)
            if message is not None:
                self._serve_request(message, cast(int, context_id))
                self.dul._idle_timer.restart()  # our own work is not the peer's idleness
                self._activity.set()  # more may be queued
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.info("association with %s idle for the network timeout", _peer_of(self))
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self.release()  # aborts if the peer does not answer within the ACSE timeout
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

    def _until_idle(self) -> float:
        timer = self.dul._idle_timer
        if timer.timeout is None:
            return _LONGEST_WAIT
        return max(0.0, min(_LONGEST_WAIT, timer.remaining))

    def kill(self) -> None:
        self._activity.set()
        dul = cast(_DUL, self.dul)
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        # The DUL ends once the connection is closed; give it a moment to send what it has
        # (an A-ABORT, an A-RELEASE-RP), then close the connection under it.
        started = time.monotonic()
        closed_it = False
        while dul.is_alive() and not dul.stop_dul():
            waited = time.monotonic() - started
            if waited > 2.0 and not closed_it:
                wrapper = dul.socket
                if wrapper is not None:
                    wrapper.close()
                closed_it = True
            elif waited > 7.0:
                log.error("the upper layer of %s did not stop; leaving it", _peer_of(self))
                return
            dul.join(0.05)


def _abort_pdu() -> bytes:
    # A-ABORT, source 2 (service provider), reason 0 (not specified): PS3.8 9.3.8
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x00)


def _close_all(sockets: tuple[socket.socket, ...]) -> None:
    for item in sockets:
        item.close()


def _peer_of(assoc: Association) -> str:
    remote = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    try:
        return f"{remote.address}:{remote.port}"
    except Exception:  # noqa: BLE001 - before the address is known
        return "(unknown peer)"


def close_transport(assoc: Association) -> None:
    """Close whatever socket an association still has (after its end, or a failed connect)."""
    wrapper = assoc.dul.socket
    if wrapper is not None and wrapper.socket is not None:
        with contextlib.suppress(OSError):
            wrapper.socket.close()


def connect_error(assoc: Association) -> OSError | None:
    """Why an association's transport connection could not be made, if it could not."""
    wrapper = assoc.dul.socket
    return wrapper.connect_error if isinstance(wrapper, _AssociationSocket) else None


def adopt(assoc: Association, limits: NetworkLimits) -> _Association:
    """Give a freshly created association (not started, no socket yet) pacsai's upper layer,
    message assembly and reactor."""
    if assoc.dul.socket is not None or assoc._started_dul:
        raise RuntimeError("only a new association can be adopted")
    assoc.__class__ = _Association
    adopted = cast(_Association, assoc)
    adopted._activity = threading.Event()
    dul = _DUL(adopted, limits)
    dul._notify_user = adopted._activity.set
    adopted.dul = dul
    adopted.dimse = _DIMSE(adopted, limits)
    # the timeouts live on the DUL's timers: set them again on the new ones
    adopted.acse_timeout = adopted.acse_timeout
    adopted.network_timeout = adopted.network_timeout
    return adopted


class AE(_AE):
    """pynetdicom's application entity whose associations use pacsai's upper layer.

    Parameters
    ----------
    ae_title
        Our AE title.
    limits
        What an association may make us hold in memory.
    """

    def __init__(self, ae_title: str = "PYNETDICOM", limits: NetworkLimits | None = None):
        super().__init__(ae_title=ae_title)
        self.limits = limits or NetworkLimits()

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        # Called by associate() with the new requestor association: the one place to adopt it.
        adopt(assoc, self.limits)
        sock = _AssociationSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


# --- the acceptor -------------------------------------------------------------------------------


class AcceptorHooks(Protocol):
    """What the receiver decides and records about connections and associations."""

    def admit_connection(self, host: str) -> str | None:
        """Why a new connection is refused, or ``None`` to serve it (it is counted in until
        :meth:`connection_closed`)."""

    def connection_closed(self, host: str) -> None:
        """A connection admitted is closed."""

    def connection_refused(self, host: str, reason: str) -> None:
        """A connection was refused before a byte was read."""

    def tls_failed(self, host: str, error: str) -> None:
        """A peer that spoke failed the TLS handshake."""

    def prepare(self, assoc: Association) -> None:
        """A new acceptor association, before it starts (to replace its ACSE, for one)."""

    def association_ended(self, assoc: Association) -> None:
        """Its thread has ended (released, aborted, rejected, timed out or given up on)."""


# A-ASSOCIATE-RJ: rejected-transient, service provider (presentation), local limit exceeded
_LIMIT_REJECTION = A_ASSOCIATE_RJ()
_LIMIT_REJECTION.result, _LIMIT_REJECTION.source, _LIMIT_REJECTION.reason_diagnostic = 2, 3, 2
_LIMIT_REJECTION_BYTES = _LIMIT_REJECTION.encode()


class _Refuser:
    """Answers connections refused at accept with an A-ASSOCIATE-RJ, in the protocol's order.

    The rejection answers the peer's A-ASSOCIATE-RQ: sent before the request, a requestor may
    take it (and the FIN after it) for an abort; closed with the request unread, the socket
    would answer with a reset that can destroy the rejection before the peer reads it. So one
    thread (not one per connection: a flood must cost no threads) waits for each peer's first
    bytes, drops them, sends the rejection and a FIN, waits for the peer to close its side and
    closes; a peer silent or lingering for ``linger`` seconds is simply closed. Beyond
    ``capacity`` connections waiting, a refused connection is closed at once.
    """

    def __init__(self, rejection: bytes, *, linger: float = 5.0, capacity: int = 256) -> None:
        self.rejection = rejection
        self.linger = linger
        self.capacity = capacity
        self._waiting: dict[socket.socket, float] = {}  # -> deadline
        self._answered: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._wake: tuple[socket.socket, socket.socket] | None = None  # made with the thread
        self._thread: threading.Thread | None = None
        self._stopped = False

    def refuse(self, connection: socket.socket) -> None:
        """Reject ``connection`` once its request has arrived, then close it."""
        with self._lock:
            if self._stopped or len(self._waiting) >= self.capacity:
                connection.close()
                return
            connection.setblocking(False)
            self._waiting[connection] = time.monotonic() + self.linger
            if self._thread is None:
                self._wake = socket.socketpair()
                self._thread = threading.Thread(
                    target=self._run,
                    args=self._wake,
                    name="pacsai-refused-connections",
                    daemon=True,
                )
                self._thread.start()
        self._nudge()

    def _nudge(self) -> None:
        """Wake the thread: a connection to watch, or stop."""
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake[1].send(b"\0")

    def holds(self, connection: socket.socket) -> bool:
        """Whether ``connection`` is waiting here to be answered and closed."""
        with self._lock:
            return connection in self._waiting

    def stop(self) -> None:
        """Close every connection still waiting."""
        with self._lock:
            self._stopped = True
            waiting, self._waiting = list(self._waiting), {}
            self._answered.clear()
        for connection in waiting:
            connection.close()
        self._nudge()

    def _close(self, connection: socket.socket) -> None:
        with self._lock:
            self._waiting.pop(connection, None)
            self._answered.discard(connection)
        connection.close()

    def _run(self, wake_reader: socket.socket, wake_writer: socket.socket) -> None:
        try:
            self._serve(wake_reader)
        finally:
            wake_reader.close()
            wake_writer.close()

    def _serve(self, wake_reader: socket.socket) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                now = time.monotonic()
                expired = [c for c, deadline in self._waiting.items() if deadline <= now]
                waiting = [c for c in self._waiting if c not in expired]
                timeout = min(self._waiting.values(), default=now + 60) - now
            for connection in expired:
                self._close(connection)
            try:
                readable, _, _ = select.select([wake_reader, *waiting], [], [], max(0.0, timeout))
            except (OSError, ValueError):  # a socket closed by stop(): look again
                continue
            for connection in readable:
                if connection is wake_reader:
                    with contextlib.suppress(OSError):
                        wake_reader.recv(_DISCARD_CHUNK)
                    continue
                self._read(connection)

    def _read(self, connection: socket.socket) -> None:
        try:
            data = connection.recv(_DISCARD_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the peer closed its side (after our rejection, or without a request)
            self._close(connection)
            return
        with self._lock:
            answered = connection in self._answered
            self._answered.add(connection)
        if not answered:  # its request (or the start of it): answer it
            try:
                connection.send(self.rejection)
                connection.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(connection)


@dataclass(slots=True)
class _Connection:
    host: str
    handshaken: bool = False
    association: _Association | None = None


class AcceptorServer(ThreadedAssociationServer):
    """pynetdicom's association server, counting and bounding connections from accept on.

    Created by ``AE.make_server(..., server_class=AcceptorServer, hooks=..., limits=...)``.
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # socketserver's 5 makes a burst of connects wait for SYN retries

    def __init__(
        self,
        *args: Any,
        hooks: AcceptorHooks,
        limits: NetworkLimits,
        reuse_port: bool = False,
        **kwargs: Any,
    ) -> None:
        self.hooks = hooks
        self.limits = limits
        self.reuse_port = reuse_port
        self._connections: dict[socket.socket, _Connection] = {}
        self._lock = threading.Lock()
        self._refuser = _Refuser(_LIMIT_REJECTION_BYTES)
        kwargs.setdefault("request_handler", AcceptorHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        assert self.socket is not None
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        no_delay(client)
        if self.ssl_context:
            # The handshake happens in the connection's own thread (AcceptorHandler), so that
            # a slow or silent client does not stall the accept loop.
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        with self._lock:
            reason = self.hooks.admit_connection(host)
            if reason is None:
                self._connections[request] = _Connection(host)
                return True
        self.hooks.connection_refused(host, reason)
        if isinstance(request, ssl.SSLSocket):
            return False  # socketserver closes it (no handshake: no place for a rejection)
        self._refuser.refuse(request)
        return False

    def shutdown_request(self, request: Any) -> None:
        """socketserver closes a request it refused or finished; a refused one is closed by the
        refuser once its peer has read the rejection."""
        if self._refuser.holds(request):
            return
        super().shutdown_request(request)

    def server_close(self) -> None:
        self._refuser.stop()
        super().server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread for it (the process is out of threads)
            self.forget(request)
            raise

    def service_actions(self) -> None:
        """Nothing: pynetdicom runs a full ``gc.collect()`` here every 60 polls of the accept
        loop (every 12 s when idle), stalling every association of the process while it runs;
        Python's own collector frees the association threads' cycles."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unexpected error serving a connection from %s", client_address[0])

    def forget(self, request: socket.socket) -> None:
        with self._lock:
            connection = self._connections.pop(request, None)
        if connection is not None:
            self.hooks.connection_closed(connection.host)

    def note(self, request: socket.socket, **changes: Any) -> None:
        with self._lock:
            connection = self._connections.get(request)
            if connection is not None:
                for name, value in changes.items():
                    setattr(connection, name, value)

    def associations(self) -> list[_Association]:
        """The associations of open connections (established or not)."""
        with self._lock:
            return [c.association for c in self._connections.values() if c.association]

    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def close_connections(self, *, established: bool) -> int:
        """Shut down connections under their readers; `established`: also those with an
        established association (else only those without one). Returns how many."""
        with self._lock:
            chosen = [
                request
                for request, c in self._connections.items()
                if established or c.association is None or not c.association.is_established
            ]
        for request in chosen:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)
        return len(chosen)


class AcceptorHandler(RequestHandler):
    """Serves one connection: waits for the first byte, does the TLS handshake, runs the
    association, then closes the connection and reports the end, whatever happened."""

    server: AcceptorServer

    def handle(self) -> None:
        connection: socket.socket = self.request
        assoc: _Association | None = None
        try:
            if not self._admit(connection):
                return
            assoc = self._create_association()
            self.server.note(connection, association=assoc)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
        finally:
            self.server.forget(connection)
            with contextlib.suppress(OSError):
                connection.close()
            if assoc is not None:
                self.server.hooks.association_ended(assoc)

    def _admit(self, connection: socket.socket) -> bool:
        """Wait for the peer's first byte, then complete the TLS handshake.

        A connection closed (or silent for the ACSE timeout) before its first byte is a bare
        connect: a port probe, a load balancer's health check. It creates no association and on
        a TLS port is no security alert.
        """
        timeout = self.server.ae.acse_timeout
        if not _peer_speaks(connection, timeout):
            return False
        if not isinstance(connection, ssl.SSLSocket):
            return True
        try:
            connection.settimeout(timeout)
            connection.do_handshake()
            connection.settimeout(None)
        except (ssl.SSLError, OSError) as exc:
            self.server.hooks.tls_failed(
                str(self.client_address[0]), f"TLS handshake failed: {exc}"
            )
            return False
        self.server.note(connection, handshaken=True)
        return True

    def _create_association(self) -> _Association:
        assoc = Association(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        adopted = adopt(assoc, self.server.limits)
        adopted.network_timeout_response = "A-RELEASE"  # idle peers are released, not aborted
        adopted.set_socket(_AssociationSocket(adopted, client_socket=self.request))
        acceptor = adopted.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = self.server.ae_title
        acceptor.address_info = self.local
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        acceptor.supported_contexts = deepcopy(self.server.contexts)
        adopted.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                adopted.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list[tuple[Callable[..., Any], Any]], handlers):
                    adopted.bind(event, handler[0], handler[1])
        self.server.hooks.prepare(adopted)
        return adopted


def _peer_speaks(connection: socket.socket, timeout: float | None) -> bool:
    """Wait for the first byte (A-ASSOCIATE-RQ, or a TLS ClientHello) without consuming it."""
    try:
        connection.settimeout(timeout)
        # socket.socket's own recv: on a TLS connection, the raw bytes before the handshake
        return bool(socket.socket.recv(connection, 1, socket.MSG_PEEK))
    except OSError:  # includes the timeout
        return False
