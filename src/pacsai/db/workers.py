"""Repository functions for the workers table: who runs jobs and deliveries, and their heartbeats.

A worker's id is ``<node id>/<name>`` and is kept across restarts, so that a restarted worker
can take back the leases its predecessor held. Two live processes never share an id: a second
one on the same node takes the next free slot (``<name>-2``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacsai.db.models import Worker

__all__ = [
    "Registration",
    "WorkerInfo",
    "heartbeat_worker",
    "list_workers",
    "register_worker",
    "stop_worker",
]


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as it last reported itself."""

    id: str
    node_id: str
    host: str
    pid: int
    backend: str
    device: str
    queues: tuple[str, ...]
    concurrency: int
    models: dict[str, str]
    version: str
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None

    def live(self, now: datetime, stale_after: float) -> bool:
        """Running and heard from within ``stale_after`` seconds."""
        return self.stopped_at is None and now - self.heartbeat_at <= timedelta(seconds=stale_after)

    def serves(self, queue: str) -> bool:
        return "*" in self.queues or queue in self.queues

    @classmethod
    def of(cls, row: Worker) -> WorkerInfo:
        return cls(
            id=row.id,
            node_id=row.node_id,
            host=row.host,
            pid=row.pid,
            backend=row.backend,
            device=row.device,
            queues=tuple(q for q in row.queues.split(",") if q),
            concurrency=row.concurrency,
            models=json.loads(row.models or "{}"),
            version=row.version,
            started_at=row.started_at,
            heartbeat_at=row.heartbeat_at,
            stopped_at=row.stopped_at,
        )


@dataclass(frozen=True)
class Registration:
    """The id a starting worker took, and this node's workers found gone (their leases are
    free to take back)."""

    worker_id: str
    gone: tuple[str, ...]


def register_worker(
    *,
    session: Session,
    node_id: str,
    name: str,
    host: str,
    pid: int,
    backend: str,
    device: str,
    queues: Sequence[str],
    concurrency: int,
    version: str,
    now: datetime,
    is_alive: Callable[[int], bool],
) -> Registration:
    """Record a starting worker under the first free id ``<node_id>/<name>[-N]``.

    Workers of this node on this host whose process is no longer alive (``is_alive(pid)``, or
    the row says they stopped) are marked stopped and returned in ``gone``. Processes on other
    hosts are never judged from here: their leases run out instead.
    """
    gone: list[str] = []
    rows = session.scalars(
        select(Worker).where(Worker.node_id == node_id, Worker.host == host).with_for_update()
    ).all()
    taken = set()
    for row in rows:
        if row.stopped_at is None and row.pid != pid and is_alive(row.pid):
            taken.add(row.id)
            continue
        gone.append(row.id)
        if row.stopped_at is None:
            row.stopped_at = now
    others = set(
        session.scalars(select(Worker.id).where(Worker.node_id == node_id, Worker.host != host))
    )
    slot = 1
    while True:
        worker_id = f"{node_id}/{name}" + ("" if slot == 1 else f"-{slot}")
        if worker_id not in taken and worker_id not in others:
            break
        slot += 1
    values = {
        "node_id": node_id,
        "host": host,
        "pid": pid,
        "backend": backend,
        "device": device,
        "queues": ",".join(queues),
        "concurrency": concurrency,
        "models": "{}",
        "version": version,
        "started_at": now,
        "heartbeat_at": now,
        "stopped_at": None,
    }
    existing = session.get(Worker, worker_id)
    if existing is None:
        session.add(Worker(id=worker_id, **values))
    else:
        for key, value in values.items():
            setattr(existing, key, value)
    session.flush()
    return Registration(worker_id, tuple(gone))


def heartbeat_worker(
    *,
    session: Session,
    worker_id: str,
    pid: int,
    now: datetime,
    models: dict[str, str] | None = None,
) -> bool:
    """Record that the worker is alive (and its models' state); ``False`` if its row was taken
    over meanwhile (it was judged gone: it must stop)."""
    values: dict[str, object] = {"heartbeat_at": now}
    if models is not None:
        values["models"] = json.dumps(models, sort_keys=True)
    result = session.execute(
        update(Worker)
        .where(Worker.id == worker_id, Worker.pid == pid, Worker.stopped_at.is_(None))
        .values(**values)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def stop_worker(*, session: Session, worker_id: str, pid: int, now: datetime) -> None:
    """Record a clean stop."""
    session.execute(
        update(Worker)
        .where(Worker.id == worker_id, Worker.pid == pid)
        .values(stopped_at=now, heartbeat_at=now)
    )


def list_workers(*, session: Session, include_stopped: bool = False) -> list[WorkerInfo]:
    """Every worker (running ones only unless ``include_stopped``), newest heartbeat first."""
    query = select(Worker).order_by(Worker.heartbeat_at.desc())
    if not include_stopped:
        query = query.where(Worker.stopped_at.is_(None))
    return [WorkerInfo.of(row) for row in session.scalars(query)]
