"""Association policy over real associations: allow-list, called AE title, association limit.

Each refusal is an A-ASSOCIATE-RJ with the PS3.8 9.3.4 result, source and reason the sender can
act on, and a Security Alert (110113) in the audit trail naming the calling AE.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom.association import Association as ScuAssociation
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from pacsai._pynetdicom import AE  # pynetdicom, its response race fixed (see there)
from pacsai.db import (
    Association,
    AuditEvent,
    AuditEventId,
    AuditEventType,
    AuditOutcome,
    Instance,
    Job,
    Study,
    StudyStatus,
    verify_chain,
)
from pacsai.service import Node
from tests.support import make_ct_series, wait_for

PERMANENT, TRANSIENT = 1, 2
SERVICE_USER, PROVIDER_PRESENTATION = 1, 3
CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED, LOCAL_LIMIT_EXCEEDED = 3, 7, 2


def _associate(
    node: Node,
    calling: str,
    *,
    called: str | None = None,
    bind_address: tuple[str, int] | None = None,
) -> ScuAssociation:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 15
    ae.network_timeout = 15
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate(
        "127.0.0.1",
        node.receiver.port,
        ae_title=called or node.settings.node.ae_title,
        bind_address=bind_address,
    )


def _echo_ok(node: Node, calling: str, **kwargs: Any) -> None:
    assoc = _associate(node, calling, **kwargs)
    assert assoc.is_established, f"{calling} was not accepted"
    try:
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def _rejection(assoc: ScuAssociation) -> tuple[int, int, int]:
    """(result, source, reason) of the A-ASSOCIATE-RJ the SCU received."""
    assert assoc.is_rejected and not assoc.is_established
    primitive = assoc.acceptor.primitive
    return (int(primitive.result), int(primitive.result_source), int(primitive.diagnostic))


def _rejected(node: Node, calling: str, **kwargs: Any) -> tuple[int, int, int]:
    return _rejection(_associate(node, calling, **kwargs))


def _store(node: Node, calling: str, datasets: list[Dataset]) -> list[int]:
    assoc = _associate(node, calling)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _security_alerts(node: Node) -> list[AuditEvent]:
    with node.database.reading() as session:
        return list(
            session.execute(
                select(AuditEvent)
                .where(AuditEvent.event_id == str(AuditEventId.SECURITY_ALERT))
                .order_by(AuditEvent.id)
            ).scalars()
        )


def _associations(node: Node) -> list[Association]:
    with node.database.reading() as session:
        return list(session.execute(select(Association)).scalars())


def _assert_alert(event: AuditEvent, *, actor: str, host: str = "127.0.0.1", says: str) -> None:
    assert event.actor == actor
    assert event.remote_address == host
    assert event.event_type == str(AuditEventType.NODE_AUTHENTICATION)
    assert event.outcome == int(AuditOutcome.MINOR_FAILURE)
    detail = json.loads(event.detail or "{}")
    assert says in detail["reason"], detail


def _chain_intact(node: Node) -> bool:
    with node.database.reading() as session:
        return verify_chain(session=session).intact


# --- node.allowed_peers (SQLite and PostgreSQL) -------------------------------------------------


def test_allow_list_accepts_listed_and_rejects_unlisted_calling_ae(
    database_url: str, start_node: Callable[..., Node]
) -> None:
    node = start_node(
        database_url,
        node={
            "allowed_peers": [
                {"ae_title": "MODALITY"},
                {"ae_title": "ORTHANC", "host": "127.0.0.1"},
            ]
        },
    )

    _echo_ok(node, "MODALITY")
    _echo_ok(node, "ORTHANC")
    assert _rejected(node, "STRANGER") == (PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)
    assert _rejected(node, "modality") == (PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)

    alerts = _security_alerts(node)
    assert len(alerts) == 2
    _assert_alert(alerts[0], actor="STRANGER", says="not in node.allowed_peers")
    _assert_alert(alerts[1], actor="modality", says="not in node.allowed_peers")
    assert sorted(a.calling_ae_title for a in _associations(node)) == ["MODALITY", "ORTHANC"]
    assert _chain_intact(node)


def test_allow_list_binds_a_peer_to_its_host(
    database_url: str, start_node: Callable[..., Node]
) -> None:
    node = start_node(
        database_url, node={"allowed_peers": [{"ae_title": "BOUND", "host": "127.0.0.2"}]}
    )

    assert _rejected(node, "BOUND") == (PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)
    _echo_ok(node, "BOUND", bind_address=("127.0.0.2", 0))

    [alert] = _security_alerts(node)
    _assert_alert(alert, actor="BOUND", host="127.0.0.1", says="not allowed from 127.0.0.1")
    [accepted] = _associations(node)
    assert (accepted.calling_ae_title, accepted.remote_host) == ("BOUND", "127.0.0.2")


def test_an_empty_allow_list_accepts_any_calling_ae(start_node: Callable[..., Node]) -> None:
    node = start_node()

    for calling in ("ANYONE", "ORTHANC", "X"):
        _echo_ok(node, calling)

    assert _security_alerts(node) == []
    assert len(_associations(node)) == 3


# --- called AE title ----------------------------------------------------------------------------


def test_a_wrong_called_ae_title_is_rejected_by_default(start_node: Callable[..., Node]) -> None:
    node = start_node()
    assert node.settings.node.require_called_ae_title is True

    assert _rejected(node, "SENDER", called="NOTPACSAI") == (
        PERMANENT,
        SERVICE_USER,
        CALLED_AE_NOT_RECOGNIZED,
    )
    _echo_ok(node, "SENDER")

    [alert] = _security_alerts(node)
    _assert_alert(alert, actor="SENDER", says="'NOTPACSAI' is not this node's")
    assert json.loads(alert.detail or "{}")["called_ae_title"] == "NOTPACSAI"


def test_the_allow_list_is_checked_before_the_called_ae_title(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(node={"allowed_peers": [{"ae_title": "MODALITY"}]})

    assert _rejected(node, "STRANGER", called="WRONG")[2] == CALLING_AE_NOT_RECOGNIZED
    assert _rejected(node, "MODALITY", called="WRONG")[2] == CALLED_AE_NOT_RECOGNIZED
    assert [a.actor for a in _security_alerts(node)] == ["STRANGER", "MODALITY"]


def test_a_wrong_called_ae_title_is_accepted_when_not_required(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(node={"require_called_ae_title": False})

    _echo_ok(node, "SENDER", called="NOTPACSAI")

    assert _security_alerts(node) == []
    [accepted] = _associations(node)
    assert accepted.calling_ae_title == "SENDER"


def test_the_called_ae_title_the_peer_used_is_recorded(start_node: Callable[..., Node]) -> None:
    """associations.called_ae_title is the Called AE Title of the A-ASSOCIATE-RQ."""
    node = start_node(node={"require_called_ae_title": False})

    _echo_ok(node, "SENDER", called="NOTPACSAI")

    [accepted] = _associations(node)
    assert accepted.called_ae_title == "NOTPACSAI"


# --- node.max_associations ----------------------------------------------------------------------


def _established_on_node(node: Node) -> int:
    return sum(
        1 for a in node.receiver.ae.active_associations if a.is_acceptor and a.is_established
    )


def test_association_limit_rejects_transiently_until_one_is_released(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(node={"max_associations": 1})
    first = _associate(node, "FIRST")
    assert first.is_established
    try:
        wait_for(lambda: _established_on_node(node) == 1)

        assert _rejected(node, "SECOND") == (TRANSIENT, PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED)
        assert int(first.send_c_echo().Status) == 0  # the open one is unaffected
    finally:
        first.release()
    wait_for(lambda: _established_on_node(node) == 0)

    _echo_ok(node, "THIRD")

    [alert] = _security_alerts(node)
    _assert_alert(alert, actor="SECOND", says="node.max_associations is 1")
    assert sorted(a.calling_ae_title for a in _associations(node)) == ["FIRST", "THIRD"]


def test_every_rejection_is_a_security_alert_and_the_chain_stays_intact(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(node={"allowed_peers": [{"ae_title": "MODALITY"}], "max_associations": 1})
    held = _associate(node, "MODALITY")
    assert held.is_established
    try:
        wait_for(lambda: _established_on_node(node) == 1)
        reasons = [
            _rejected(node, "STRANGER")[2],
            _rejected(node, "MODALITY", called="WRONG")[2],
            _rejected(node, "MODALITY")[2],
        ]
    finally:
        held.release()

    assert reasons == [CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED, LOCAL_LIMIT_EXCEEDED]
    alerts = _security_alerts(node)
    assert [a.actor for a in alerts] == ["STRANGER", "MODALITY", "MODALITY"]
    assert all(a.event_id == "110113" for a in alerts)
    assert _chain_intact(node)


# --- per-peer study quiet period ----------------------------------------------------------------


def test_a_peer_quiet_period_override_applies_to_its_studies(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(
        node={
            "study_quiet_seconds": 0.5,
            "allowed_peers": [
                {"ae_title": "SLOWPACS", "study_quiet_seconds": 3600},
                {"ae_title": "FASTPACS"},
            ],
        }
    )
    slow = make_ct_series(2, seed=1)
    fast = make_ct_series(2, seed=2)

    assert _store(node, "SLOWPACS", slow) == [0, 0]
    assert _store(node, "FASTPACS", fast) == [0, 0]

    def study(uid: str) -> Study:
        with node.database.reading() as session:
            return session.execute(
                select(Study).where(Study.study_instance_uid == uid)
            ).scalar_one()

    assert study(slow[0].StudyInstanceUID).quiet_seconds == 3600
    assert study(fast[0].StudyInstanceUID).quiet_seconds == 0.5

    fast_done = wait_for(
        lambda: (
            study(fast[0].StudyInstanceUID).status is StudyStatus.COMPLETE
            and study(fast[0].StudyInstanceUID)
        )
    )
    with node.database.reading() as session:
        jobs = list(session.execute(select(Job)).scalars())
        senders = {i.calling_ae_title for i in session.execute(select(Instance)).scalars()}
    assert [job.study_id for job in jobs] == [fast_done.id]
    assert study(slow[0].StudyInstanceUID).status is StudyStatus.RECEIVING
    assert senders == {"SLOWPACS", "FASTPACS"}
