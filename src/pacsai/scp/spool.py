"""The spool: where received instances are written durably, as they arrived.

A file is written whole to a temporary name in the spool's own filesystem, renamed into place,
fsynced, and its directory fsynced. The receiver defers the fsyncs (:meth:`Spool.make_durable`,
once per group commit, one directory fsync for many files): the file's writeback is started at
once and proceeds while its row is being recorded, and the row is committed only after the
fsyncs. A file whose instance was acknowledged survives ``kill -9`` and power loss. A crash
before the fsync can leave an incomplete file under its final name, but no row ever points at
one (rows are committed after the fsync, and only rows lead readers to files); the spool sweep
moves it aside.

Temporary files are named after the node writing them (``.incoming/<node id>+<random>.part``;
a node id never holds a ``+``), so that a node starting on a spool other nodes share removes
only its own leftovers. When free space runs short, a :class:`SpaceKeeper` (the node's
retention) is asked to remove finished studies before a write is refused.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import uuid
from pathlib import Path
from typing import Any, Protocol

from pacsai.errors import ReceiveError, StorageFullError

__all__ = ["SpaceKeeper", "Spool"]

log = logging.getLogger(__name__)

_INCOMING = ".incoming"
_RENAME_TRIES = 3  # a purge may remove an empty series directory between mkdir and rename


class SpaceKeeper(Protocol):
    """What frees space in the spool's filesystem (the node's retention)."""

    def low(self) -> None:
        """Free space is below the high-water mark: clean up in the background (never blocks)."""

    def reclaim(self, needed_bytes: int) -> bool:
        """Remove finished studies now, within a bounded time, until ``needed_bytes`` fit above
        the minimum; whether anything was removed (by this call, or by one it waited for)."""


def _sync_file_range() -> Any:
    """Linux's sync_file_range(2), which the os module lacks; ``None`` elsewhere."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the dirty pages; do not wait


def _start_writeback(fd: int) -> None:
    """Start writing a file's data to the disk without waiting: a later fsync then waits for
    what is left (the device's flush), not for the whole transfer. Best effort."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A directory tree ``<study>/<series>/<sop>.<version>.dcm`` below `root`.

    Every version of an instance written gets its own file name (``<version>`` is 16 random
    hex digits), so that two associations writing the same SOP Instance UID never write, or
    remove, each other's file.

    Parameters
    ----------
    root
        The spool directory (``storage.spool_dir``); created if missing.
    min_free_bytes
        Refuse a write that would leave less than this much free space.
    node_id
        The writing node (``node.id``): its temporary files carry it.
    high_water_bytes
        Below this much free space, :attr:`space_keeper` is told (0: never).

    Attributes
    ----------
    space_keeper
        Asked to free space before a write is refused, and told when free space is below
        `high_water_bytes`; ``None``: nothing is removed for space.
    """

    def __init__(
        self,
        root: Path,
        *,
        min_free_bytes: int,
        node_id: str = "local",
        high_water_bytes: int = 0,
    ) -> None:
        self.root = Path(root).resolve()
        self.min_free_bytes = min_free_bytes
        self.high_water_bytes = high_water_bytes
        self.node_id = node_id
        self.space_keeper: SpaceKeeper | None = None
        self._incoming = self.root / _INCOMING
        try:
            self._incoming.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReceiveError(
                f"cannot create the spool directory {self.root}: {exc.strerror}; "
                "check storage.spool_dir and its permissions"
            ) from exc

    def new_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """A new file name for one version of an instance, relative to the spool root; no other
        write ever gets the same one. The UIDs must be validated."""
        return f"{study_uid}/{series_uid}/{sop_uid}.{secrets.token_hex(8)}.dcm"

    def absolute(self, relative: str) -> Path:
        """The absolute path of a spool-relative path."""
        return self.root / relative

    def free_bytes(self) -> int:
        """Bytes available to this process in the spool's filesystem."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def check_space(self, incoming_bytes: int) -> None:
        """Raise StorageFullError if writing `incoming_bytes` would go below the minimum even
        after the space keeper has removed what it may."""
        free = self.free_bytes()
        keeper = self.space_keeper
        if keeper is not None and free - incoming_bytes < self.high_water_bytes:
            keeper.low()
        if free - incoming_bytes >= self.min_free_bytes:
            return
        if keeper is not None:
            keeper.reclaim(incoming_bytes)
            free = self.free_bytes()  # removed by it, or by another receive it waited for
            if free - incoming_bytes >= self.min_free_bytes:
                return
        raise StorageFullError(
            f"spool below storage.min_free_mb: {free // 2**20} MiB free in {self.root}, "
            f"{self.min_free_bytes // 2**20} MiB must remain"
        )

    def write(self, relative: str, chunks: tuple[bytes, ...], *, durable: bool = True) -> int:
        """Write `chunks` to `relative`, replacing any file there; return the size.

        With `durable` false, the file is complete on return, its writeback started; it is
        durable once :meth:`make_durable` has run for it.

        Raises
        ------
        StorageFullError
            If the spool is below its free-space minimum or the disk fills up (ENOSPC, EDQUOT);
            no partial file is left behind.
        ReceiveError
            For any other OS error; no partial file is left behind.
        """
        size = sum(len(chunk) for chunk in chunks)
        self.check_space(size)
        try:
            return self._write(relative, chunks, size, durable=durable)
        except StorageFullError:
            # the disk filled up between the check and the write (or ran out of inodes): once
            # the keeper has removed something, one more try
            keeper = self.space_keeper
            if keeper is None or not keeper.reclaim(size):
                raise
        return self._write(relative, chunks, size, durable=durable)

    def _write(self, relative: str, chunks: tuple[bytes, ...], size: int, *, durable: bool) -> int:
        final = self.root / relative
        temp = self._incoming / f"{self.node_id}+{uuid.uuid4().hex}.part"
        renamed = False
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                self._rename_into_place(temp, final)
                renamed = True
                if durable:
                    # fsync after the rename: on journalling filesystems its one journal commit
                    # carries the rename too, and the directory's fsync then costs next to nothing
                    os.fsync(fd)
                else:
                    _start_writeback(fd)
            finally:
                os.close(fd)
            if durable:
                _fsync_dir(final.parent)
        except OSError as exc:
            (final if renamed else temp).unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(f"the spool filesystem is full: {exc.strerror}") from exc
            raise ReceiveError(f"cannot write to the spool: {exc.strerror}") from exc
        return size

    def make_durable(self, relatives: list[str]) -> None:
        """Make the files at `relatives`, written with ``durable=False``, and their directory
        entries durable: each file fsynced, then each directory once however many files it got.

        Raises
        ------
        StorageFullError
            If the disk filled up while the data was written out (ENOSPC, EDQUOT).
        ReceiveError
            If a file or directory cannot be synced (its data may be lost).
        """
        paths = [self.root / relative for relative in relatives]
        for path in paths:
            try:
                _fsync_file(path)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StorageFullError(f"the spool filesystem is full: {exc.strerror}") from exc
                raise ReceiveError(f"cannot sync spool file {path}: {exc.strerror}") from exc
        for directory in sorted({path.parent for path in paths}):
            try:
                _fsync_dir(directory)
            except OSError as exc:
                raise ReceiveError(
                    f"cannot sync spool directory {directory}: {exc.strerror}"
                ) from exc

    def _rename_into_place(self, temp: Path, final: Path) -> None:
        for attempt in range(_RENAME_TRIES):
            self._make_parents(final.parent)
            try:
                temp.replace(final)
                return
            except FileNotFoundError:
                if attempt == _RENAME_TRIES - 1 or not temp.exists():
                    raise  # the temporary file itself is gone (removed by a cleaner)
                # the directory was removed as empty by a purge meanwhile: make it again

    def _make_parents(self, directory: Path) -> None:
        if directory.is_dir():
            return
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        directory.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):  # make each new directory entry durable
            _fsync_dir(created.parent)

    def remove(self, relative: str) -> None:
        """Delete a file no committed row points at; a missing file is not an error."""
        try:
            (self.root / relative).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not delete superseded spool file %s: %s", relative, exc.strerror)

    def clean_incoming(self) -> int:
        """Delete the temporary files this node left when it crashed (never acknowledged);
        return how many. Other nodes' files on a shared spool are theirs (the sweep removes
        any partial file once it is old)."""
        removed = 0
        for leftover in self._incoming.glob(f"{self.node_id}+*.part"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed
