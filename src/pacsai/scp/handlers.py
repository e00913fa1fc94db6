"""pynetdicom event handlers: one per event, each returns a named status and never raises.

Dependencies arrive through the handler tuple's extra arguments (the :class:`Receiver`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from pacsai._pynetdicom import dataset_sha256, refusal
from pacsai.db import AssociationOutcome
from pacsai.errors import (
    DatabaseError,
    InstanceTooLargeError,
    InvalidInstanceError,
    PacsaiError,
    StorageFullError,
    UnreadableInstanceError,
)
from pacsai.scp.status import StoreStatus

if TYPE_CHECKING:
    from pacsai.scp.server import Receiver

__all__ = ["handle_association", "handle_echo", "handle_n_create", "handle_n_set", "handle_store"]

log = logging.getLogger(__name__)


def _status_for(error: BaseException) -> StoreStatus:
    if isinstance(error, StorageFullError | InstanceTooLargeError):
        return StoreStatus.OUT_OF_RESOURCES
    if isinstance(error, InvalidInstanceError):
        return StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(error, UnreadableInstanceError):
        return StoreStatus.CANNOT_UNDERSTAND
    return StoreStatus.PROCESSING_FAILURE  # database errors, races, the unexpected


def _response(status: StoreStatus, comment: str | None = None) -> Dataset:
    response = Dataset()
    response.Status = int(status)
    if comment:
        response.ErrorComment = comment[:64]  # LO
    return response


def handle_echo(event: Any) -> int:
    """C-ECHO (Verification): always Success."""
    return int(StoreStatus.SUCCESS)


def handle_store(event: Any, receiver: Receiver) -> Dataset:
    """C-STORE: check, write bytes, record, answer; failures are answered, never raised."""
    state = receiver.state_of(event.assoc)
    request = event.request
    affected_instance = str(request.AffectedSOPInstanceUID or "")
    try:
        too_large = refusal(request)
        if too_large is not None:
            raise InstanceTooLargeError(f"{too_large} (storage.max_instance_mb)")
        receiver.instances.store(
            state,
            affected_sop_class_uid=str(request.AffectedSOPClassUID or ""),
            affected_sop_instance_uid=affected_instance,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            dataset=event.request.DataSet.getvalue(),
            sha256=dataset_sha256(request),
        )
    except Exception as exc:
        status = _status_for(exc)
        if not isinstance(exc, PacsaiError):
            log.exception("unexpected error while storing an instance", extra={"action": "store"})
        elif isinstance(exc, DatabaseError):
            log.error("database error while storing an instance: %s", exc)
        receiver.instances.audit_failure(
            state, status=status, error=exc, affected_sop_instance_uid=affected_instance
        )
        return _response(status, str(exc) if isinstance(exc, PacsaiError) else "internal error")
    return _response(StoreStatus.SUCCESS)


def handle_n_create(event: Any, receiver: Receiver) -> tuple[int, Dataset | None]:
    """N-CREATE of a Modality Performed Procedure Step (the only SOP class offered for it)."""
    try:
        status = receiver.mpps.create(
            event.request.AffectedSOPInstanceUID,
            event.attribute_list,
            actor=receiver.state_of(event.assoc).calling_ae_title,
            remote_address=str(event.assoc.requestor.address),
        )
    except Exception:
        log.exception("unexpected error in an MPPS N-CREATE", extra={"action": "mpps"})
        return 0x0110, None
    return int(status), event.attribute_list if status == 0 else None


def handle_n_set(event: Any, receiver: Receiver) -> tuple[int, Dataset | None]:
    """N-SET of a Modality Performed Procedure Step."""
    try:
        modifications = event.modification_list
        status = receiver.mpps.update(
            event.request.RequestedSOPInstanceUID,
            modifications,
            actor=receiver.state_of(event.assoc).calling_ae_title,
        )
    except Exception:
        log.exception("unexpected error in an MPPS N-SET", extra={"action": "mpps"})
        return 0x0110, None
    return int(status), modifications if status == 0 else None


_OUTCOMES = {
    evt.EVT_RELEASED: AssociationOutcome.RELEASED,
    evt.EVT_ABORTED: AssociationOutcome.ABORTED,
}


def handle_association(event: Any, receiver: Receiver) -> None:
    """EVT_ACCEPTED, EVT_RELEASED, EVT_ABORTED: record the association's life.

    An association that ends any other way (the connection dropped, a protocol violation, a
    timeout) is recorded ABORTED by :meth:`Receiver.association_ended` when its thread ends.
    """
    try:
        if event.event is evt.EVT_ACCEPTED:
            receiver.begin(event.assoc)
        else:
            receiver.end(event.assoc, _OUTCOMES[event.event])
    except PacsaiError as exc:
        log.error("could not record an association event: %s", exc)
    except Exception:
        log.exception("unexpected error while recording an association event")
