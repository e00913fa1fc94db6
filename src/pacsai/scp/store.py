"""The C-STORE path: check the instance, write its bytes, record it, and audit what happened."""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field

from pacsai.db import (
    AssociationOutcome,
    AuditAction,
    AuditEventId,
    AuditEventType,
    AuditOutcome,
    Database,
    append_event,
    utcnow,
)
from pacsai.db.repository import (
    PendingInstance,
    ReceivedInstance,
    StoreOutcome,
    close_association,
    open_association,
)
from pacsai.errors import DatabaseError, PacsaiError
from pacsai.scp._header import InstanceHeader, encode_file_meta, read_header
from pacsai.scp.committer import GroupCommitter
from pacsai.scp.spool import Spool
from pacsai.scp.uids import validate_uid

__all__ = ["AssociationState", "InstanceStore"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AssociationState:
    """What the node knows about one accepted association while it is open."""

    id: str
    calling_ae_title: str
    called_ae_title: str
    remote_host: str
    remote_port: int
    tls: bool
    quiet_seconds: float
    stored: int = 0
    failed: int = 0
    closed: bool = field(default=False)

    @property
    def remote_address(self) -> str:
        return self.remote_host


class InstanceStore:
    """Stores instances and records associations; shared by every association of a receiver.

    A file is removed only when no committed row points at it: the file a duplicate wrote (the
    row keeps pointing at the first one), the file a replacement superseded (after the commit),
    the file of an instance the database refused. After a database error whose commit may or
    may not have happened, the file stays; the spool sweep settles it.
    """

    def __init__(self, *, database: Database, spool: Spool, node_id: str | None = None) -> None:
        self.database = database
        self.spool = spool
        self.node_id = node_id  # recorded with each association (`node.id`)
        self.committer = GroupCommitter(database, before_commit=self._make_durable)
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()

    def _make_durable(self, batch: list[PendingInstance]) -> None:
        self.spool.make_durable([pending.item.path for pending in batch])

    def in_flight(self) -> frozenset[str]:
        """Spool files written but not yet committed or discarded (the sweep leaves them)."""
        with self._in_flight_lock:
            return frozenset(self._in_flight)

    def shutdown(self) -> None:
        """Commit what is queued and stop the committer."""
        self.committer.stop()

    def store(
        self,
        state: AssociationState,
        *,
        affected_sop_class_uid: str,
        affected_sop_instance_uid: str,
        transfer_syntax_uid: str,
        dataset: bytes,
        sha256: str | None = None,
    ) -> StoreOutcome:
        """Check, write durably, record; return what was done.

        `dataset` is the data set exactly as received (`sha256` its hash, if already known);
        the file gets a File Meta Information header made from the request. Nothing is
        acknowledged before both the file and its row are committed.

        Raises
        ------
        PacsaiError
            A ReceiveError subclass or DatabaseError saying why the instance was not stored.
        """
        sop_class_uid = validate_uid(affected_sop_class_uid, "Affected SOP Class UID")
        sop_instance_uid = validate_uid(affected_sop_instance_uid, "Affected SOP Instance UID")
        file_meta = encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        header = read_header(
            dataset,
            transfer_syntax_uid=transfer_syntax_uid,
            affected_sop_class_uid=sop_class_uid,
            affected_sop_instance_uid=sop_instance_uid,
        )
        sha256 = sha256 or hashlib.sha256(dataset).hexdigest()
        relative = self.spool.new_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        with self._in_flight_lock:
            self._in_flight.add(relative)
        try:
            # made durable by the committer, after the statements and before the commit
            size = self.spool.write(relative, (file_meta, dataset), durable=False)
            return self._record(state, relative, header, sha256, transfer_syntax_uid, size)
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(relative)

    def _record(
        self,
        state: AssociationState,
        relative: str,
        header: InstanceHeader,
        sha256: str,
        transfer_syntax_uid: str,
        size: int,
    ) -> StoreOutcome:
        """Record a written file; remove it if the database refuses it or supersedes it."""
        item = ReceivedInstance(
            sop_class_uid=header.sop_class_uid,
            sop_instance_uid=header.sop_instance_uid,
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            path=relative,
            size_bytes=size,
            sha256=sha256,
            modality=header.modality,
            patient_id=header.patient_id,
            patient_name=header.patient_name,
            accession_number=header.accession_number,
            study_date=header.study_date,
            study_description=header.study_description,
            series_number=header.series_number,
            series_description=header.series_description,
            body_part_examined=header.body_part_examined,
            instance_number=header.instance_number,
            frames=header.frames,
            routing_attributes=header.routing_attributes,
        )
        try:
            result = self.committer.record(
                PendingInstance(
                    item=item,
                    association_id=state.id,
                    calling_ae_title=state.calling_ae_title,
                    remote_address=state.remote_address,
                    quiet_seconds=state.quiet_seconds,
                    received_at=utcnow(),
                )
            )
        except DatabaseError:
            raise  # the commit may have happened: the file stays for the sweep to settle
        except PacsaiError:
            self.spool.remove(relative)  # refused before any commit: nobody points at it
            raise
        if result.outcome is StoreOutcome.DUPLICATE:
            self.spool.remove(relative)  # the row points at the version stored first
        elif result.old_path is not None:
            self.spool.remove(result.old_path)  # superseded: no committed row points at it
        state.stored += 1
        if result.outcome is StoreOutcome.REPLACED:
            log.warning(
                "replaced instance %s with different bytes",
                header.sop_instance_uid,
                extra={"action": "instance_replaced", "association_id": state.id},
            )
        return result.outcome

    def audit_failure(
        self,
        state: AssociationState,
        *,
        status: int,
        error: BaseException,
        affected_sop_instance_uid: str,
    ) -> None:
        """Record a refused instance in the audit trail (and the log, without patient data)."""
        state.failed += 1
        reason = str(error) if isinstance(error, PacsaiError) else type(error).__name__
        log.warning(
            "refused an instance from %s with status 0x%04X: %s",
            state.calling_ae_title,
            status,
            reason,
            extra={"action": "instance_refused", "association_id": state.id, "status": status},
        )
        try:
            with self.database.transaction() as session:
                append_event(
                    session=session,
                    event_id=AuditEventId.INSTANCES_TRANSFERRED,
                    action=AuditAction.CREATE,
                    outcome=AuditOutcome.MINOR_FAILURE,
                    actor=state.calling_ae_title,
                    remote_address=state.remote_address,
                    detail={
                        "association_id": state.id,
                        "status": f"0x{status:04X}",
                        "reason": reason[:500],
                        "affected_sop_instance_uid": str(affected_sop_instance_uid)[:64],
                    },
                )
        except PacsaiError as exc:
            log.error("could not audit a refused instance: %s", exc)

    def open(self, state: AssociationState) -> None:
        """Record an accepted association."""
        with self.database.transaction() as session:
            open_association(
                session=session,
                association_id=state.id,
                calling_ae_title=state.calling_ae_title,
                called_ae_title=state.called_ae_title,
                remote_host=state.remote_host,
                remote_port=state.remote_port,
                tls=state.tls,
                now=utcnow(),
                node_id=self.node_id,
            )

    def close(self, state: AssociationState, outcome: AssociationOutcome) -> None:
        """Record how an association ended and audit the transfers it carried."""
        if state.closed:
            return
        state.closed = True
        with self.database.transaction() as session:
            close_association(
                session=session,
                association_id=state.id,
                outcome=outcome,
                instances_stored=state.stored,
                instances_failed=state.failed,
                now=utcnow(),
            )

    def audit_rejection(
        self, *, calling_ae_title: str, called_ae_title: str, host: str, explanation: str
    ) -> None:
        """Record a refused association or TLS handshake as a Security Alert (110113)."""
        log.warning(
            "refused an association from %s at %s: %s",
            calling_ae_title or "(unknown)",
            host,
            explanation,
            extra={"action": "association_rejected"},
        )
        try:
            with self.database.transaction() as session:
                append_event(
                    session=session,
                    event_id=AuditEventId.SECURITY_ALERT,
                    event_type=AuditEventType.NODE_AUTHENTICATION,
                    action=AuditAction.EXECUTE,
                    outcome=AuditOutcome.MINOR_FAILURE,
                    actor=calling_ae_title or "(unknown)",
                    remote_address=host,
                    detail={"called_ae_title": called_ae_title, "reason": explanation},
                )
        except PacsaiError as exc:
            log.error("could not audit a refused association: %s", exc)
