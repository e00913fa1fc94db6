"""The DICOM receiver: association policy, C-ECHO/C-STORE handlers, spool, study assembly.

Nothing here imports ``pacsai.inference``: the receiver runs without the GPU stack.
"""

from __future__ import annotations

from pacsai.scp.completion import StudyCompletionMonitor
from pacsai.scp.policy import AssociationPolicy, Rejection
from pacsai.scp.retention import RetentionMonitor
from pacsai.scp.server import TRANSFER_SYNTAXES, Receiver, server_ssl_context
from pacsai.scp.spool import SpaceKeeper, Spool
from pacsai.scp.status import StoreStatus
from pacsai.scp.store import AssociationState, InstanceStore
from pacsai.scp.sweep import SpoolSweep, SweepReport
from pacsai.scp.uids import validate_uid

__all__ = [
    "TRANSFER_SYNTAXES",
    "AssociationPolicy",
    "AssociationState",
    "InstanceStore",
    "Receiver",
    "Rejection",
    "RetentionMonitor",
    "SpaceKeeper",
    "Spool",
    "SpoolSweep",
    "StoreStatus",
    "StudyCompletionMonitor",
    "SweepReport",
    "server_ssl_context",
    "validate_uid",
]
