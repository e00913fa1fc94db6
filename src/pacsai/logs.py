"""Logging set-up: one handler on the root logger, text or JSON lines.

Log records never carry patient names, IDs or birth dates: modules log UIDs, AE titles and
counts only, and pynetdicom's own identifier logging is switched off in :mod:`pacsai.service`.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from pacsai.config import LoggingSettings

__all__ = ["setup_logging"]


def setup_logging(settings: LoggingSettings) -> None:
    """Configure the root logger once, at start-up."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.level)
    # pynetdicom logs PDUs and DIMSE messages at INFO/DEBUG, identifiers included.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
