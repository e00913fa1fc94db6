"""Where workers find the files of a study and put the files of a result: the storage seam.

Receivers write instances into ``storage.spool_dir`` and workers write results into
``storage.results_dir``; the database records each file by its key, a path relative to one of
them. In a scale-out deployment these are directories every role mounts at the same place (an
NFS export, for instance). :class:`FileStore` is the one interface jobs and deliveries use, so
that an object store (S3, ...) can take the place of the shared directory later: its
``local_path`` would fetch into a local cache, its ``stored`` upload.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Protocol

__all__ = ["FileStore", "SharedDirectory"]


class FileStore(Protocol):
    """Files under keys (relative POSIX paths), readable and writable as local paths."""

    def local_path(self, key: str | PurePosixPath) -> Path:
        """A local path holding (or to hold) the file of ``key``."""

    def stored(self, key: str | PurePosixPath) -> None:
        """The file at :meth:`local_path` of ``key`` was written completely (fsynced)."""


class SharedDirectory:
    """A directory every role sees at the same path (local disk, or an NFS mount)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def local_path(self, key: str | PurePosixPath) -> Path:
        relative = PurePosixPath(key)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{key!r} is not a key under {self.root}")
        return self.root / relative

    def stored(self, key: str | PurePosixPath) -> None:
        """Nothing to do: the writer fsynced and renamed the file in place."""
