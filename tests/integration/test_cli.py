"""The `pacsai` command as people use it, against real peers (DCMTK storescp, pacsai serve)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pacsai.db import Database, Instance, current_revision, head_revision
from tests.support import (
    ServeProcess,
    free_port,
    make_ct_series,
    start_storescp,
    write_datasets,
)


def pacsai(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    return subprocess.run(
        [sys.executable, "-m", "pacsai.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
        check=False,
    )


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp, a real and independent storage SCP, on a free port."""
    port = free_port()
    out = tmp_path / "storescp"
    process = start_storescp(out, port)
    yield port, out
    process.terminate()
    process.wait(timeout=10)


@pytest.mark.dcmtk
def test_echo_and_push_to_dcmtk_storescp(storescp: tuple[int, Path], tmp_path: Path) -> None:
    port, out = storescp
    echo = pacsai("echo", f"DCMTK@127.0.0.1:{port}")
    assert echo.returncode == 0, echo.stderr
    assert "Success" in echo.stdout

    folder = tmp_path / "series"
    write_datasets(make_ct_series(6), folder / "a")
    write_datasets(make_ct_series(4), folder / "b" / "nested")
    (folder / "notes.txt").write_text("not DICOM")

    result = pacsai("push", str(folder), "--to", f"DCMTK@127.0.0.1:{port}")

    assert result.returncode == 1  # the text file is reported as a failure
    assert "10 succeeded, 1 failed" in result.stdout
    assert "not a DICOM file" in result.stdout + result.stderr
    assert len(list(out.iterdir())) == 10


def test_push_reports_refusals_per_status(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    server = serve_process()
    good = write_datasets(make_ct_series(3), tmp_path / "good")
    bad = make_ct_series(1)[0]
    del bad.StudyInstanceUID
    write_datasets([bad], tmp_path / "bad")

    result = pacsai(
        "push",
        str(tmp_path / "good"),
        str(tmp_path / "bad"),
        "--to",
        f"PACSAI@127.0.0.1:{server.port}",
    )

    assert result.returncode == 1
    assert "3 succeeded, 1 failed" in result.stdout
    assert "0xA900" in result.stdout
    assert "StudyInstanceUID is missing" in result.stderr
    assert len(good) == 3


def test_echo_to_nothing_listening_says_what_to_check() -> None:
    result = pacsai("echo", f"PACSAI@127.0.0.1:{free_port()}", "--timeout", "3")
    assert result.returncode == 1
    assert "could not connect" in result.stderr


def test_bad_target_is_explained() -> None:
    result = pacsai("echo", "127.0.0.1:11112")
    assert result.returncode == 2
    assert "AET@HOST:PORT" in result.stderr


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    config = tmp_path / "pacsai.yaml"
    config.write_text(f"database:\n  url: {url}\n")

    first = pacsai("db", "upgrade", "--config", str(config))
    second = pacsai("db", "upgrade", "--config", str(config))

    assert first.returncode == 0, first.stderr
    assert "empty ->" in first.stdout
    assert "already at" in second.stdout
    database = Database(url)
    assert current_revision(database) == head_revision()
    database.dispose()


def test_serve_with_two_receiver_processes_shares_the_port(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    server = serve_process(node={"receiver_processes": 2})
    for batch in range(4):
        files = write_datasets(make_ct_series(5), tmp_path / f"s{batch}")
        result = pacsai("push", *map(str, files), "--to", f"PACSAI@127.0.0.1:{server.port}")
        assert result.returncode == 0, result.stdout + result.stderr

    assert server.terminate() == 0
    database = Database(server.settings.database.url)
    with database.reading() as session:
        assert session.execute(select(func.count()).select_from(Instance)).scalar_one() == 20
    database.dispose()


def test_retrieve_refuses_an_unknown_source_and_no_criteria(tmp_path: Path) -> None:
    config = tmp_path / "pacsai.yaml"
    config.write_text(
        f"database: {{url: 'sqlite:///{tmp_path / 'pacsai.db'}'}}\n"
        "sources: {archive: {ae_title: PACS, host: 127.0.0.1, port: 104}}\n",
        encoding="utf-8",
    )
    unknown = pacsai("retrieve", "--from", "nowhere", "--accession", "A1", "--config", str(config))
    assert unknown.returncode == 2, unknown.stderr
    assert "'nowhere' is not under sources:" in unknown.stderr and "archive" in unknown.stderr
    vague = pacsai("retrieve", "--from", "archive", "--config", str(config))
    assert vague.returncode == 2 and "say what to retrieve" in vague.stderr
