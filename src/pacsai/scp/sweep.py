"""The spool sweep: files and rows that do not agree, found at start-up and every hour.

A row and its file are written so that they always agree (the file durably first, the row
after, a superseded file removed after the commit). What a crash or a person can still leave:

* a **file without a row**: written, then the process died before its row was committed (it was
  never acknowledged), or a superseded file whose removal a crash interrupted. Once older than
  ``min_age_seconds`` (younger ones may be in flight) it is moved to ``<spool>/.orphans/`` under
  the same relative path, never deleted: after a database restored from an older backup these
  may be the only copy of instances that were acknowledged. Reported in the log and audited
  (110100 Application Activity, minor failure), with the paths.
* a **row without a file**: an acknowledged instance whose bytes are gone (deleted or damaged by
  something outside pacsai). Nothing is changed; each is reported once per process in the log
  (error) and audited as a Security Alert (110113, serious failure) with its SOP Instance UID.
* a partial file in ``<spool>/.incoming`` older than ``min_age_seconds``: never acknowledged;
  deleted.
* a file of a **purged study** written before the purge (its removal after the purge's commit
  failed, or a crash interrupted it): no row will ever point at it again; deleted, and counted
  in the log.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from pacsai._periodic import Periodic
from pacsai.db import (
    AuditAction,
    AuditEventId,
    AuditOutcome,
    Database,
    Instance,
    Study,
    append_event,
)
from pacsai.errors import PacsaiError
from pacsai.scp.spool import Spool
from pacsai.storage import SharedDirectory

__all__ = ["SpoolSweep", "SweepReport"]

log = logging.getLogger(__name__)

ORPHANS = ".orphans"
_INCOMING = ".incoming"
_LISTED = 100  # paths or UIDs named in one audit event


@dataclass(slots=True)
class SweepReport:
    """What one sweep found and did."""

    orphans_moved: list[str] = field(default_factory=list)  # spool-relative paths
    missing: list[tuple[str, str]] = field(default_factory=list)  # (SOP Instance UID, path)
    partials_removed: int = 0
    purged_removed: int = 0  # files of purged studies left behind by their purge


class SpoolSweep:
    """Compares the spool with the instance rows; see the module documentation.

    Parameters
    ----------
    database, spool
        What to compare.
    actor
        Who the audit events name (the node's AE title).
    in_flight
        Files this process has written and not yet committed (never touched).
    min_age_seconds
        Files younger than this may be in flight in another receiver process: left alone.
    interval_seconds
        How often :meth:`start`'s thread sweeps.
    """

    def __init__(
        self,
        database: Database,
        spool: Spool,
        *,
        actor: str,
        in_flight: Callable[[], frozenset[str]] = frozenset,
        min_age_seconds: float = 600.0,
        interval_seconds: float = 3600.0,
    ) -> None:
        self.database = database
        self.spool = spool
        self.actor = actor
        self.in_flight = in_flight
        self.min_age_seconds = min_age_seconds
        self.interval_seconds = interval_seconds
        self._reported_missing: set[str] = set()
        self._thread = Periodic(
            "pacsai-sweep",
            self.run_once,
            interval=interval_seconds,
            what="spool sweep",
            at_start=True,
            tolerate=(PacsaiError, OSError),
        )

    def start(self) -> None:
        """Sweep now and then every `interval_seconds`, in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (a sweep in progress stops at its next study)."""
        self._thread.stop()

    def run_once(self) -> SweepReport:
        """One sweep: move orphan files aside, report missing ones, remove old partials."""
        report = SweepReport()
        cutoff = time.time() - self.min_age_seconds
        report.partials_removed = self._remove_old_partials(cutoff)
        for study_dir in self._study_dirs():
            if self._thread.stopping:
                break
            moved, purged = self._move_orphans(study_dir, cutoff)
            report.orphans_moved += moved
            report.purged_removed += purged
        report.missing = self._missing_files()
        self._report(report)
        return report

    # --- files without a row ------------------------------------------------------------------

    def _study_dirs(self) -> Iterator[Path]:
        try:
            entries = list(os.scandir(self.spool.root))
        except OSError as exc:
            log.error("cannot list the spool %s: %s", self.spool.root, exc.strerror)
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                yield Path(entry.path)

    def _recorded_paths(self, study_uid: str) -> tuple[set[str], float | None]:
        """The paths the study's rows point at, and when it was last purged (POSIX time)."""
        with self.database.reading() as session:
            paths = set(
                session.execute(
                    select(Instance.path)
                    .join(Study, Study.id == Instance.study_id)
                    .where(Study.study_instance_uid == study_uid)
                ).scalars()
            )
            purged_at = session.scalar(
                select(Study.purged_at).where(Study.study_instance_uid == study_uid)
            )
        return paths, purged_at.timestamp() if purged_at is not None else None

    def _move_orphans(self, study_dir: Path, cutoff: float) -> tuple[list[str], int]:
        files: dict[str, float] = {}
        for path in study_dir.glob("*/*.dcm"):
            try:
                modified = path.stat().st_mtime
            except FileNotFoundError:  # removed meanwhile (a duplicate, a replacement)
                continue
            if modified < cutoff:
                files[str(path.relative_to(self.spool.root))] = modified
        if not files:
            return [], 0
        recorded, purged_at = self._recorded_paths(study_dir.name)
        candidates = set(files) - recorded - self.in_flight()
        if purged_at is not None:
            leftovers = [c for c in candidates if files[c] < purged_at]
            candidates -= set(leftovers)
            removed = SharedDirectory(self.spool.root).remove(leftovers)
        else:
            removed = None
        moved = []
        for relative in sorted(candidates):
            target = self.spool.root / ORPHANS / relative
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                (self.spool.root / relative).replace(target)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.error("cannot move orphan spool file %s aside: %s", relative, exc.strerror)
                continue
            moved.append(relative)
        return moved, removed.files if removed is not None else 0

    def _remove_old_partials(self, cutoff: float) -> int:
        removed = 0
        for partial in (self.spool.root / _INCOMING).glob("*.part"):
            try:
                if partial.stat().st_mtime < cutoff:
                    partial.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # --- rows without a file ------------------------------------------------------------------

    def _missing_files(self) -> list[tuple[str, str]]:
        suspects: list[int] = []
        with self.database.reading() as session:
            rows = session.execute(
                select(Instance.id, Instance.path).execution_options(yield_per=2000)
            )
            for number, (instance_id, path) in enumerate(rows):
                if number % 10_000 == 0 and self._thread.stopping:
                    return []
                if not (self.spool.root / path).exists():
                    suspects.append(instance_id)
        missing = []
        for start in range(0, len(suspects), 500):
            with self.database.reading() as session:
                again = session.execute(
                    select(Instance.sop_instance_uid, Instance.path).where(
                        Instance.id.in_(suspects[start : start + 500])
                    )
                ).all()
            # a replacement may have moved the row to a new file meanwhile: look again
            missing += [(uid, path) for uid, path in again if not (self.spool.root / path).exists()]
        return missing

    # --- reporting ----------------------------------------------------------------------------

    def _report(self, report: SweepReport) -> None:
        new_missing = [(uid, p) for uid, p in report.missing if p not in self._reported_missing]
        self._reported_missing.update(p for _, p in new_missing)
        if report.partials_removed:
            log.info("spool sweep: removed %d old partial files", report.partials_removed)
        if report.purged_removed:
            log.info(
                "spool sweep: removed %d files of purged studies that their purge left",
                report.purged_removed,
            )
        if not report.orphans_moved and not new_missing:
            return
        try:
            with self.database.transaction() as session:
                if report.orphans_moved:
                    append_event(
                        session=session,
                        event_id=AuditEventId.APPLICATION_ACTIVITY,
                        action=AuditAction.EXECUTE,
                        outcome=AuditOutcome.MINOR_FAILURE,
                        actor=self.actor,
                        detail={
                            "what": f"spool files no instance row points at, moved to {ORPHANS}/",
                            "count": len(report.orphans_moved),
                            "paths": report.orphans_moved[:_LISTED],
                        },
                    )
                if new_missing:
                    append_event(
                        session=session,
                        event_id=AuditEventId.SECURITY_ALERT,
                        action=AuditAction.EXECUTE,
                        outcome=AuditOutcome.SERIOUS_FAILURE,
                        actor=self.actor,
                        detail={
                            "what": "stored instances whose spool file is missing",
                            "count": len(new_missing),
                            "sop_instance_uids": [uid for uid, _ in new_missing[:_LISTED]],
                        },
                    )
        except PacsaiError as exc:
            log.error("could not audit the spool sweep: %s", exc)
        if report.orphans_moved:
            log.warning(
                "spool sweep: %d files that no instance row points at were moved to %s (first: %s)",
                len(report.orphans_moved),
                self.spool.root / ORPHANS,
                report.orphans_moved[0],
                extra={"action": "spool_orphans"},
            )
        if new_missing:
            log.error(
                "spool sweep: %d stored instances have lost their spool file (first: %s at %s)",
                len(new_missing),
                new_missing[0][0],
                new_missing[0][1],
                extra={"action": "spool_missing"},
            )
