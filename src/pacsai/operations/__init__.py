"""The operations the API, the operator console and the CLI share.

One function per thing people do (search studies, read a study or a job, list and retry jobs,
create, list and revoke tokens, query, verify and export the audit trail, see the node's state
and its models, retrieve studies from a PACS). Each takes the database, the :class:`Caller` it
runs for and typed arguments, returns typed results, and records its own audit event; none
formats text for a person. Errors are :class:`OperationError` subclasses, which each front end
turns into its own answer (a problem details response, a page, a message and an exit status).

Modules: :mod:`~pacsai.operations.studies`, :mod:`~pacsai.operations.jobs`,
:mod:`~pacsai.operations.tokens`, :mod:`~pacsai.operations.audit`,
:mod:`~pacsai.operations.models`, :mod:`~pacsai.operations.overview`,
:mod:`~pacsai.operations.result_objects`, :mod:`~pacsai.operations.retrievals`; shared result
types in :mod:`~pacsai.operations.results`, and when a study is priority in
:mod:`~pacsai.operations.priority`.
"""

from __future__ import annotations

from pacsai.operations.caller import Caller
from pacsai.operations.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    OperationError,
)

__all__ = ["Caller", "ConflictError", "InvalidRequestError", "NotFoundError", "OperationError"]
