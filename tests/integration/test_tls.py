"""DICOM TLS (PS3.15 B.1) over real sockets: mutual authentication, refusals, and the audit trail.

A test CA signs the node's certificate (SAN 127.0.0.1 and localhost) and a client certificate;
a second CA signs a client certificate the node must not trust.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.uid import CTImageStorage
from pynetdicom.association import Association as ScuAssociation
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket
from sqlalchemy import select

from pacsai._pynetdicom import (
    AE,  # pynetdicom, its response race fixed (see there)
    AcceptorServer,
)
from pacsai.db import Association, AssociationOutcome, AuditEvent, AuditEventId, Instance
from pacsai.service import Node
from tests.support import make_ct_series, wait_for

# --- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Pair
    client: Pair
    untrusted_client: Pair
    other_ca: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pacsai tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(directory: Path, name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey, Path]:
    key = _key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key, _write_cert(cert, directory / f"{name}.crt")


def _leaf(
    directory: Path,
    name: str,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey, Path],
    *,
    server: bool,
) -> Pair:
    issuer_cert, issuer_key, _ = issuer
    key = _key()
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    return Pair(
        _write_cert(cert, directory / f"{name}.crt"), _write_key(key, directory / f"{name}.key")
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _ca(directory, "test-ca")
    other = _ca(directory, "other-ca")
    return Pki(
        ca=ca[2],
        server=_leaf(directory, "server", ca, server=True),
        client=_leaf(directory, "client", ca, server=False),
        untrusted_client=_leaf(directory, "intruder", other, server=False),
        other_ca=other[2],
    )


# --- helpers ------------------------------------------------------------------------------------


def _tls_node(
    start_node: Callable[..., Node], pki: Pki, *, require_client_cert: bool = True
) -> Node:
    return start_node(
        node={
            "tls": {
                "enabled": True,
                "cert": str(pki.server.cert),
                "key": str(pki.server.key),
                "ca": str(pki.ca),
                "require_client_cert": require_client_cert,
            },
            "timeouts": {"acse": 10},
        }
    )


class _ClientContext(ssl.SSLContext):
    """A client TLS context that keeps the sockets it wraps, so that a test can close them.

    When a handshake fails, pynetdicom's requestor can drop its socket unclosed (it skips
    ``close()`` when ``shutdown()`` fails), and the traceback it logs keeps that socket alive
    until a garbage collection in some later test, whose ResourceWarning would fail that test.
    """

    @property
    def sockets(self) -> list[socket.socket]:
        return cast(list[socket.socket], self.__dict__.setdefault("wrapped", []))

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.sockets.append(sock)
        return sock


def _client_context(pki: Pki, client: Pair | None, *, ca: Path | None = None) -> _ClientContext:
    context = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca or pki.ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


def _associate(
    node: Node, calling: str, *, tls: ssl.SSLContext | None, server_hostname: str = "localhost"
) -> ScuAssociation:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 10
    ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    kwargs: dict[str, Any] = {"ae_title": node.settings.node.ae_title}
    if tls is not None:
        kwargs["tls_args"] = (tls, server_hostname)
    return ae.associate("127.0.0.1", node.receiver.port, **kwargs)


def _assert_refused(assoc: ScuAssociation, sockets: list[socket.socket]) -> None:
    """The SCU did not get an association; its `sockets` are closed before the next test."""
    assert not assoc.is_established
    wait_for(lambda: not assoc.is_alive() and not assoc.dul.is_alive())
    for sock in sockets:
        sock.close()


def _keep_accepted_sockets(monkeypatch: pytest.MonkeyPatch) -> list[socket.socket]:
    """Every connection the node's receivers accept from now on."""
    accepted: list[socket.socket] = []
    get_request = AcceptorServer.get_request

    def keep(self: AcceptorServer) -> tuple[socket.socket, Any]:
        request = get_request(self)
        accepted.append(request[0])
        return request

    monkeypatch.setattr(AcceptorServer, "get_request", keep)
    return accepted


def _security_alerts(node: Node) -> list[AuditEvent]:
    with node.database.reading() as session:
        return list(
            session.execute(
                select(AuditEvent)
                .where(AuditEvent.event_id == str(AuditEventId.SECURITY_ALERT))
                .order_by(AuditEvent.id)
            ).scalars()
        )


def _tls_failures(node: Node) -> list[AuditEvent]:
    return [
        event
        for event in _security_alerts(node)
        if "TLS handshake failed" in json.loads(event.detail or "{}").get("reason", "")
    ]


def _associations(node: Node) -> list[Association]:
    with node.database.reading() as session:
        return list(session.execute(select(Association)).scalars())


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_a_client_with_a_trusted_certificate_can_echo_and_store(
    start_node: Callable[..., Node], pki: Pki, server_hostname: str
) -> None:
    node = _tls_node(start_node, pki)
    datasets = make_ct_series(3)

    assoc = _associate(
        node, "TLSSCU", tls=_client_context(pki, pki.client), server_hostname=server_hostname
    )
    assert assoc.is_established
    try:
        assert int(assoc.send_c_echo().Status) == 0
        statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()

    assert statuses == [0, 0, 0]
    wait_for(lambda: all(a.ended_at is not None for a in _associations(node)))
    [association] = _associations(node)
    assert association.tls is True
    assert association.calling_ae_title == "TLSSCU"
    assert association.instances_stored == 3
    with node.database.reading() as session:
        stored = {i.sop_instance_uid for i in session.execute(select(Instance)).scalars()}
    assert stored == {ds.SOPInstanceUID for ds in datasets}
    assert _security_alerts(node) == []


@pytest.mark.parametrize("client", ["none", "untrusted"])
def test_a_client_without_a_trusted_certificate_cannot_associate(
    start_node: Callable[..., Node], pki: Pki, client: str
) -> None:
    node = _tls_node(start_node, pki)
    pair = None if client == "none" else pki.untrusted_client

    context = _client_context(pki, pair)
    assoc = _associate(node, "INTRUDER", tls=context)

    _assert_refused(assoc, context.sockets)
    failures = wait_for(lambda: _tls_failures(node))
    assert len(failures) == 1
    assert failures[0].remote_address == "127.0.0.1"
    assert failures[0].outcome == 4
    assert _associations(node) == []
    with node.database.reading() as session:
        assert session.execute(select(Instance)).first() is None


def test_a_plain_tcp_client_cannot_associate_with_a_tls_node(
    start_node: Callable[..., Node], pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _tls_node(start_node, pki)
    sockets: list[socket.socket] = []
    create = AssociationSocket._create_socket

    def keep(self: AssociationSocket, address: Any) -> socket.socket:
        sockets.append(create(self, address))
        return sockets[-1]

    monkeypatch.setattr(AssociationSocket, "_create_socket", keep)

    assoc = _associate(node, "PLAINSCU", tls=None)

    _assert_refused(assoc, sockets)
    assert len(wait_for(lambda: _tls_failures(node))) == 1
    assert _associations(node) == []


def test_a_client_that_does_not_trust_the_node_does_not_associate(
    start_node: Callable[..., Node], pki: Pki
) -> None:
    node = _tls_node(start_node, pki)
    context = _client_context(pki, pki.client, ca=pki.other_ca)

    assoc = _associate(node, "CAREFUL", tls=context)

    _assert_refused(assoc, context.sockets)
    assert _associations(node) == []


def test_without_require_client_cert_a_client_without_a_certificate_associates(
    start_node: Callable[..., Node], pki: Pki
) -> None:
    node = _tls_node(start_node, pki, require_client_cert=False)

    assoc = _associate(node, "ANONSCU", tls=_client_context(pki, None))
    assert assoc.is_established
    try:
        assert int(assoc.send_c_echo().Status) == 0
        assert int(assoc.send_c_store(make_ct_series(1)[0]).Status) == 0
    finally:
        assoc.release()

    [association] = wait_for(lambda: _associations(node))
    assert association.tls is True
    assert _tls_failures(node) == []


def test_without_require_client_cert_an_untrusted_certificate_is_still_refused(
    start_node: Callable[..., Node], pki: Pki
) -> None:
    """CERT_OPTIONAL verifies a certificate that is presented."""
    node = _tls_node(start_node, pki, require_client_cert=False)

    context = _client_context(pki, pki.untrusted_client)
    assoc = _associate(node, "INTRUDER", tls=context)

    _assert_refused(assoc, context.sockets)
    assert len(wait_for(lambda: _tls_failures(node))) == 1


@pytest.mark.parametrize("ending", ["release", "drop"])
def test_the_node_closes_a_connection_its_peer_reset(
    start_node: Callable[..., Node], pki: Pki, ending: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that resets the connection (DCMTK closes with SO_LINGER 0 after a release; a
    modality switched off in the middle, a firewall's idle timeout) leaves no socket open in
    the node: pynetdicom skips ``close()`` when ``shutdown()`` fails, as it does then.
    """
    accepted = _keep_accepted_sockets(monkeypatch)
    node = _tls_node(start_node, pki)
    context = _client_context(pki, pki.client)
    assoc = _associate(node, "RESETSCU", tls=context)
    assert assoc.is_established
    [connection] = wait_for(lambda: accepted)
    [sock] = context.sockets
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    if ending == "release":
        assoc.release()
    else:
        sock.close()

    wait_for(lambda: not assoc.is_alive())
    wait_for(lambda: connection.fileno() == -1)  # closed by the node
    [association] = wait_for(lambda: [a for a in _associations(node) if a.ended_at])
    expected = AssociationOutcome.RELEASED if ending == "release" else AssociationOutcome.ABORTED
    assert association.outcome == expected


def test_a_bare_connect_to_the_tls_port_is_no_security_alert(
    start_node: Callable[..., Node], pki: Pki
) -> None:
    """A port probe or load balancer health check: connect, send nothing, close."""
    node = _tls_node(start_node, pki)
    with socket.create_connection(("127.0.0.1", node.receiver.port), timeout=5):
        pass

    assoc = _associate(node, "AFTERPROBE", tls=_client_context(pki, pki.client))
    assert assoc.is_established
    assoc.release()
    wait_for(lambda: [a for a in _associations(node) if a.ended_at])
    assert _security_alerts(node) == []
    assert [a.calling_ae_title for a in _associations(node)] == ["AFTERPROBE"]


# --- DCMTK echoscu ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def echoscu_tls() -> str:
    echoscu = shutil.which("echoscu")
    if echoscu is None:
        pytest.skip("echoscu is not installed (apt-get install dcmtk)")
    usage = subprocess.run(
        [echoscu, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    if "+tls" not in usage.stdout + usage.stderr:
        pytest.skip("this DCMTK echoscu was built without TLS (no +tls option)")
    return echoscu


def _echoscu(echoscu: str, node: Node, *tls_options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            echoscu,
            "-aet",
            "DCMTKTLS",
            "-aec",
            node.settings.node.ae_title,
            "-to",
            "10",
            "-ta",
            "10",
            *tls_options,
            "127.0.0.1",
            str(node.receiver.port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.dcmtk
def test_dcmtk_echoscu_over_tls(
    start_node: Callable[..., Node], pki: Pki, echoscu_tls: str
) -> None:
    node = _tls_node(start_node, pki)

    trusted = _echoscu(
        echoscu_tls,
        node,
        "+tls",
        str(pki.client.key),
        str(pki.client.cert),
        "+cf",
        str(pki.ca),
    )
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    [association] = wait_for(lambda: _associations(node))
    assert (association.calling_ae_title, association.tls) == ("DCMTKTLS", True)

    untrusted = _echoscu(
        echoscu_tls,
        node,
        "+tls",
        str(pki.untrusted_client.key),
        str(pki.untrusted_client.cert),
        "+cf",
        str(pki.ca),
    )
    assert untrusted.returncode != 0
    plain = _echoscu(echoscu_tls, node)
    assert plain.returncode != 0
    assert len(wait_for(lambda: len(_tls_failures(node)) >= 2 and _tls_failures(node))) == 2
    assert len(_associations(node)) == 1


@pytest.mark.slow
def test_results_are_delivered_over_dicom_tls_with_a_client_certificate(
    start_node: Callable[..., Node], pki: Pki, tmp_path: Path
) -> None:
    """A node sends its SR to another node that only takes TLS with a trusted client cert."""
    from pacsai.db import Delivery, DeliveryStatus
    from pacsai.phantom import write_phantom
    from pacsai.scu import Target, push
    from tests.support import REPO

    receiver = _tls_node(start_node, pki)
    sender_dir = tmp_path / "sender"
    sender_dir.mkdir()
    sender = start_node(
        f"sqlite:///{sender_dir / 'pacsai.db'}",
        storage={"spool_dir": str(sender_dir / "spool"), "results_dir": str(sender_dir / "out")},
        queue={"local_workers": 1, "poll_seconds": 0.2},
        inference={"models_dir": str(REPO / "models"), "device": "cpu"},
        destinations={
            "secure": {
                "ae_title": "PACSAI",
                "host": "127.0.0.1",
                "port": receiver.receiver.port,
                "tls": {
                    "enabled": True,
                    "ca": str(pki.ca),
                    "cert": str(pki.client.cert),
                    "key": str(pki.client.key),
                },
            }
        },
    )
    study = write_phantom("cr", tmp_path / "cr", seed=31)
    assert push(study.paths, Target("PACSAI", "127.0.0.1", sender.receiver.port)).failed == 0

    def delivered() -> Delivery | None:
        with sender.database.reading() as session:
            return session.scalars(
                select(Delivery).where(Delivery.status == DeliveryStatus.SENT)
            ).first()

    wait_for(delivered, timeout=120)
    with receiver.database.reading() as session:
        stored = session.scalars(select(Instance)).all()
        associations = session.scalars(select(Association)).all()
        assert [i.sop_class_uid for i in stored] == ["1.2.840.10008.5.1.4.1.1.88.34"]
        assert all(a.tls for a in associations)
    assert _security_alerts(receiver) == []  # the sender's reachability check is no attack
