"""Group commit: instances of concurrent associations recorded in one transaction, without a
savepoint each. An instance refused in the middle of a group is answered with its own error;
the others of its group are recorded all the same, each acknowledged after its file is durable
and its row committed."""

from __future__ import annotations

import threading
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import select

from pacsai.db import Database, Instance, utcnow
from pacsai.db.migrate import upgrade
from pacsai.db.repository import PendingInstance, ReceivedInstance, RecordResult, StoreOutcome
from pacsai.errors import InvalidInstanceError, PacsaiError
from pacsai.scp.committer import GroupCommitter


def _pending(study: str, series: str, sop: str | None = None) -> PendingInstance:
    sop = sop or generate_uid()
    return PendingInstance(
        item=ReceivedInstance(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid=sop,
            study_instance_uid=study,
            series_instance_uid=series,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=f"{study}/{series}/{sop}.dcm",
            size_bytes=1,
            sha256=sop[-64:].rjust(64, "0"),
            frames=0,
        ),
        association_id=None,
        calling_ae_title="GROUP",
        remote_address="127.0.0.1",
        quiet_seconds=3600.0,
        received_at=utcnow(),
    )


def test_an_instance_refused_in_the_middle_of_a_group_leaves_the_others_recorded(
    database_url: str, tmp_path: Path
) -> None:
    database = Database(database_url)
    upgrade(database)
    study, other_study, series = generate_uid(), generate_uid(), generate_uid()
    first = _pending(study, series)
    good = [_pending(study, series) for _ in range(3)]
    reused = _pending(other_study, series)  # its series is already in `study`: refused

    # The first group (one instance) is held before its commit until the others are queued,
    # so that they make the second group, the refused one in its middle.
    queued = threading.Event()
    groups: list[list[str]] = []

    def before_commit(group: list[PendingInstance]) -> None:
        groups.append([p.item.sop_instance_uid for p in group])
        if len(groups) == 1:
            assert queued.wait(10)

    committer = GroupCommitter(database, before_commit=before_commit)
    results: dict[str, RecordResult | PacsaiError] = {}

    def record(pending: PendingInstance) -> None:
        try:
            results[pending.item.sop_instance_uid] = committer.record(pending)
        except PacsaiError as exc:
            results[pending.item.sop_instance_uid] = exc

    leader = threading.Thread(target=record, args=(first,))
    leader.start()
    while not groups:
        threading.Event().wait(0.01)
    others = [threading.Thread(target=record, args=(p,)) for p in (good[0], reused, *good[1:])]
    for thread in others:
        thread.start()
    while len(committer._queue) < len(others):
        threading.Event().wait(0.01)
    queued.set()
    for thread in (leader, *others):
        thread.join(10)

    assert isinstance(results[reused.item.sop_instance_uid], InvalidInstanceError)
    for pending in (first, *good):
        result = results[pending.item.sop_instance_uid]
        assert isinstance(result, RecordResult) and result.outcome is StoreOutcome.STORED
    # the four were recorded together, the refusal rolled them back before their files were
    # made durable, and the three were recorded again: one commit for them
    assert groups[1:] == [[p.item.sop_instance_uid for p in good]]
    with database.reading() as session:
        recorded = set(session.scalars(select(Instance.sop_instance_uid)))
    assert recorded == {p.item.sop_instance_uid for p in (first, *good)}
    database.dispose()
