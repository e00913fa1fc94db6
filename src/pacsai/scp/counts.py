"""Open connections and associations, counted across the receiver processes of a node.

Several receiver processes share the port (SO_REUSEPORT), and the kernel spreads connections
over them by a hash of their addresses: one process may get most of a peer's connections. So
that ``node.max_connections``, ``node.max_connections_per_host`` and ``node.max_associations``
hold for the node, however its connections fall, each process counts its own in its row of an
array in shared memory, and admits a connection or an association after summing the rows.

Each process writes only its own row (under a lock of its own), and reads the others' without a
lock: no process ever waits on another, so one killed at any moment cannot stall the rest. The
price: processes admitting at the same instant may each take the last place, so a limit can be
exceeded by at most one for each other receiver process, while those connections last.

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


class NodeCounts:
    """The counts of one receiver process (`slot`) among `processes` that share them.

    Create it in the main process and pass it to each extra receiver process as an argument
    of its :class:`multiprocessing.Process` (spawned), which then calls :meth:`claim` with its
    own slot.
    """

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
        self.slot = 0
        # 8-byte integers, aligned: a read sees a whole value written by another process
        self._values: Any = (
            multiprocessing.get_context("spawn").RawArray(ctypes.c_longlong, processes * _ROW)
            if processes > 1
            else (ctypes.c_longlong * _ROW)()  # one process: nothing to share
        )
        self._lock = threading.Lock()  # this process's threads, on its own row
        self.claim(0)

    def __getstate__(self) -> dict[str, Any]:
        return {"processes": self.processes, "values": self._values}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.processes = state["processes"]
        self._values = state["values"]
        self._lock = threading.Lock()
        self.slot = 0

    def claim(self, slot: int) -> None:
        """Make `slot` this process's row (zeroed: a process starts with nothing open)."""
        with self._lock:
            self.slot = slot
            start = slot * _ROW
            for index in range(start + 1, start + _ROW):
                self._values[index] = 0
            self._values[start + _PID] = os.getpid()

    def _sum(self, column: int) -> int:
        values = self._values
        total = 0
        for slot in range(self.processes):
            start = slot * _ROW
            if slot == self.slot:
                total += values[start + column]
                continue
            pid = values[start + _PID]
            if pid and _alive(pid):
                total += values[start + column]
        return total

    def _add(self, column: int, delta: int) -> None:
        index = self.slot * _ROW + column
        self._values[index] = max(0, self._values[index] + delta)

    def admit_connection(self, host: str, decide: Callable[..., str | None]) -> str | None:
        """Count a new connection from `host` in if ``decide(host=, open_total=,
        open_from_host=)``, given the node's open connections, returns ``None``; return its
        refusal otherwise."""
        bucket = _bucket(host)
        with self._lock:
            reason = decide(
                host=host,
                open_total=self._sum(_CONNECTIONS),
                open_from_host=self._sum(bucket),
            )
            if reason is None:
                self._add(_CONNECTIONS, 1)
                self._add(bucket, 1)
            return reason

    def connection_closed(self, host: str) -> None:
        """A connection this process counted in is closed."""
        with self._lock:
            self._add(_CONNECTIONS, -1)
            self._add(_bucket(host), -1)

    def admit_association(self, decide: Callable[[int], Any]) -> Any:
        """Count an association in if ``decide(active)``, given the node's established
        associations, returns ``None``; return its verdict otherwise."""
        with self._lock:
            verdict = decide(self._sum(_ASSOCIATIONS))
            if verdict is None:
                self._add(_ASSOCIATIONS, 1)
            return verdict

    def association_ended(self) -> None:
        """An association this process counted in has ended."""
        with self._lock:
            self._add(_ASSOCIATIONS, -1)

    def open_connections(self) -> int:
        """The node's open connections (every live process's)."""
        with self._lock:
            return self._sum(_CONNECTIONS)
