"""The errors of the operations layer: what the API, the console and the CLI turn into a 404,
409 or 422 problem, a page that says what to do, or a message and an exit status."""

from __future__ import annotations

from pacsai.errors import PacsaiError

__all__ = ["ConflictError", "InvalidRequestError", "NotFoundError", "OperationError"]


class OperationError(PacsaiError):
    """An operation refused what it was asked; the message says why and what to do."""


class NotFoundError(OperationError):
    """What the operation was asked about does not exist on this node."""


class ConflictError(OperationError):
    """The thing exists but is in a state where the operation cannot be done now."""


class InvalidRequestError(OperationError, ValueError):
    """A value given to the operation is malformed (a filter, a cursor, a name)."""
