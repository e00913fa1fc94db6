"""The receiver's settings: connection limits, the data set limit, receiver processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pacsai.config import Settings, load_settings
from pacsai.errors import ConfigError
from pacsai.scp.policy import AssociationPolicy


def test_the_receiver_limits_have_documented_defaults() -> None:
    settings = Settings()
    assert settings.node.max_connections == 64
    assert settings.node.max_connections_per_host == 8
    assert settings.storage.max_instance_mb == 1024
    assert settings.node.receiver_processes == "auto"


def test_auto_is_one_receiver_process_on_sqlite_and_one_per_core_up_to_4_on_postgresql() -> None:
    assert Settings(database={"url": "sqlite:///x.db"}).receiver_process_count() == 1
    cores = len(os.sched_getaffinity(0))
    postgresql = Settings(database={"url": "postgresql+psycopg://u@h/db"})
    assert postgresql.receiver_process_count() == min(cores, 4)
    assert Settings(node={"receiver_processes": 3}).receiver_process_count() == 3


@pytest.mark.parametrize(
    "node",
    [
        {"receiver_processes": 0},
        {"receiver_processes": "many"},
        {"max_connections": 0},
        {"max_connections_per_host": 0},
    ],
)
def test_bad_receiver_values_are_refused_naming_the_key(
    node: dict[str, object], tmp_path: Path
) -> None:
    config = tmp_path / "pacsai.yaml"
    config.write_text(yaml.safe_dump({"node": node}))
    with pytest.raises(ConfigError, match=rf"node\.{next(iter(node))}"):
        load_settings(config)


def test_connections_are_admitted_up_to_the_total_and_per_host_limits() -> None:
    policy = AssociationPolicy(Settings(node={"max_connections": 10}).node)
    assert policy.admit_connection(host="h", open_total=0, open_from_host=7) is None
    refused = policy.admit_connection(host="h", open_total=3, open_from_host=8)
    assert refused is not None and "node.max_connections_per_host" in refused
    refused = policy.admit_connection(host="other", open_total=10, open_from_host=0)
    assert refused is not None and "node.max_connections" in refused
