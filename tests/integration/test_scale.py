"""Scale-out on real PostgreSQL and RabbitMQ: receivers and `pacsai worker` processes of the celery
backend, each a real process; results go to a storage SCP process that logs every arrival.

Each test has RabbitMQ queues of its own (``queue.broker_queue_prefix``), deleted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pacsai.config import Settings
from pacsai.db import AuditEvent, Database, Delivery, DeliveryStatus, Job, JobStatus, Worker
from pacsai.phantom import write_phantom
from pacsai.scu import Target, push
from tests.peers import BrokerProxy, arrivals
from tests.support import REPO, PacsaiProcess, db_rows, free_port, make_settings, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.rabbitmq]

BROKER = os.environ.get("PACSAI_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _broker_address() -> tuple[str, int]:
    from kombu.utils.url import url_to_parts

    parts = url_to_parts(BROKER)
    return parts.hostname or "127.0.0.1", int(parts.port or 5672)


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    with socket.socket() as probe:
        probe.settimeout(2)
        if probe.connect_ex(_broker_address()) != 0:
            pytest.skip(f"RabbitMQ not reachable at {BROKER} (set PACSAI_TEST_BROKER_URL)")
    return BROKER


@pytest.fixture
def prefix(rabbitmq: str) -> Iterator[str]:
    """RabbitMQ queue names of this test alone; its queues are deleted afterwards."""
    name = f"pacsai-test-{uuid.uuid4().hex[:10]}"
    yield name
    from kombu import Connection

    with Connection(rabbitmq) as connection:
        for queue in ("default", "big-gpu"):
            channel = connection.channel()
            with contextlib.suppress(Exception):  # a queue never declared closes the channel
                channel.queue_delete(f"{name}.{queue}")
            with contextlib.suppress(Exception):
                channel.close()


@pytest.fixture
def recording_scp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    log = tmp_path / "arrivals.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.peers", "recording-scp", str(port), "--log", str(log)],
        cwd=REPO,
    )

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, timeout=30)
    yield port, log
    process.terminate()
    process.wait(timeout=10)


class Cluster:
    """Receivers and workers of one test, sharing a database, a spool and a broker."""

    def __init__(self, tmp_path: Path, database_url: str, broker: str, prefix: str) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.broker = broker
        self.prefix = prefix
        self.processes: list[PacsaiProcess] = []
        self.database = Database(database_url)

    def settings(self, **sections: Any) -> Settings:
        queue = {
            "backend": "celery",
            "broker_url": self.broker,
            "broker_queue_prefix": self.prefix,
            "poll_seconds": 0.2,
            "lease_seconds": 6,
            "reconcile_seconds": 1,
            **sections.pop("queue", {}),
        }
        return make_settings(
            self.tmp_path,
            self.database_url,
            queue=queue,
            inference={"models_dir": str(REPO / "models"), "device": "cpu"},
            **sections,
        )

    def receiver(self, name: str, **sections: Any) -> PacsaiProcess:
        settings = self.settings(**sections)
        process = PacsaiProcess(
            name, ["serve", "--role", "receiver"], settings, self.tmp_path
        ).start(lambda log: "listening as AE" in log)
        self.processes.append(process)
        return process

    def worker(self, name: str, **sections: Any) -> PacsaiProcess:
        settings = self.settings(**sections)
        process = PacsaiProcess(
            name, ["worker", "--name", name, "--queues", "default"], settings, self.tmp_path
        ).start(lambda log: " ready: celery backend" in log)
        self.processes.append(process)
        return process

    def push(self, receiver: PacsaiProcess, paths: Any) -> None:
        target = Target("PACSAI", "127.0.0.1", receiver.settings.node.port)
        summary = push(paths, target)
        assert summary.failed == 0, summary.failures

    def jobs(self) -> list[Job]:
        return db_rows(self.database, Job)

    def settled(self, count: int, timeout: float = 300) -> list[Job]:
        def done() -> list[Job] | None:
            jobs = self.jobs()
            if len(jobs) < count or any(j.status not in JobStatus.finished() for j in jobs):
                return None
            deliveries = db_rows(self.database, Delivery)
            if any(
                d.status in (DeliveryStatus.PENDING, DeliveryStatus.RETRYING) for d in deliveries
            ):
                return None
            return jobs

        jobs: list[Job] = wait_for(done, timeout=timeout, interval=0.5)
        return jobs

    def close(self) -> None:
        for process in self.processes:
            if process.alive():
                process.terminate()
        self.database.dispose()


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str, rabbitmq: str, prefix: str) -> Iterator[Cluster]:
    from pacsai.db import upgrade

    database = Database(postgres_url)
    upgrade(database)  # once, before several processes start
    database.dispose()
    made = Cluster(tmp_path, postgres_url, rabbitmq, prefix)
    yield made
    made.close()


def _destinations(port: int) -> dict[str, Any]:
    return {"pacs": {"ae_title": "RECORDER", "host": "127.0.0.1", "port": port}}


def _assert_each_result_arrived_once(cluster: Cluster, log: Path, studies: int) -> None:
    seen = arrivals(log)
    uids = [item["sop"] for item in seen]
    assert len(uids) == len(set(uids)), "a SOP Instance UID reached the destination twice"
    by_study: dict[str, list[str]] = {}
    for item in seen:
        by_study.setdefault(item["study"], []).append(item["modality"])
    assert len(by_study) == studies
    for study, modalities in by_study.items():
        assert sorted(modalities) == ["SEG", "SR"], study
    for delivery in db_rows(cluster.database, Delivery):
        assert delivery.status is DeliveryStatus.SENT, delivery.last_error


def test_two_receivers_and_two_workers_deliver_every_result_once(
    cluster: Cluster, recording_scp: tuple[int, Path], tmp_path: Path
) -> None:
    port, log = recording_scp
    receivers = [
        cluster.receiver(f"receiver{i}", destinations=_destinations(port), api={"enabled": False})
        for i in (1, 2)
    ]
    workers = [cluster.worker(f"w{i}", destinations=_destinations(port)) for i in (1, 2)]
    studies = [write_phantom("ct", tmp_path / f"ct{i}", seed=50 + i) for i in range(3)]
    senders = [
        threading.Thread(target=cluster.push, args=(receivers[i % 2], study.paths))
        for i, study in enumerate(studies)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(120)

    jobs = cluster.settled(3)
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED] * 3, [j.reason for j in jobs]
    assert [j.attempts for j in jobs] == [1, 1, 1]
    _assert_each_result_arrived_once(cluster, log, studies=3)
    owners = {
        json.loads(e.detail or "{}")["worker"]
        for e in db_rows(cluster.database, AuditEvent, AuditEvent.event_id == "110100")
        if json.loads(e.detail or "{}").get("activity") == "job attempt started"
    }
    assert owners <= {w.id for w in db_rows(cluster.database, Worker)}
    assert all(w.alive() for w in workers + receivers)


def test_kill_9_of_a_worker_mid_job_finishes_on_the_other(
    cluster: Cluster, recording_scp: tuple[int, Path], tmp_path: Path
) -> None:
    port, log = recording_scp
    receiver = cluster.receiver("receiver", destinations=_destinations(port))
    workers = {
        name: cluster.worker(name, destinations=_destinations(port)) for name in ("w1", "w2")
    }
    cluster.push(receiver, write_phantom("ct", tmp_path / "ct", seed=61).paths)

    running = wait_for(
        lambda: next((j for j in cluster.jobs() if j.status is JobStatus.RUNNING), None),
        timeout=180,
    )
    (holder,) = db_rows(cluster.database, Worker, Worker.id == running.lease_owner)
    victim = next(p for p in workers.values() if p.pid == holder.pid)
    victim.kill9()

    (job,) = cluster.settled(1)
    assert job.status is JobStatus.SUCCEEDED, job.reason
    assert job.attempts == 2
    _assert_each_result_arrived_once(cluster, log, studies=1)
    activity = [
        json.loads(e.detail or "{}")
        for e in db_rows(cluster.database, AuditEvent, AuditEvent.event_id == "110100")
        if json.loads(e.detail or "{}").get("job_id") == job.id
    ]
    started = [
        (d["attempt"], d["worker"]) for d in activity if d["activity"] == "job attempt started"
    ]
    lost = [(d["attempt"], d["worker"]) for d in activity if d["activity"] == "job attempt lost"]
    assert [attempt for attempt, _ in started] == [1, 2]
    assert started[0][1] == holder.id and started[1][1] != holder.id
    assert lost == [(1, holder.id)]


def test_broker_connection_cut_while_studies_arrive_loses_nothing(
    cluster: Cluster, recording_scp: tuple[int, Path], tmp_path: Path
) -> None:
    """Receivers and the worker reach RabbitMQ through a relay that the test cuts: studies
    keep being received and completed (their jobs stay QUEUED in the database), and once the
    broker is reachable again the reconciler publishes them and the worker runs them."""
    port, log = recording_scp
    proxy = BrokerProxy(_broker_address())
    try:
        relayed = cluster.broker.replace(
            f"{_broker_address()[0]}:{_broker_address()[1]}", f"127.0.0.1:{proxy.port}"
        )
        cluster.broker = relayed
        receiver = cluster.receiver("receiver", destinations=_destinations(port))
        cluster.worker("w1", destinations=_destinations(port))
        proxy.cut()
        for index in range(2):
            cluster.push(
                receiver, write_phantom("ct", tmp_path / f"ct{index}", seed=70 + index).paths
            )

        def queued() -> list[Job] | None:
            jobs = cluster.jobs()
            return jobs if len(jobs) == 2 else None

        waiting = wait_for(queued, timeout=60)
        assert all(j.status is JobStatus.QUEUED and j.published_at is None for j in waiting)
        proxy.restore()
        jobs = cluster.settled(2)
        assert [j.status for j in jobs] == [JobStatus.SUCCEEDED] * 2, [j.reason for j in jobs]
        _assert_each_result_arrived_once(cluster, log, studies=2)
    finally:
        proxy.close()


def test_celery_readiness_fails_without_a_broker_or_a_worker(
    cluster: Cluster, tmp_path: Path
) -> None:
    closed = free_port()
    down = cluster.settings(
        queue={"broker_url": f"amqp://guest:guest@127.0.0.1:{closed}//"},
        api={"enabled": True, "port": free_port()},
    )
    node = PacsaiProcess("no-broker", ["serve"], down, tmp_path).start(
        lambda log: "API listening" in log or "listening as AE" in log
    )
    cluster.processes.append(node)
    url = f"http://127.0.0.1:{down.api.port}/api/v1/readyz"
    answer = wait_for(lambda: _get(url), timeout=30)
    assert answer.status_code == 503
    queue = answer.json()["checks"]["queue"]
    assert (
        queue["ok"] is False and "unreachable" in queue["detail"] and str(closed) in queue["detail"]
    )
    node.terminate()

    # The broker answers, but no worker consumes: that is said, and it is not ready either.
    up = cluster.settings(api={"enabled": True, "port": free_port()})
    node = PacsaiProcess("no-worker", ["serve"], up, tmp_path).start(
        lambda log: "listening as AE" in log
    )
    cluster.processes.append(node)
    answer = wait_for(lambda: _get(f"http://127.0.0.1:{up.api.port}/api/v1/readyz"), timeout=30)
    assert answer.status_code == 503
    assert "no live worker" in answer.json()["checks"]["queue"]["detail"]

    worker = cluster.worker("w1")

    def ready() -> httpx.Response | None:
        answer = _get(f"http://127.0.0.1:{up.api.port}/api/v1/readyz")
        return answer if answer is not None and answer.status_code == 200 else None

    answer = wait_for(ready, timeout=60)
    (listed,) = answer.json()["workers"]
    assert listed["pid"] == worker.pid and listed["backend"] == "celery"
    assert set(listed["models"].values()) == {"warm"}


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return None
