"""Connections counted across receiver processes: each process counts its own in shared memory,
admissions sum every live process's counts."""

from __future__ import annotations

import multiprocessing
import os
import signal

from pacsai.config import Settings
from pacsai.scp.counts import NodeCounts
from pacsai.scp.policy import AssociationPolicy


def _open_connections(counts: NodeCounts, slot: int, host: str, n: int, ready: object) -> None:
    counts.claim(slot)
    policy = AssociationPolicy(Settings().node)
    for _ in range(n):
        assert counts.admit_connection(host, policy.admit_connection) is None
    ready.set()  # type: ignore[attr-defined]
    signal.pause()  # holds them until killed


def test_another_process_s_connections_count_and_stop_counting_once_it_is_gone() -> None:
    context = multiprocessing.get_context("spawn")
    counts = NodeCounts(2)
    policy = AssociationPolicy(Settings(node={"max_connections_per_host": 8}).node)
    ready = context.Event()
    child = context.Process(target=_open_connections, args=(counts, 1, "10.0.0.7", 6, ready))
    child.start()
    try:
        assert ready.wait(60)
        assert counts.admit_connection("10.0.0.7", policy.admit_connection) is None
        assert counts.admit_connection("10.0.0.7", policy.admit_connection) is None
        refused = counts.admit_connection("10.0.0.7", policy.admit_connection)
        assert refused is not None and "8 connections from 10.0.0.7" in refused
        assert counts.admit_connection("10.0.0.8", policy.admit_connection) is None
        assert counts.open_connections() == 9
    finally:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    # killed: its connections are gone with it
    assert counts.open_connections() == 3
    assert counts.admit_connection("10.0.0.7", policy.admit_connection) is None


def test_closing_counts_a_connection_out_and_associations_are_bounded() -> None:
    counts = NodeCounts(1)
    policy = AssociationPolicy(Settings(node={"max_connections_per_host": 1}).node)
    assert counts.admit_connection("h", policy.admit_connection) is None
    assert counts.admit_connection("h", policy.admit_connection) is not None
    counts.connection_closed("h")
    assert counts.admit_connection("h", policy.admit_connection) is None

    seen: list[int] = []

    def up_to_two(active: int) -> str | None:
        seen.append(active)
        return "full" if active >= 2 else None

    assert counts.admit_association(up_to_two) is None
    assert counts.admit_association(up_to_two) is None
    assert counts.admit_association(up_to_two) == "full"
    counts.association_ended()
    assert counts.admit_association(up_to_two) is None
    assert seen == [0, 1, 2, 1]
