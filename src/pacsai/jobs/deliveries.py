"""Delivery workers: send due deliveries, retry transient failures with backoff, audit each try.

A delivery is sent under a lease of its worker (renewed by the worker's heartbeat). Each object
the destination accepts is recorded at once, so an attempt after a lost worker sends only what
was not acknowledged, and first asks the destination for the object that may have arrived
unacknowledged (:mod:`pacsai.jobs.presence`).

Each attempt is audited as an Export (110106) naming the destination, with the model name and
version of the result; a delivery that ends FAILED stays visible with its last error until an
admin retries it (``pacsai jobs retry``).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from pacsai.config import Settings
from pacsai.db import AuditAction, AuditEventId, AuditOutcome, Database, append_event, utcnow
from pacsai.db.deliveries import (
    DeliveryClaim,
    DeliveryContext,
    DeliveryObject,
    acknowledge_objects,
    backoff_seconds,
    claim_delivery,
    delivery_context,
    record_attempt,
    release_lost_deliveries,
)
from pacsai.db.models import DeliveryStatus
from pacsai.errors import LeaseLostError, PacsaiError
from pacsai.jobs._polling import PollingWorkers
from pacsai.jobs.heartbeat import HeldLeases
from pacsai.jobs.presence import held_by_destination
from pacsai.reporting.delivery import (
    DeliveryFailure,
    DeliveryReceipt,
    Peer,
    SentObject,
    send,
    tls_context,
)
from pacsai.storage import FileStore, SharedDirectory

__all__ = ["DeliveryWorkers"]

log = logging.getLogger(__name__)


class DeliveryWorkers(PollingWorkers):
    """Threads that send due deliveries until :meth:`stop`, under the leases of ``owner``."""

    kind = "delivery"

    def __init__(
        self,
        settings: Settings,
        database: Database,
        *,
        owner: str = "local",
        held: HeldLeases | None = None,
        count: int = 1,
        poll_seconds: float = 1.0,
    ) -> None:
        super().__init__(count=count, poll_seconds=poll_seconds)
        self.settings = settings
        self.database = database
        self.owner = owner
        self.held = held or HeldLeases()
        self.results: FileStore = SharedDirectory(settings.storage.results_dir)
        self._rng = random.Random()

    def drain(self) -> int:
        """Attempt every delivery that is due now, in this thread; the number attempted."""
        attempted = 0
        while not self.stopping:
            with self.database.transaction() as session:
                claim = claim_delivery(
                    session=session,
                    now=utcnow(),
                    lease_seconds=self.settings.queue.lease_seconds,
                    owner=self.owner,
                )
            if claim is None:
                return attempted
            self.attempt(claim)
            attempted += 1
        return attempted

    def attempt(self, claim: DeliveryClaim) -> DeliveryStatus | None:
        """Send one claimed delivery and record the outcome (``None``: the lease was lost, or
        the outcome could not be recorded; the delivery is then due again, as interrupted)."""
        recorded = False
        try:
            with self.held.delivery(claim.delivery_id):
                status = self._attempt(claim)
            recorded = True
            return status
        except LeaseLostError as exc:
            recorded = True  # not ours any more: nothing to give back
            log.warning("%s; this attempt is dropped", exc)
            return None
        finally:
            if not recorded:
                self._give_back(claim)

    def _give_back(self, claim: DeliveryClaim) -> None:
        try:
            with self.database.transaction() as session:
                release_lost_deliveries(
                    session=session, owners=[claim.owner], delivery_id=claim.delivery_id
                )
        except PacsaiError as exc:
            log.error("delivery %d: lease not given back (%s); it runs out", claim.delivery_id, exc)

    def _attempt(self, claim: DeliveryClaim) -> DeliveryStatus:
        delivery_id = claim.delivery_id
        with self.database.reading() as session:
            context = delivery_context(session=session, delivery_id=delivery_id)
        destination = self.settings.dicom_destinations.get(context.destination)
        error: str | None = None
        permanent = False
        receipt: DeliveryReceipt | None = None
        found: dict[str, Any] = {}
        pending = list(context.pending)
        start = time.perf_counter()
        if destination is None:
            error, permanent = f"destination {context.destination!r} is no longer configured", True
        else:
            peer = Peer.resolve(
                context.destination,
                destination,
                sender_ae=context.sender_ae_title,
                sender_host=context.sender_host,
            )
            try:
                if claim.interrupted and pending:
                    pending, found = self._already_there(claim, context, peer, pending)
                if pending:
                    receipt = self._send(claim, peer, pending, stow=bool(destination.stow_url))
            except DeliveryFailure as exc:
                error, permanent = str(exc), exc.permanent
        seconds = time.perf_counter() - start
        max_attempts = destination.max_attempts if destination else 1
        backoff = (
            backoff_seconds(
                context.attempts + 1,
                first=destination.backoff_seconds,
                cap=destination.max_backoff_seconds,
                rng=self._rng,
            )
            if destination
            else 0.0
        )
        with self.database.transaction() as session:
            status = record_attempt(
                session=session,
                delivery_id=delivery_id,
                now=utcnow(),
                error=error,
                permanent=permanent,
                max_attempts=max_attempts,
                backoff=backoff,
                seconds=seconds,
                seg_type=receipt.seg_type if receipt else None,
                owner=claim.owner,
            )
            self._audit(session, context, status, error, receipt, len(pending), found)
        level = logging.INFO if error is None else logging.WARNING
        log.log(
            level,
            "delivery %d to %s: %s%s",
            delivery_id,
            context.destination,
            status.value,
            f" ({error})" if error else "",
            extra={"action": "delivery", "delivery_id": delivery_id, "status": status.value},
        )
        return status

    def _already_there(
        self,
        claim: DeliveryClaim,
        context: DeliveryContext,
        peer: Peer,
        pending: list[DeliveryObject],
    ) -> tuple[list[DeliveryObject], dict[str, Any]]:
        """After a lost worker: record what the destination holds already, and what is left."""
        answer = held_by_destination(
            peer,
            pending,
            study_instance_uid=context.study_instance_uid,
            calling_ae_title=self.settings.node.ae_title,
            tls=tls_context(peer.destination.tls),
        )
        if answer is None:
            return pending, {"checked": "not possible: unacknowledged objects sent again"}
        held, method = answer
        there = [o for o in pending if o.sop_instance_uid in held]
        if there:
            with self.database.transaction() as session:
                acknowledge_objects(
                    session=session,
                    delivery_id=claim.delivery_id,
                    owner=claim.owner,
                    objects=[(o.result_object_id, o.sop_instance_uid) for o in there],
                    confirmed_by=method,
                    now=utcnow(),
                )
        log.info(
            "delivery %d was interrupted: %s found %d of %d unacknowledged objects at %s",
            claim.delivery_id,
            method,
            len(there),
            len(pending),
            context.destination,
        )
        return [o for o in pending if o.sop_instance_uid not in held], {
            "checked": method,
            "already_there": len(there),
        }

    def _send(
        self, claim: DeliveryClaim, peer: Peer, pending: list[DeliveryObject], *, stow: bool
    ) -> DeliveryReceipt:
        by_path: dict[Path, DeliveryObject] = {
            self.results.local_path(o.path.as_posix()): o for o in pending
        }

        def acknowledged(sent: SentObject) -> None:
            obj = by_path[sent.path]
            with self.database.transaction() as session:
                acknowledge_objects(
                    session=session,
                    delivery_id=claim.delivery_id,
                    owner=claim.owner,
                    objects=[(obj.result_object_id, sent.sop_instance_uid)],
                    confirmed_by="STOW-RS" if stow else "C-STORE",
                    now=utcnow(),
                )

        return send(
            peer,
            list(by_path),
            calling_ae_title=self.settings.node.ae_title,
            on_stored=acknowledged,
        )

    def _audit(
        self,
        session: Session,
        context: DeliveryContext,
        status: DeliveryStatus,
        error: str | None,
        receipt: DeliveryReceipt | None,
        sent: int,
        found: dict[str, Any],
    ) -> None:
        append_event(
            session=session,
            event_id=AuditEventId.EXPORT,
            action=AuditAction.READ,
            outcome=AuditOutcome.SUCCESS if error is None else AuditOutcome.SERIOUS_FAILURE,
            actor=self.settings.node.ae_title,
            study_instance_uid=context.study_instance_uid,
            patient_id=context.patient_id,
            model_name=context.model_name,
            model_version=context.model_version,
            detail={
                "delivery_id": context.delivery_id,
                "job_id": context.job_id,
                "destination": context.destination,
                "objects": len(context.files),
                "attempted": sent,
                "worker": self.owner,
                "status": status.value,
                "error": error,
                "seg_type": receipt.seg_type if receipt else None,
                "sop_instance_uids": [o.sop_instance_uid for o in receipt.objects]
                if receipt
                else [],
                **found,
            },
        )
