"""Fixtures shared by the tests of the objects pacsai writes (SEG, SR, overlay): phantom studies
and demo bundles, made once per session. Tests copy what they change."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsai.inference.bundle import BundleInfo
from tests.dicom_checks import PhantomCase, demo_bundle, phantom_case


@pytest.fixture(scope="session")
def objects_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("objects")


@pytest.fixture(scope="session")
def ct(objects_dir: Path) -> PhantomCase:
    return phantom_case("ct", objects_dir / "ct", seed=3)


@pytest.fixture(scope="session")
def cr(objects_dir: Path) -> PhantomCase:
    return phantom_case("cr", objects_dir / "cr", seed=3)


@pytest.fixture(scope="session")
def ct_bundle(objects_dir: Path) -> BundleInfo:
    return demo_bundle("ct_abdomen_demo", objects_dir / "bundles")


@pytest.fixture(scope="session")
def mr_bundle(objects_dir: Path) -> BundleInfo:
    return demo_bundle("mr_brain_lesion_demo", objects_dir / "bundles")


@pytest.fixture(scope="session")
def cxr_bundle(objects_dir: Path) -> BundleInfo:
    return demo_bundle("cxr_findings_demo", objects_dir / "bundles")
