"""Delivery workers: send due deliveries, retry transient failures with backoff, audit each try.

A delivery is sent under a lease of its worker (renewed by the worker's heartbeat). What is sent
depends on the delivery's kind, through one sender per kind and nothing else:

- ``dicom``: the objects of one result. Each object the destination accepts is recorded at
  once, so an attempt after a lost worker sends only what was not acknowledged, and first asks
  the destination for the object that may have arrived unacknowledged
  (:mod:`pacsai.jobs.presence`).
- ``hl7``, ``fhir``, ``webhook``, ``email``: one message about a finished job, built from the
  study result stored with the delivery and sent by the kind's channel
  (:data:`pacsai.reporting.channels.CHANNELS`) under the delivery's message key. After a lost
  worker the message goes again under the same key, byte for byte: the receiver may see it
  twice, and knows it for the same message (see :mod:`pacsai.reporting.channels`).

Each attempt is audited as an Export (110106) naming the destination and its kind, with the
model name and version of the result; a delivery that ends FAILED stays visible with its last
error until an admin retries it (``pacsai jobs retry``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from pacsai.config import Destination, ResultDestination, Settings
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
from pacsai.reporting.channels import CHANNELS
from pacsai.reporting.delivery import (
    DeliveryFailure,
    DeliveryReceipt,
    Peer,
    SentObject,
    send,
    tls_context,
)
from pacsai.reporting.study_result import StudyResult
from pacsai.storage import FileStore, SharedDirectory

__all__ = ["DeliveryWorkers"]

log = logging.getLogger(__name__)

_INTERRUPTED = (
    "the previous attempt's worker was lost while sending: the receiver may get this message "
    "a second time, under the same key"
)


@dataclass
class _Sent:
    """How one attempt went: the error (``None``: sent), whether another attempt could pass,
    and what its audit event records."""

    error: str | None = None
    permanent: bool = False
    seg_type: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


_Sender = Callable[[DeliveryClaim, DeliveryContext, ResultDestination], _Sent]


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
        # One sender per delivery kind: the objects of a result, or a message about a job.
        self._senders: dict[str, _Sender] = {
            "dicom": self._send_objects,
            **{kind: self._send_message for kind in CHANNELS},
        }

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
        destination = self.settings.destinations.get(context.destination)
        start = time.perf_counter()
        sender = self._senders.get(context.kind)
        if destination is None:
            sent = _Sent(f"destination {context.destination!r} is no longer configured", True)
        elif destination.kind != context.kind:
            sent = _Sent(
                f"destination {context.destination!r} is now of kind {destination.kind}, not "
                f"{context.kind}: this delivery cannot go to it",
                True,
            )
        elif sender is None:
            sent = _Sent(f"this version cannot send deliveries of kind {context.kind!r}", True)
        else:
            sent = sender(claim, context, destination)
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
                error=sent.error,
                permanent=sent.permanent,
                max_attempts=max_attempts,
                backoff=backoff,
                seconds=seconds,
                seg_type=sent.seg_type,
                owner=claim.owner,
            )
            self._audit(session, context, status, sent)
        level = logging.INFO if sent.error is None else logging.WARNING
        log.log(
            level,
            "delivery %d (%s) to %s: %s%s",
            delivery_id,
            context.kind,
            context.destination,
            status.value,
            f" ({sent.error})" if sent.error else "",
            extra={"action": "delivery", "delivery_id": delivery_id, "status": status.value},
        )
        return status

    def _send_objects(
        self, claim: DeliveryClaim, context: DeliveryContext, destination: ResultDestination
    ) -> _Sent:
        """A DICOM delivery: the result's objects not acknowledged yet (C-STORE or STOW-RS)."""
        if not isinstance(destination, Destination):
            return _Sent(f"destination {context.destination!r} is not a DICOM destination", True)
        pending = list(context.pending)
        found: dict[str, Any] = {}
        receipt: DeliveryReceipt | None = None
        sent = _Sent()
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
            sent = _Sent(str(exc), exc.permanent)
        sent.seg_type = receipt.seg_type if receipt else None
        sent.detail = {
            "objects": len(context.files),
            "attempted": len(pending),
            "seg_type": sent.seg_type,
            "sop_instance_uids": [o.sop_instance_uid for o in receipt.objects] if receipt else [],
            **found,
        }
        return sent

    def _send_message(
        self, claim: DeliveryClaim, context: DeliveryContext, destination: ResultDestination
    ) -> _Sent:
        """A delivery of a message about a job, through the channel of its kind."""
        detail: dict[str, Any] = {"message_key": context.message_key}
        if claim.interrupted:
            detail["interrupted"] = _INTERRUPTED
        try:
            result = StudyResult.from_json(context.payload or "", key=context.message_key or "")
        except ValueError as exc:
            return _Sent(f"the stored study result cannot be read: {exc}", True, detail=detail)
        try:
            receipt = CHANNELS[context.kind].send(
                result, destination, now=context.created_at or utcnow()
            )
        except DeliveryFailure as exc:
            return _Sent(str(exc), exc.permanent, detail=detail)
        except ValueError as exc:  # an alert of a result that is not priority
            return _Sent(f"not sent: {exc}", True, detail=detail)
        return _Sent(detail={**detail, "answer": receipt.summary, **receipt.detail})

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
        sent: _Sent,
    ) -> None:
        append_event(
            session=session,
            event_id=AuditEventId.EXPORT,
            action=AuditAction.READ,
            outcome=AuditOutcome.SUCCESS if sent.error is None else AuditOutcome.SERIOUS_FAILURE,
            actor=self.settings.node.ae_title,
            study_instance_uid=context.study_instance_uid,
            patient_id=context.patient_id,
            model_name=context.model_name or None,
            model_version=context.model_version or None,
            detail={
                "delivery_id": context.delivery_id,
                "job_id": context.job_id,
                "destination": context.destination,
                "kind": context.kind,
                "worker": self.owner,
                "status": status.value,
                "error": sent.error,
                **sent.detail,
            },
        )
