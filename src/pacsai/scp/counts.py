"""Open connections and associations, counted across the receiver processes of a node.

Several receiver processes share the port (SO_REUSEPORT), and the kernel spreads connections
over them by a hash of their addresses: one process may get most of a peer's connections. So
that ``node.max_connections``, ``node.max_connections_per_host`` and ``node.max_associations``
hold for the node, however its connections fall, each process counts its own in its row of an
array in shared memory, and admits a connection or an association after summing the rows,
under the array's lock.

A row starts with the PID of the process owning it; the rows of processes that are gone (killed)
are not counted. Per-host counts are kept in hashed buckets: two hosts that share a bucket are
each counted against the other's too (stricter, never looser).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import threading
import zlib
from collections.abc import Callable
from typing import Any

__all__ = ["NodeCounts"]

_BUCKETS = 251
_PID, _CONNECTIONS, _ASSOCIATIONS, _FIRST_BUCKET = 0, 1, 2, 3
_ROW = _FIRST_BUCKET + _BUCKETS


def _bucket(host: str) -> int:
    return _FIRST_BUCKET + zlib.crc32(host.encode()) % _BUCKETS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process now has the PID
        return True
    return True


class _LocalArray:
    """The part of :class:`multiprocessing.Array`'s interface used here, for one process."""

    def __init__(self, size: int) -> None:
        self._values = (ctypes.c_longlong * size)()
        self._lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self._lock

    def get_obj(self) -> Any:
        return self._values


class NodeCounts:
    """The counts of one receiver process (`slot`) among `processes` that share them.

    Create it in the main process and pass it to each extra receiver process as an argument
    of its :class:`multiprocessing.Process` (spawned), which then calls :meth:`claim` with its
    own slot.
    """

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
        self.slot = 0
        self._array: Any = (
            multiprocessing.get_context("spawn").Array("q", processes * _ROW)
            if processes > 1
            else _LocalArray(_ROW)  # one process: no shared memory, no semaphore needed
        )
        self.claim(0)

    def claim(self, slot: int) -> None:
        """Make `slot` this process's row (zeroed: a process starts with nothing open)."""
        self.slot = slot
        with self._array.get_lock():
            raw = self._array.get_obj()
            start = slot * _ROW
            for index in range(start, start + _ROW):
                raw[index] = 0
            raw[start + _PID] = os.getpid()

    def _sum(self, raw: Any, column: int) -> int:
        total = 0
        for slot in range(self.processes):
            start = slot * _ROW
            pid = raw[start + _PID]
            if slot == self.slot or (pid and _alive(pid)):
                total += raw[start + column]
        return total

    def _add(self, raw: Any, column: int, delta: int) -> None:
        index = self.slot * _ROW + column
        raw[index] = max(0, raw[index] + delta)

    def admit_connection(self, host: str, decide: Callable[..., str | None]) -> str | None:
        """Count a new connection from `host` in if ``decide(host=, open_total=,
        open_from_host=)``, given the node's open connections, returns ``None``; return its
        refusal otherwise."""
        bucket = _bucket(host)
        with self._array.get_lock():
            raw = self._array.get_obj()
            reason = decide(
                host=host,
                open_total=self._sum(raw, _CONNECTIONS),
                open_from_host=self._sum(raw, bucket),
            )
            if reason is None:
                self._add(raw, _CONNECTIONS, 1)
                self._add(raw, bucket, 1)
            return reason

    def connection_closed(self, host: str) -> None:
        """A connection this process counted in is closed."""
        with self._array.get_lock():
            raw = self._array.get_obj()
            self._add(raw, _CONNECTIONS, -1)
            self._add(raw, _bucket(host), -1)

    def admit_association(self, decide: Callable[[int], Any]) -> Any:
        """Count an association in if ``decide(active)``, given the node's established
        associations, returns ``None``; return its verdict otherwise."""
        with self._array.get_lock():
            raw = self._array.get_obj()
            verdict = decide(self._sum(raw, _ASSOCIATIONS))
            if verdict is None:
                self._add(raw, _ASSOCIATIONS, 1)
            return verdict

    def association_ended(self) -> None:
        """An association this process counted in has ended."""
        with self._array.get_lock():
            self._add(self._array.get_obj(), _ASSOCIATIONS, -1)

    def open_connections(self) -> int:
        """The node's open connections (every process's)."""
        with self._array.get_lock():
            return self._sum(self._array.get_obj(), _CONNECTIONS)
