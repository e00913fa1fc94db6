"""Delivery workers: send due deliveries, retry transient failures with backoff, audit each try.

Each attempt is audited as an Export (110106) naming the destination, with the model name and
version of the result; a delivery that ends FAILED stays visible with its last error until an
admin retries it (``pacsai jobs retry``).
"""

from __future__ import annotations

import logging
import random
import time

from sqlalchemy.orm import Session

from pacsai.config import Settings
from pacsai.db import AuditAction, AuditEventId, AuditOutcome, Database, append_event, utcnow
from pacsai.db.deliveries import (
    DeliveryContext,
    backoff_seconds,
    claim_delivery,
    delivery_context,
    record_attempt,
)
from pacsai.db.models import DeliveryStatus
from pacsai.jobs._polling import PollingWorkers
from pacsai.reporting.delivery import DeliveryFailure, DeliveryReceipt, Peer, send

__all__ = ["DeliveryWorkers"]

log = logging.getLogger(__name__)

LEASE_SECONDS = 600.0


class DeliveryWorkers(PollingWorkers):
    """Threads that send due deliveries until :meth:`stop`."""

    kind = "delivery"

    def __init__(
        self, settings: Settings, database: Database, *, count: int = 1, poll_seconds: float = 1.0
    ) -> None:
        super().__init__(count=count, poll_seconds=poll_seconds)
        self.settings = settings
        self.database = database
        self._rng = random.Random()

    def drain(self) -> int:
        """Attempt every delivery that is due now, in this thread; the number attempted."""
        attempted = 0
        while not self.stopping:
            with self.database.transaction() as session:
                delivery_id = claim_delivery(
                    session=session, now=utcnow(), lease_seconds=LEASE_SECONDS
                )
            if delivery_id is None:
                return attempted
            self.attempt(delivery_id)
            attempted += 1
        return attempted

    def attempt(self, delivery_id: int) -> DeliveryStatus:
        """Send one claimed delivery and record the outcome."""
        with self.database.reading() as session:
            context = delivery_context(session=session, delivery_id=delivery_id)
        destination = self.settings.dicom_destinations.get(context.destination)
        error: str | None = None
        permanent = False
        receipt: DeliveryReceipt | None = None
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
            files = [self.settings.storage.results_dir / path for path in context.files]
            try:
                receipt = send(peer, files, calling_ae_title=self.settings.node.ae_title)
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
            )
            self._audit(session, context, status, error, receipt)
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

    def _audit(
        self,
        session: Session,
        context: DeliveryContext,
        status: DeliveryStatus,
        error: str | None,
        receipt: DeliveryReceipt | None,
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
                "status": status.value,
                "error": error,
                "seg_type": receipt.seg_type if receipt else None,
                "sop_instance_uids": [o.sop_instance_uid for o in receipt.objects]
                if receipt
                else [],
            },
        )
