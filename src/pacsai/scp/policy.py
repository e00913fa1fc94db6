"""Association policy: who may associate with the node, and how A-ASSOCIATE-RJ is answered."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pacsai.config import NodeSettings, Peer

__all__ = ["AssociationPolicy", "Rejection"]


class Rejection(enum.Enum):
    """A-ASSOCIATE-RJ (result, source, reason/diag.) per PS3.8 9.3.4, with what to tell people."""

    CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
    CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
    LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)

    @property
    def result(self) -> int:
        return self.value[0]

    @property
    def source(self) -> int:
        return self.value[1]

    @property
    def reason(self) -> int:
        return self.value[2]


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why an association request was refused, for the A-ASSOCIATE-RJ and the audit trail."""

    rejection: Rejection
    explanation: str


class AssociationPolicy:
    """Decides on association requests from `node` settings.

    * ``allowed_peers``: when not empty, the calling AE title must be listed, and come from the
      listed host when one is given (A-ASSOCIATE-RJ reason 3, calling AE title not recognised).
    * ``require_called_ae_title``: the called AE title must be ours (reason 7).
    * ``max_associations``: more concurrent associations are refused as transient (local limit
      exceeded), so that the sender tries again later.
    * ``max_connections``, ``max_connections_per_host``: connections in any state (before their
      association is requested too) beyond these are refused as soon as they are accepted.

    The limits are the node's: the counts it is given are of every receiver process
    (:class:`pacsai.scp.counts.NodeCounts`).
    """

    def __init__(self, node: NodeSettings) -> None:
        self.ae_title = node.ae_title
        self.require_called_ae_title = node.require_called_ae_title
        self.peers: tuple[Peer, ...] = tuple(node.allowed_peers)
        self.max_associations = node.max_associations
        self.max_connections = node.max_connections
        self.max_connections_per_host = node.max_connections_per_host
        self.default_quiet_seconds = node.study_quiet_seconds

    def admit_connection(self, *, host: str, open_total: int, open_from_host: int) -> str | None:
        """Why a new connection must be refused before a byte is read, or ``None``.

        The counts are of the node's open connections, the new one excluded.
        """
        if open_total >= self.max_connections:
            return (
                f"{open_total} connections are open; node.max_connections is {self.max_connections}"
            )
        if open_from_host >= self.max_connections_per_host:
            return (
                f"{open_from_host} connections from {host} are open; "
                f"node.max_connections_per_host is {self.max_connections_per_host}"
            )
        return None

    def _peer(self, calling_ae_title: str, host: str) -> Peer | None:
        for peer in self.peers:
            if peer.ae_title == calling_ae_title and peer.host in (None, host):
                return peer
        return None

    def check(
        self, *, calling_ae_title: str, called_ae_title: str, host: str, active: int
    ) -> Verdict | None:
        """Return why the request must be refused, or ``None`` to accept it.

        `active` counts the node's established associations, this request excluded.
        """
        calling = calling_ae_title.strip()
        called = called_ae_title.strip()
        if self.peers and self._peer(calling, host) is None:
            known = any(peer.ae_title == calling for peer in self.peers)
            return Verdict(
                Rejection.CALLING_AE_NOT_RECOGNIZED,
                f"calling AE title {calling!r} is not allowed from {host}"
                if known
                else f"calling AE title {calling!r} is not in node.allowed_peers",
            )
        if self.require_called_ae_title and called != self.ae_title:
            return Verdict(
                Rejection.CALLED_AE_NOT_RECOGNIZED,
                f"called AE title {called!r} is not this node's ({self.ae_title!r})",
            )
        if active >= self.max_associations:
            return Verdict(
                Rejection.LOCAL_LIMIT_EXCEEDED,
                f"{active} associations are open; node.max_associations is {self.max_associations}",
            )
        return None

    def quiet_seconds(self, calling_ae_title: str, host: str) -> float:
        """How long a study from this peer must be quiet before it counts as complete."""
        peer = self._peer(calling_ae_title.strip(), host)
        if peer is not None and peer.study_quiet_seconds is not None:
            return peer.study_quiet_seconds
        return self.default_quiet_seconds
