"""MLLP, the HL7 Minimal Lower Layer Protocol (HL7 v2.5.1 Appendix C.4): framing, a client
exchange and a threaded listener.

A message travels as ``<VT> message <FS><CR>`` (0x0B, then 0x1C 0x0D) over TCP, optionally inside
TLS. The client sends one message and waits for the one message that answers it (the ACK); the
listener keeps a connection open for as many messages as the peer sends, answering each.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Sequence

from pacsai.errors import DeliveryError, ReceiveError

__all__ = [
    "END_BLOCK",
    "MAX_MESSAGE_BYTES",
    "START_BLOCK",
    "FrameReader",
    "MllpServer",
    "exchange",
    "frame",
]

log = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_MESSAGE_BYTES = 16 * 2**20  # far above any order or ACK; a runaway peer is cut off


def frame(message: bytes) -> bytes:
    """``message`` wrapped in the MLLP start and end blocks."""
    if START_BLOCK in message or b"\x1c" in message:
        raise ValueError("an HL7 message cannot contain the MLLP block characters 0x0B or 0x1C")
    return START_BLOCK + message + END_BLOCK


class FrameReader:
    """Reads MLLP frames from a connected socket; bytes before a start block are skipped."""

    def __init__(self, connection: socket.socket, *, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._connection = connection
        self._buffer = bytearray()
        self._max_bytes = max_bytes

    def read(self) -> bytes | None:
        """The next message (without its blocks), or ``None`` when the peer closed the
        connection between messages.

        Raises
        ------
        OSError
            On a socket error or timeout, and when the peer closes the connection in the middle
            of a message or sends one longer than ``max_bytes`` (``ConnectionError``).
        """
        while True:
            start = self._buffer.find(START_BLOCK)
            if start < 0:
                self._buffer.clear()
            else:
                del self._buffer[:start]
                end = self._buffer.find(END_BLOCK)
                if end >= 0:
                    message = bytes(self._buffer[1:end])
                    del self._buffer[: end + len(END_BLOCK)]
                    return message
                if len(self._buffer) > self._max_bytes:
                    raise ConnectionError(f"an MLLP message exceeded {self._max_bytes} bytes")
            chunk = self._connection.recv(65536)
            if not chunk:
                if self._buffer:
                    raise ConnectionError(
                        "the peer closed the connection in the middle of a message"
                    )
                return None
            self._buffer += chunk


def exchange(
    host: str,
    port: int,
    message: bytes,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """Send one message and return the message that answers it.

    Raises
    ------
    DeliveryError
        If the peer cannot be reached (refused, unreachable, TLS handshake failed), or closes
        the connection or stays silent for ``timeout`` seconds before answering.
    """
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = ssl_context.wrap_socket(raw, server_hostname=host) if ssl_context else raw
            with connection:
                connection.sendall(frame(message))
                answer = FrameReader(connection).read()
    except TimeoutError as exc:
        raise DeliveryError(f"no answer from {where} within {timeout:g} s") from exc
    except ssl.SSLError as exc:
        raise DeliveryError(f"TLS with {where} failed: {exc.reason or exc}") from exc
    except OSError as exc:
        raise DeliveryError(
            f"could not exchange a message with {where}: {exc.strerror or exc}: is the "
            "receiver running, and are its host and port right?"
        ) from exc
    if answer is None:
        raise DeliveryError(f"{where} closed the connection without answering")
    return answer


#: Answers one message: (message, peer address) -> the answer, or ``None`` to close the
#: connection without answering.
Handler = Callable[[bytes, str], bytes | None]


class _Connection(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        peer = str(self.client_address[0])
        connection: socket.socket = self.request
        if self.server.allowed_hosts and peer not in self.server.allowed_hosts:
            log.warning(
                "refused an HL7 connection from %s: not in allowed_hosts",
                peer,
                extra={"action": "mllp_refused"},
            )
            return
        connection.settimeout(self.server.idle_timeout)
        reader = FrameReader(connection)
        while True:
            try:
                message = reader.read()
            except OSError:  # timeout, reset, oversized or truncated message: drop the peer
                return
            if message is None:
                return
            try:
                answer = self.server.handler(message, peer)
            except Exception:  # the handler's bug must not end the listener
                log.exception("the HL7 message handler failed", extra={"action": "mllp"})
                return
            if answer is None:
                return
            try:
                connection.sendall(frame(answer))
            except OSError:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    handler: Handler
    allowed_hosts: frozenset[str]
    idle_timeout: float


class MllpServer:
    """A threaded MLLP listener: one thread per connection, each message answered in turn.

    Parameters
    ----------
    host, port
        Where to listen (port 0: any free port, see :attr:`port`).
    handler
        Answers each message; it runs in the connection's thread.
    allowed_hosts
        Peer addresses that may connect (any when empty); others are closed at once.
    idle_timeout
        Seconds a connection may stay silent before it is closed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        allowed_hosts: Sequence[str] = (),
        idle_timeout: float = 60.0,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.handler = handler
        self.allowed_hosts = frozenset(allowed_hosts)
        self.idle_timeout = idle_timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port bound."""
        if self._server is None:
            raise ReceiveError("the MLLP listener is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in a background thread.

        Raises
        ------
        ReceiveError
            If the address cannot be bound.
        """
        try:
            server = _Server((self.host, self.requested_port), _Connection)
        except OSError as exc:
            raise ReceiveError(
                f"cannot listen for HL7 on {self.host}:{self.requested_port}: {exc.strerror}"
            ) from exc
        server.handler = self.handler
        server.allowed_hosts = self.allowed_hosts
        server.idle_timeout = self.idle_timeout
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="pacsai-mllp"
        )
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting connections and close the listening socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with contextlib.suppress(OSError):
            server.server_close()
        if self._thread is not None:
            self._thread.join()
