"""The storage SCP: a pynetdicom AE that serves Verification and every Storage SOP class."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
import uuid
from typing import Any

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    Verification,
)
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pacsai.config import NodeSettings
from pacsai.errors import ConfigError, PacsaiError, ReceiveError
from pacsai.scp.handlers import (
    handle_association,
    handle_echo,
    handle_n_create,
    handle_n_set,
    handle_store,
)
from pacsai.scp.mpps import MppsService
from pacsai.scp.policy import AssociationPolicy
from pacsai.scp.store import AssociationState, InstanceStore

__all__ = ["TRANSFER_SYNTAXES", "Receiver", "server_ssl_context"]

log = logging.getLogger(__name__)

#: Accepted for every Storage SOP class; instances are stored in the syntax they arrived in.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]


def server_ssl_context(node: NodeSettings) -> ssl.SSLContext | None:
    """The TLS context of the receiver (PS3.15 B.1), or ``None`` when TLS is off.

    Raises
    ------
    ConfigError
        If a certificate, key or CA file cannot be loaded.
    """
    tls = node.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        assert tls.cert is not None and tls.key is not None  # checked by TlsSettings
        context.load_cert_chain(tls.cert, tls.key)
        if tls.ca is not None:
            context.load_verify_locations(cafile=tls.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node.tls: cannot load certificate, key or CA: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.ca is None:
        context.verify_mode = ssl.CERT_NONE
    return context


class _PolicyACSE(ACSE):
    """ACSE that asks the receiver's policy before pynetdicom's own negotiation."""

    def __init__(self, assoc: Association, receiver: Receiver) -> None:
        super().__init__(assoc)
        self._receiver = receiver

    def _negotiate_as_acceptor(self) -> None:
        request = self.requestor.primitive
        assert request is not None  # an acceptor negotiates only after an A-ASSOCIATE-RQ
        calling = str(request.calling_ae_title or "").strip()
        called = str(request.called_ae_title or "").strip()
        host = self.assoc.requestor.address
        active = sum(
            1
            for other in self._receiver.ae.active_associations
            if other.is_acceptor and other is not self.assoc and other.is_established
        )
        verdict = self._receiver.policy.check(
            calling_ae_title=calling, called_ae_title=called, host=host, active=active
        )
        if verdict is None:
            super()._negotiate_as_acceptor()
            return
        self._receiver.instances.audit_rejection(
            calling_ae_title=calling,
            called_ae_title=called,
            host=host,
            explanation=verdict.explanation,
        )
        rejection = verdict.rejection
        self.send_reject(rejection.result, rejection.source, rejection.reason)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


class _RequestHandler(RequestHandler):
    """Runs one connection: the TLS handshake in its own thread, then the association.

    The handler waits for the association to end and closes the connection itself: pynetdicom
    skips ``close()`` when ``shutdown()`` fails on a connection the peer has already dropped,
    which would leave the socket to the garbage collector.
    """

    server: _Server
    _association: Association | None = None

    def handle(self) -> None:
        try:
            if self._admit(self.request):
                super().handle()  # starts the association's thread
                assert self._association is not None
                self._association.join()  # it ends once its DUL has stopped using the socket
        finally:
            self.request.close()

    def _admit(self, connection: socket.socket) -> bool:
        """Wait for the peer's first byte, then complete the TLS handshake; audit a failed one.

        A connection closed (or silent for the ACSE timeout) before its first byte is a bare
        connect: a port probe, a load balancer's health check, a peer checking that we are up.
        It creates no association, holds up no shutdown, and on a TLS port is no security alert.
        """
        receiver = self.server.receiver
        if not self._peer_speaks(connection, receiver.settings_node.timeouts.acse):
            return False
        if not isinstance(connection, ssl.SSLSocket):
            return True
        previous = connection.gettimeout()
        connection.settimeout(receiver.settings_node.timeouts.acse)
        try:
            connection.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            receiver.instances.audit_rejection(
                calling_ae_title="",
                called_ae_title="",
                host=str(self.client_address[0]),
                explanation=f"TLS handshake failed: {exc}",
            )
            return False
        connection.settimeout(previous)
        return True

    @staticmethod
    def _peer_speaks(connection: socket.socket, timeout: float | None) -> bool:
        """Wait for the first byte (A-ASSOCIATE-RQ, or a TLS ClientHello) without consuming it;
        False if the peer closed the connection or sent nothing within the ACSE timeout."""
        previous = connection.gettimeout()
        connection.settimeout(timeout)
        try:
            # socket.socket's own recv: on a TLS connection, the raw bytes before the handshake
            return bool(socket.socket.recv(connection, 1, socket.MSG_PEEK))
        except OSError:  # includes the timeout
            return False
        finally:
            with contextlib.suppress(OSError):
                connection.settimeout(previous)

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.acse = _PolicyACSE(assoc, self.server.receiver)
        self._association = assoc
        return assoc


class _Server(ThreadedAssociationServer):
    """The association server: SO_REUSEPORT when several receiver processes share a port."""

    receiver: Receiver
    reuse_port: bool = False
    daemon_threads = True

    def server_bind(self) -> None:
        assert self.socket is not None
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


class Receiver:
    """A running storage SCP bound to one address.

    Parameters
    ----------
    node
        The ``node:`` settings.
    instances
        Stores instances and records associations.
    reuse_port
        Bind with SO_REUSEPORT, so that several receiver processes share the port.
    max_associations
        This receiver's share of ``node.max_associations`` (all of it by default).
    """

    def __init__(
        self,
        node: NodeSettings,
        *,
        instances: InstanceStore,
        reuse_port: bool = False,
        max_associations: int | None = None,
    ) -> None:
        self.settings_node = node
        self.instances = instances
        self.policy = AssociationPolicy(node, max_associations=max_associations)
        self.mpps = MppsService(instances.database)
        self.reuse_port = reuse_port
        self._states: dict[Association, AssociationState] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        node = self.settings_node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = 10_000  # the policy refuses first, with an audit event
        ae.maximum_pdu_size = node.max_pdu_size
        ae.acse_timeout = node.timeouts.acse
        ae.dimse_timeout = node.timeouts.dimse
        ae.network_timeout = node.timeouts.network
        ae.require_called_aet = False  # the policy checks it
        ae.require_calling_aet = []
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if node.mpps:
            ae.add_supported_context(
                ModalityPerformedProcedureStep, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
        return ae

    @property
    def port(self) -> int:
        """The port actually bound (useful when configured as 0)."""
        if self._server is None:
            raise ReceiveError("the receiver is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in a background thread.

        Raises
        ------
        ReceiveError
            If the address cannot be bound (in use, no permission).
        ConfigError
            If the TLS files cannot be loaded.
        """
        node = self.settings_node
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self]),
            (evt.EVT_N_CREATE, handle_n_create, [self]),
            (evt.EVT_N_SET, handle_n_set, [self]),
        ]
        handlers += [
            (event, handle_association, [self])
            for event in (evt.EVT_ACCEPTED, evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_CONN_CLOSE)
        ]
        context = server_ssl_context(node)

        class BoundServer(_Server):
            receiver = self
            reuse_port = self.reuse_port

        try:
            server: _Server = self.ae.make_server(  # type: ignore[assignment]
                (node.host, node.port),
                evt_handlers=handlers,
                ssl_context=context,
                server_class=BoundServer,
                request_handler=_RequestHandler,
            )
        except OSError as exc:
            raise ReceiveError(
                f"cannot listen on {node.host}:{node.port}: {exc.strerror}; "
                "is another DICOM node using this port (node.port)?"
            ) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="pacsai-receiver"
        )
        self._thread.daemon = True
        self._thread.start()
        self.ae._servers.append(server)

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting associations; give open ones `grace_seconds` to finish, then abort."""
        server = self._server
        if server is None:
            return
        server.shutdown()  # stops the accept loop and closes the listening socket
        deadline = time.monotonic() + grace_seconds
        while self._open_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._open_associations():
            log.warning("aborting association from %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        for assoc in list(self._states):
            assoc.join(timeout=5)
        self._server = None

    def _open_associations(self) -> list[Association]:
        return [a for a in self.ae.active_associations if a.is_acceptor and a.is_alive()]

    def state_of(self, assoc: Association) -> AssociationState:
        """The state of an accepted association (created if an event was missed)."""
        with self._lock:
            state = self._states.get(assoc)
        return state if state is not None else self.begin(assoc)

    def begin(self, assoc: Association) -> AssociationState:
        """Record an accepted association."""
        requestor = assoc.requestor
        calling = str(requestor.ae_title).strip()
        state = AssociationState(
            id=str(uuid.uuid4()),
            calling_ae_title=calling,
            called_ae_title=str(
                getattr(requestor.primitive, "called_ae_title", None) or assoc.acceptor.ae_title
            ).strip(),
            remote_host=str(requestor.address),
            remote_port=int(requestor.port),
            tls=self.settings_node.tls.enabled,
            quiet_seconds=self.policy.quiet_seconds(calling, str(requestor.address)),
        )
        with self._lock:
            existing = self._states.get(assoc)
            if existing is not None:
                return existing
            self._states[assoc] = state
        self.instances.open(state)
        log.info(
            "association from %s (%s:%d) accepted",
            calling,
            state.remote_host,
            state.remote_port,
            extra={"action": "association_accepted", "association_id": state.id},
        )
        return state

    def end(self, assoc: Association, outcome: Any) -> None:
        """Record how an association ended (once, whichever event comes first)."""
        with self._lock:
            state = self._states.pop(assoc, None)
        if state is None:
            return
        try:
            self.instances.close(state, outcome)
        except PacsaiError as exc:
            log.error("could not record the end of association %s: %s", state.id, exc)
        log.info(
            "association from %s %s: %d stored, %d refused",
            state.calling_ae_title,
            str(outcome).lower(),
            state.stored,
            state.failed,
            extra={"action": "association_ended", "association_id": state.id},
        )
