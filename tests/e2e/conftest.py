"""Fixtures of the end-to-end tests: real Orthanc processes beside in-process nodes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pacsai.demo.orthanc import Orthanc


@pytest.fixture
def make_orthanc(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """``make_orthanc(name="pacs", **kwargs)``: an Orthanc on free ports with its storage under
    ``tmp_path``, not started yet (its ports are known, so that a node can be configured to send
    to it before Orthanc is told where the node listens); every one is stopped afterwards."""
    if not Orthanc.is_installed():
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    made: list[Orthanc] = []

    def make(name: str = "pacs", **kwargs: Any) -> Orthanc:
        orthanc = Orthanc(tmp_path / f"orthanc-{name}", **kwargs)
        made.append(orthanc)
        return orthanc

    yield make
    for orthanc in made:
        orthanc.stop()
