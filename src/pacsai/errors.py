"""The one exception root of pacsai and a subclass per layer.

Third-party errors (pydicom, pynetdicom, SQLAlchemy, torch, OS) are converted to one of these at the
boundary of the layer that calls them, with ``raise ... from exc``, and a message that says what was
wrong and what to do.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "ConfigError",
    "DatabaseError",
    "DeliveryError",
    "InferenceError",
    "InstanceTooLargeError",
    "InvalidInstanceError",
    "LeaseLostError",
    "ModelError",
    "PacsaiError",
    "ReceiveError",
    "ReportError",
    "StorageFullError",
    "UnreadableInstanceError",
    "UnusableSeriesError",
]


class PacsaiError(Exception):
    """Root of every error pacsai raises on purpose."""


class ConfigError(PacsaiError):
    """The configuration file or environment holds a bad value."""


class DatabaseError(PacsaiError):
    """The database could not be reached or refused a statement."""


class ReceiveError(PacsaiError):
    """An incoming instance or association could not be accepted."""


class StorageFullError(ReceiveError):
    """The spool has less free space than ``storage.min_free_mb``, or the disk filled up."""


class InstanceTooLargeError(ReceiveError):
    """A data set larger than ``storage.max_instance_mb``: it was not kept (DIMSE status A700,
    Refused: Out of Resources)."""


class InvalidInstanceError(ReceiveError):
    """An instance lacks a required attribute, carries a malformed UID, or contradicts its
    C-STORE request (DIMSE status A900: Data Set does not match SOP Class)."""


class UnreadableInstanceError(ReceiveError):
    """An instance's bytes cannot be parsed as a DICOM data set (DIMSE status C000)."""


class InferenceError(PacsaiError):
    """A study could not be turned into model outputs."""


class ModelError(InferenceError):
    """A model bundle could not be loaded or run."""


class BundleError(ModelError):
    """A bundle directory lacks a file or key that pacsai needs; ``missing`` lists them all."""

    def __init__(self, bundle: str, missing: list[str]) -> None:
        self.bundle = bundle
        self.missing = list(missing)
        super().__init__(f"bundle {bundle!r} is missing: {'; '.join(self.missing)}")


class UnusableSeriesError(InferenceError):
    """A series cannot become a volume without guessing (missing slices, irregular spacing,
    mixed orientations, several temporal positions, gantry tilt...). The message is the reason
    stored on the job."""


class ReportError(PacsaiError):
    """A DICOM SEG or SR could not be built from a model output."""


class DeliveryError(PacsaiError):
    """A result could not be sent to a destination."""


class LeaseLostError(PacsaiError):
    """A worker no longer holds the job or delivery it works on: its lease ran out (the
    worker was taken for lost) and another attempt may have begun. The worker must stop
    without recording anything for it."""
