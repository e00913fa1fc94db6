"""The storage SCP: a pynetdicom AE that serves Verification and every Storage SOP class."""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable
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
from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    Verification,
)

from pacsai._pynetdicom import AE, AcceptorServer, NetworkLimits, protocol_error
from pacsai.config import NodeSettings
from pacsai.db import AssociationOutcome
from pacsai.errors import ConfigError, PacsaiError, ReceiveError
from pacsai.scp.counts import NodeCounts
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
        policy = self._receiver.policy
        verdict = self._receiver.admit_association(
            self.assoc,
            lambda active: policy.check(
                calling_ae_title=calling, called_ae_title=called, host=host, active=active
            ),
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


class _RefusalAlerts:
    """Connections refused at accept are audited at most once a minute per host, with the
    number refused since the last audit: a flood must not flood the audit trail too. The audit
    is written by a thread of its own, never by the accept loop."""

    def __init__(self, instances: InstanceStore, *, interval: float = 60.0) -> None:
        self._instances = instances
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._pending: dict[str, tuple[int, str]] = {}
        self._outbox: queue.SimpleQueue[tuple[str, int, str] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    def refused(self, host: str, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            count = self._pending.get(host, (0, reason))[0] + 1
            if now - self._last.get(host, -self._interval) < self._interval:
                self._pending[host] = (count, reason)
                return
            self._last[host] = now
            self._pending.pop(host, None)
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write, name="pacsai-refusal-audit", daemon=True
                )
                self._writer.start()
        self._outbox.put((host, count, reason))

    def flush(self) -> None:
        """Audit what was refused since each host's last audit, and stop the writer."""
        with self._lock:
            pending, self._pending = self._pending, {}
            writer = self._writer
        for host, (count, reason) in pending.items():
            self._outbox.put((host, count, reason))
        if writer is None:
            self._write_all()
            return
        self._outbox.put(None)
        writer.join()

    def _write(self) -> None:
        while (item := self._outbox.get()) is not None:
            self._audit(*item)

    def _write_all(self) -> None:
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._audit(*item)

    def _audit(self, host: str, count: int, reason: str) -> None:
        self._instances.audit_rejection(
            calling_ae_title="",
            called_ae_title="",
            host=host,
            explanation=f"{count} connection(s) refused at accept: {reason}",
        )


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
    counts
        The node's open connections and associations, shared with the other receiver processes
        on the port (``None``: this receiver is the node's only one).
    max_instance_bytes
        The largest data set kept (``storage.max_instance_mb``); larger ones are refused with
        0xA700 and never held in memory beyond it (``None``: no limit).
    """

    def __init__(
        self,
        node: NodeSettings,
        *,
        instances: InstanceStore,
        reuse_port: bool = False,
        counts: NodeCounts | None = None,
        max_instance_bytes: int | None = None,
    ) -> None:
        self.settings_node = node
        self.instances = instances
        self.policy = AssociationPolicy(node)
        self.counts = counts if counts is not None else NodeCounts()
        self._counted: set[Association] = set()  # associations counted in (to count out once)
        self.mpps = MppsService(instances.database)
        self.reuse_port = reuse_port
        self.limits = _limits(node, max_instance_bytes)
        self._states: dict[Association, AssociationState] = {}
        self._lock = threading.Lock()
        self._server: AcceptorServer | None = None
        self._thread: threading.Thread | None = None
        self._alerts = _RefusalAlerts(instances)
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        node = self.settings_node
        ae = AE(ae_title=node.ae_title, limits=self.limits)
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
            for event in (evt.EVT_ACCEPTED, evt.EVT_RELEASED, evt.EVT_ABORTED)
        ]
        context = server_ssl_context(node)
        try:
            server: AcceptorServer = self.ae.make_server(  # type: ignore[assignment]
                (node.host, node.port),
                evt_handlers=handlers,
                ssl_context=context,
                server_class=AcceptorServer,
                hooks=self,
                limits=self.limits,
                reuse_port=self.reuse_port,
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
        """Stop accepting; give open associations `grace_seconds` to finish, then abort them.

        Connections without an association (silent, mid-handshake, mid-request) are closed at
        once. Returns within `grace_seconds` plus about three seconds, whatever peers do.
        """
        server = self._server
        if server is None:
            return
        deadline = time.monotonic() + grace_seconds
        server.shutdown()  # stops the accept loop and closes the listening socket
        server.close_connections(established=False)
        while self._established(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._established(server):
            log.warning("aborting the association from %s at shutdown", assoc.requestor.ae_title)
            assoc.abort(block=False)
        closing = time.monotonic() + 1.0
        while server.open_connections() and time.monotonic() < closing:
            time.sleep(0.05)
        server.close_connections(established=True)
        closing = time.monotonic() + 2.0
        while server.open_connections() and time.monotonic() < closing:
            time.sleep(0.05)
        with self._lock:
            leftovers = list(self._states)
        for assoc in leftovers:
            self.end(assoc, AssociationOutcome.ABORTED)
        self._alerts.flush()
        self.instances.shutdown()
        self._server = None

    @staticmethod
    def _established(server: AcceptorServer) -> list[Association]:
        return [a for a in server.associations() if a.is_established and a.is_alive()]

    # --- AcceptorHooks ----------------------------------------------------------------------

    def admit_connection(self, host: str) -> str | None:
        return self.counts.admit_connection(host, self.policy.admit_connection)

    def connection_closed(self, host: str) -> None:
        self.counts.connection_closed(host)

    def admit_association(self, assoc: Association, check: Callable[[int], Any]) -> Any:
        """The policy's verdict on an association request given the node's established
        associations (``check(active)``); accepted, it is counted in until it ends."""
        verdict = self.counts.admit_association(check)
        if verdict is None:
            with self._lock:
                self._counted.add(assoc)
        return verdict

    def connection_refused(self, host: str, reason: str) -> None:
        log.warning(
            "refused a connection from %s: %s", host, reason, extra={"action": "connection_refused"}
        )
        self._alerts.refused(host, reason)

    def tls_failed(self, host: str, error: str) -> None:
        self.instances.audit_rejection(
            calling_ae_title="", called_ae_title="", host=host, explanation=error
        )

    def prepare(self, assoc: Association) -> None:
        assoc.acse = _PolicyACSE(assoc, self)

    def association_ended(self, assoc: Association) -> None:
        """Whatever ended it, an accepted association is recorded as ended, and its state (and
        whatever it held) freed; one the node gave up on is recorded ABORTED."""
        with self._lock:
            counted = assoc in self._counted
            self._counted.discard(assoc)
        if counted:
            self.counts.association_ended()
        self.end(assoc, AssociationOutcome.ABORTED)

    # --- association records ----------------------------------------------------------------

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

    def end(self, assoc: Association, outcome: AssociationOutcome) -> None:
        """Record how an association ended (once, whichever event comes first)."""
        with self._lock:
            state = self._states.pop(assoc, None)
        if state is None:
            return
        try:
            self.instances.close(state, outcome)
        except PacsaiError as exc:
            log.error("could not record the end of association %s: %s", state.id, exc)
        violation = protocol_error(assoc)
        log.info(
            "association from %s %s: %d stored, %d refused%s",
            state.calling_ae_title,
            str(outcome).lower(),
            state.stored,
            state.failed,
            f" ({violation})" if violation else "",
            extra={"action": "association_ended", "association_id": state.id},
        )


def _limits(node: NodeSettings, max_instance_bytes: int | None) -> NetworkLimits:
    """The receiver's bounds on what a peer can make it hold."""
    command_and_headers = 1 << 20
    if node.max_pdu_size > 0:
        max_pdu = node.max_pdu_size
    elif max_instance_bytes is not None:
        max_pdu = max_instance_bytes + command_and_headers
    else:
        max_pdu = 0xFFFFFFFF
    return NetworkLimits(max_pdu_length=max_pdu, max_dataset_bytes=max_instance_bytes)
