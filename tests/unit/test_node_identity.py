"""Node identity, the queue settings, and how a worker process's end is described."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from pacsai.config import NodeSettings, load_settings
from pacsai.errors import ConfigError
from pacsai.jobs.identity import node_id, process_alive
from pacsai.jobs.supervisor import describe_exit


def test_node_id_is_made_once_and_kept(tmp_path: Path) -> None:
    node = NodeSettings(state_dir=tmp_path / "state")
    first = node_id(node)
    assert first == node_id(node) == (tmp_path / "state" / "node-id").read_text().strip()
    assert node_id(NodeSettings(state_dir=tmp_path / "other")) != first  # another host


def test_node_id_setting_wins_and_a_damaged_file_is_named(tmp_path: Path) -> None:
    assert node_id(NodeSettings(id="gpu-host-7", state_dir=tmp_path)) == "gpu-host-7"
    (tmp_path / "node-id").write_text("not an id!\n")
    with pytest.raises(ConfigError, match="node-id"):
        node_id(NodeSettings(state_dir=tmp_path))


def test_queue_settings_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "pacsai.yaml"
    config.write_text("queue: {backend: celery}\n")
    with pytest.raises(ConfigError, match="broker_url"):
        load_settings(config)
    config.write_text("queue: {backend: celery, broker_url: redis://x}\n")
    with pytest.raises(ConfigError, match="amqp"):
        load_settings(config)
    config.write_text("routes: [{name: big, model: m, queue: 'big gpu'}]\n")
    with pytest.raises(ConfigError, match=r"routes\.0\.queue"):
        load_settings(config)
    config.write_text("queue: {lease_seconds: 1}\n")
    with pytest.raises(ConfigError, match="lease_seconds"):
        load_settings(config)


def test_a_dead_worker_process_is_described_for_an_operator() -> None:
    assert "out-of-memory" in describe_exit(-signal.SIGKILL)
    assert describe_exit(-signal.SIGSEGV) == "was killed by SIGSEGV"
    assert describe_exit(3) == "exited with status 3"
    assert process_alive(0) is False
