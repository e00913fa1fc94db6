"""The node's storage lifecycle, run where the spool is written: the receiving process.

It runs there because that is where free space decides whether a C-STORE is refused: before
answering Out of Resources (0xA700) for ``storage.min_free_mb``, a receive asks it to remove
the oldest finished studies (:meth:`RetentionMonitor.reclaim`, bounded in time), and every
write that finds less than ``storage.high_water_mb`` free wakes its thread
(:meth:`RetentionMonitor.low`). It also exists exactly once per node whatever the queue backend
(a node may run no worker at all). On a shared database and spool several nodes may run it:
each study is purged under a row lock that the others skip.

The thread applies the age rules of ``storage.retention`` at start-up and every
``interval_minutes``, and checks the free space every few seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pacsai.config import Settings
from pacsai.db import Database
from pacsai.errors import PacsaiError
from pacsai.operations.storage import PurgeReport, apply_retention, reclaim_space
from pacsai.scp.spool import Spool

__all__ = ["RetentionMonitor"]

log = logging.getLogger(__name__)


def _same_filesystem(one: Path, other: Path) -> bool:
    try:
        return one.stat().st_dev == other.stat().st_dev
    except OSError:
        return False


class RetentionMonitor:
    """Removes finished studies by age and for space; see the module documentation.

    Parameters
    ----------
    database, settings, spool
        The node's.
    check_seconds
        How often the thread looks at the free space (a write below the mark wakes it sooner).
    reclaim_seconds
        How long a receive waiting for space may spend removing studies before it is refused.
    idle_seconds
        After a pass that found nothing to remove while space is short, how long the mark is
        not looked at again (writes keep waking the thread while the disk stays low).
    """

    def __init__(
        self,
        database: Database,
        settings: Settings,
        spool: Spool,
        *,
        check_seconds: float = 10.0,
        reclaim_seconds: float = 10.0,
        idle_seconds: float = 5.0,
    ) -> None:
        self.database = database
        self.settings = settings
        self.spool = spool
        self.high_water = settings.storage.high_water_bytes
        self.check_seconds = check_seconds
        self.reclaim_seconds = reclaim_seconds
        self.idle_seconds = idle_seconds
        self._results_count = _same_filesystem(spool.root, Path(settings.storage.results_dir))
        self._lock = threading.Lock()  # one removal for space at a time in this process
        self._idle_until = 0.0
        self._starved = False  # "nothing to remove" was logged, and nothing removed since
        self._removals = 0  # passes for space that removed something
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what the spool calls ------------------------------------------------------------------

    def low(self) -> None:
        """Free space is below the high-water mark: wake the thread (never blocks)."""
        if self.high_water:
            self._wake.set()

    def reclaim(self, needed_bytes: int) -> bool:
        """Remove the oldest finished studies now, for at most ``reclaim_seconds``, until
        ``needed_bytes`` fit above ``storage.min_free_mb`` (aiming for the high-water mark);
        whether anything was removed, by this call or by another one it waited for. Nothing
        is removed when the mark is 0."""
        if not self.high_water:
            return False
        minimum = self.spool.min_free_bytes + needed_bytes
        removals = self._removals
        with self._lock:  # concurrent receives wait for one removal, then see its space
            if self._removals != removals:
                return True
            if self._free() >= minimum or time.monotonic() < self._idle_until:
                return False
            report = self._reclaim(max(self.high_water, minimum), self.reclaim_seconds)
        return report is not None and bool(report.removed)

    # --- the thread ----------------------------------------------------------------------------

    def start(self) -> None:
        """Apply the age rules now and then every ``interval_minutes``; watch the free space."""
        self._thread = threading.Thread(target=self._loop, name="pacsai-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread: a study being purged is finished first, the rest waits for the next
        start. Receives may still reclaim space meanwhile."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def run_once(self) -> PurgeReport | None:
        """Apply the age rules of ``storage.retention`` once (``None`` if that failed)."""
        report = self._safely(
            lambda: apply_retention(self.database, self.settings, stopping=self._stop.is_set),
            "retention",
        )
        if report is not None and report.removed:
            log.info(
                "retention removed the files of %d studies (%d MiB): %s",
                len(report.removed),
                report.bytes // 2**20,
                report.reason,
                extra={"action": "retention"},
            )
        return report

    def _loop(self) -> None:
        interval = self.settings.storage.retention.interval_minutes * 60
        next_rules = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_rules:
                self.run_once()
                next_rules = time.monotonic() + interval
            watching = self.high_water and time.monotonic() >= self._idle_until
            if watching and self._free() < self.high_water:
                with self._lock:
                    self._reclaim(self.high_water, self.reclaim_seconds, stoppable=True)
            self._wake.wait(max(0.0, min(self.check_seconds, next_rules - time.monotonic())))
            self._wake.clear()

    def _free(self) -> int:
        try:
            return self.spool.free_bytes()
        except OSError as exc:
            log.error("cannot read the free space of %s: %s", self.spool.root, exc.strerror)
            return self.high_water  # nothing to do until it can be read

    def _reclaim(
        self, target: int, seconds: float, *, stoppable: bool = False
    ) -> PurgeReport | None:
        """One removal for space (the caller holds the lock); the thread's passes end early
        when the node stops, a receive's (``stoppable`` false) only at its deadline."""
        free = self._free()

        def action() -> PurgeReport:
            return reclaim_space(
                self.database,
                self.settings,
                free_bytes=self._free,
                target_bytes=target,
                seconds=seconds,
                results_count=self._results_count,
                stopping=self._stop.is_set if stoppable else lambda: False,
            )

        report = self._safely(action, "removing studies for space")
        if report is None or not report.removed:
            self._idle_until = time.monotonic() + self.idle_seconds
            if report is not None and not self._starved:
                self._starved = True
                log.warning(
                    "%d MiB free in %s, below storage.high_water_mb (%d MiB), and no finished "
                    "study to remove",
                    free // 2**20,
                    self.spool.root,
                    self.high_water // 2**20,
                    extra={"action": "high_water"},
                )
            return report
        self._starved = False
        self._removals += 1
        log.warning(
            "%d MiB free in %s was below storage.high_water_mb (%d MiB): removed the files of "
            "the %d oldest finished studies (%d MiB); %d MiB free now",
            free // 2**20,
            self.spool.root,
            self.high_water // 2**20,
            len(report.removed),
            report.bytes // 2**20,
            self._free() // 2**20,
            extra={"action": "high_water"},
        )
        return report

    @staticmethod
    def _safely(action: Callable[[], PurgeReport], what: str) -> PurgeReport | None:
        try:
            return action()
        except PacsaiError as exc:  # the database is away, say: the next pass tries again
            log.error("%s failed, will try again: %s", what, exc)
            return None
