"""Shared fixtures: databases (SQLite, PostgreSQL), in-process nodes, `pacsai serve` processes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text

from pacsai.service import Node, configure_libraries
from tests.support import (
    POSTGRES_ADMIN_URL,
    ServeProcess,
    make_settings,
    postgres_reachable,
    shared_dicom_dir,
)


@pytest.fixture(scope="session")
def shared_dicom() -> Path:
    path = shared_dicom_dir()
    if path is None:
        pytest.skip(
            "real DICOM files not found: set PACSAI_TEST_DATA or put shared/dicom "
            "beside the checkout"
        )
    return path


@pytest.fixture(autouse=True, scope="session")
def _libraries() -> None:
    configure_libraries()


# --- databases ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    return postgres_reachable()


@pytest.fixture
def postgres_url(postgres_available: bool) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    if not postgres_available:
        pytest.skip(
            f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL} (set PACSAI_TEST_POSTGRES_URL)"
        )
    name = f"pacsai_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pacsai.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


# --- settings and nodes -------------------------------------------------------------------------


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start an in-process node: ``start_node(database_url=..., node={...}, storage={...})``."""
    nodes: list[Node] = []

    def start(database_url: str | None = None, **sections: Any) -> Node:
        node = Node(make_settings(tmp_path, database_url, **sections))
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """``serve_process(node={...})``: write a config file and start `pacsai serve` with it."""
    processes: list[ServeProcess] = []

    def create(database_url: str | None = None, **sections: Any) -> ServeProcess:
        settings = make_settings(tmp_path, database_url, **sections)
        config = tmp_path / "pacsai.yaml"
        config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
        process = ServeProcess(config, settings, tmp_path)
        processes.append(process)
        return process.start()

    yield create
    for process in processes:
        if process.alive():
            process.terminate()


# --- datasets -----------------------------------------------------------------------------------
