"""Where workers find the files of a study and put the files of a result: the storage seam.

Receivers write instances into ``storage.spool_dir`` and workers write results into
``storage.results_dir``; the database records each file by its key, a path relative to one of
them. In a scale-out deployment these are directories every role mounts at the same place (an
NFS export, for instance). :class:`FileStore` is the one interface jobs and deliveries use, so
that an object store (S3, ...) can take the place of the shared directory later: its
``local_path`` would fetch into a local cache, its ``stored`` upload.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

__all__ = ["FileStore", "Removal", "SharedDirectory"]

log = logging.getLogger(__name__)


@dataclass
class Removal:
    """What :meth:`FileStore.remove` did."""

    files: int = 0  # files removed
    bytes: int = 0  # their size
    failed: list[str] = field(default_factory=list)  # keys that could not be removed


class FileStore(Protocol):
    """Files under keys (relative POSIX paths), readable and writable as local paths."""

    def local_path(self, key: str | PurePosixPath) -> Path:
        """A local path holding (or to hold) the file of ``key``."""

    def stored(self, key: str | PurePosixPath) -> None:
        """The file at :meth:`local_path` of ``key`` was written completely (fsynced)."""

    def remove(self, keys: Iterable[str | PurePosixPath]) -> Removal:
        """Delete the files of ``keys`` (no row may point at them any more); a missing one is
        not an error."""


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

    def remove(self, keys: Iterable[str | PurePosixPath]) -> Removal:
        """Delete the files of ``keys``, then their directories up to :attr:`root` as they
        become empty (a directory something was written into meanwhile stays)."""
        removal = Removal()
        directories: set[Path] = set()
        for key in keys:
            path = self.local_path(key)
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.error("cannot delete %s: %s", path, exc.strerror)
                removal.failed.append(str(key))
                continue
            removal.files += 1
            removal.bytes += size
            directories.add(path.parent)
        root = self.root.resolve()
        for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
            current = directory.resolve()
            while current != root and root in current.parents:
                try:
                    current.rmdir()
                except OSError:  # not empty, or removed already
                    break
                current = current.parent
        return removal
