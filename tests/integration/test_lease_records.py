"""The lease records themselves, on SQLite and PostgreSQL: claiming, renewing, fencing, taking
back, the workers table's slots, and what a delivery knows after a lost worker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import update

from pacsai.db import (
    Database,
    DeliveryStatus,
    Job,
    JobStatus,
    ResultKind,
    ResultObject,
    upgrade,
    utcnow,
)
from pacsai.db.deliveries import (
    acknowledge_objects,
    add_objects,
    claim_delivery,
    delivery_context,
    queue_deliveries,
    record_attempt,
    release_lost_deliveries,
)
from pacsai.db.jobs import (
    JobLease,
    add_result,
    claim_job,
    finish_job,
    release_lost_jobs,
    renew_job_leases,
)
from pacsai.db.workers import register_worker
from pacsai.errors import LeaseLostError
from tests.support import db_rows, seed_study


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    made = Database(database_url)
    upgrade(made)
    yield made
    made.dispose()


def _claim(database: Database, owner: str) -> JobLease | None:
    with database.transaction() as session:
        return claim_job(session=session, now=utcnow(), owner=owner, lease_seconds=30)


def _expire(database: Database) -> None:
    with database.transaction() as session:
        session.execute(update(Job).values(lease_until=utcnow() - timedelta(seconds=1)))


def test_a_job_is_claimed_once_and_taken_back_only_when_its_lease_ran_out(
    database: Database,
) -> None:
    seed_study(database, job=JobStatus.QUEUED)
    first = _claim(database, "node-a/serve")
    assert first is not None and first.attempt == 1
    assert _claim(database, "node-b/serve") is None  # RUNNING under a live lease

    with database.transaction() as session:  # the lease is alive: nothing to take back
        assert release_lost_jobs(session=session, now=utcnow(), max_attempts=3) == []
        assert (
            renew_job_leases(
                session=session,
                owner="node-b/serve",
                job_ids=[first.job_id],
                now=utcnow(),
                lease_seconds=30,
            )
            == 0
        )  # only its owner renews it

    _expire(database)
    with database.transaction() as session:
        (lost,) = release_lost_jobs(session=session, now=utcnow(), max_attempts=3)
    assert (lost.status, lost.owner, lost.attempts) == (JobStatus.QUEUED, "node-a/serve", 1)
    second = _claim(database, "node-b/serve")
    assert second is not None and second.attempt == 2

    # The first worker comes back to record its end: refused, nothing changes.
    with pytest.raises(LeaseLostError), database.transaction() as session:
        finish_job(
            session=session,
            job_id=first.job_id,
            status=JobStatus.SUCCEEDED,
            now=utcnow(),
            lease=first,
        )
    (job,) = db_rows(database, Job)
    assert (job.status, job.lease_owner, job.attempts) == (JobStatus.RUNNING, "node-b/serve", 2)
    with database.transaction() as session:
        finish_job(
            session=session,
            job_id=second.job_id,
            status=JobStatus.SUCCEEDED,
            now=utcnow(),
            lease=second,
        )
    (job,) = db_rows(database, Job)
    assert (job.status, job.lease_owner, job.lease_until) == (JobStatus.SUCCEEDED, None, None)


def test_a_job_whose_workers_keep_dying_ends_failed_with_the_cause(database: Database) -> None:
    seed_study(database, job=JobStatus.QUEUED)
    for attempt in (1, 2):
        lease = _claim(database, "node-a/serve")
        assert lease is not None and lease.attempt == attempt
        with database.transaction() as session:  # its process was seen dying: at once
            (lost,) = release_lost_jobs(
                session=session,
                now=utcnow(),
                max_attempts=2,
                owners=["node-a/serve"],
                why="its worker process was killed by SIGKILL",
            )
    assert lost.status is JobStatus.FAILED
    (job,) = db_rows(database, Job)
    assert job.status is JobStatus.FAILED and job.finished_at is not None
    assert job.reason and "2 times" in job.reason and "SIGKILL" in job.reason
    assert _claim(database, "node-a/serve") is None  # never loops


def test_a_job_left_running_without_a_lease_runs_again(database: Database) -> None:
    """What a node of a version without leases left RUNNING when it was killed."""
    seed_study(database, job=JobStatus.RUNNING)
    with database.transaction() as session:
        (lost,) = release_lost_jobs(session=session, now=utcnow(), max_attempts=3)
    assert lost.status is JobStatus.QUEUED and lost.owner is None


def _register(
    database: Database, name: str, pid: int, alive: set[int]
) -> tuple[str, tuple[str, ...]]:
    with database.transaction() as session:
        registration = register_worker(
            session=session,
            node_id="node-a",
            name=name,
            host="host-a",
            pid=pid,
            backend="local",
            device="cpu",
            queues=["default"],
            concurrency=1,
            version="test",
            now=utcnow(),
            is_alive=lambda other: other in alive,
        )
    return registration.worker_id, registration.gone


def test_workers_of_one_node_take_free_slots_and_take_back_dead_ones(database: Database) -> None:
    assert _register(database, "serve", 100, alive=set()) == ("node-a/serve", ())
    # A second live process of the same node: the next slot, nothing taken from the first.
    assert _register(database, "serve", 200, alive={100}) == ("node-a/serve-2", ())
    # The first died: a new process takes its id back, and is told whose leases to end.
    worker_id, gone = _register(database, "serve", 300, alive={200})
    assert worker_id == "node-a/serve" and gone == ("node-a/serve",)


def test_a_delivery_knows_when_its_last_attempt_was_interrupted(database: Database) -> None:
    seeded = seed_study(
        database,
        job=JobStatus.SUCCEEDED,
        summaries=[("ct", "ct_abdomen_demo", {"labels": []})],
        delivery=DeliveryStatus.PENDING,
        received_at=utcnow() - timedelta(minutes=5),
    )
    with database.transaction() as session:
        claim = claim_delivery(session=session, now=utcnow(), lease_seconds=30, owner="a/serve")
    assert claim is not None and claim.interrupted is False
    with database.reading() as session:
        context = delivery_context(session=session, delivery_id=claim.delivery_id)
    first = context.objects[0]
    with database.transaction() as session:
        acknowledge_objects(
            session=session,
            delivery_id=claim.delivery_id,
            owner="a/serve",
            objects=[(first.result_object_id, first.sop_instance_uid)],
            confirmed_by="C-STORE",
            now=utcnow(),
        )
    # The worker died; its node takes the lease back at start-up.
    with database.transaction() as session:
        assert release_lost_deliveries(session=session, owners=["a/serve"]) == 1
        again = claim_delivery(session=session, now=utcnow(), lease_seconds=30, owner="a/serve-2")
    assert again is not None and again.interrupted is True
    with database.reading() as session:
        context = delivery_context(session=session, delivery_id=again.delivery_id)
    assert [o.sop_instance_uid for o in context.pending] == [context.objects[1].sop_instance_uid]
    # The old owner can record nothing more.
    with pytest.raises(LeaseLostError), database.transaction() as session:
        record_attempt(
            session=session,
            delivery_id=again.delivery_id,
            now=utcnow(),
            error=None,
            max_attempts=3,
            owner="a/serve",
        )
    # A second run of the job (same UIDs) queues no second delivery while this one is due.
    objects = db_rows(database, ResultObject)
    with database.transaction() as session:
        rerun = add_result(
            session=session,
            job_id=seeded.job_id,
            route_name="ct",
            series_instance_uid="1.2.3",
            kind=ResultKind.SEGMENTATION,
            model_name="ct_abdomen_demo",
            model_version="0.1.0",
            weights_sha256="0" * 64,
            output_path="x.npz",
            summary={"labels": []},
            now=utcnow(),
        )
        add_objects(
            session=session,
            result_id=rerun.id,
            objects=[
                (o.kind, o.sop_class_uid, o.sop_instance_uid, o.series_instance_uid, o.path)
                for o in objects
            ],
            now=utcnow(),
        )
        assert (
            queue_deliveries(
                session=session, result_id=rerun.id, targets=[("pacs", ["SEG", "SR"])], now=utcnow()
            )
            == []
        )
        resent = queue_deliveries(
            session=session,
            result_id=rerun.id,
            targets=[("pacs", ["SEG", "SR"])],
            now=utcnow(),
            resend=True,
        )
    assert len(resent) == 1
