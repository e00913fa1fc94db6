"""pacsai: a DICOM node that runs AI models on the studies a PACS sends it.

The flow is ``scp -> db -> inference -> reporting``; see ``docs`` and the README.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pacsai")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
