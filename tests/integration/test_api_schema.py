"""Schemathesis against the API's own OpenAPI document, served over real HTTP, with an admin
token, on a populated database: no operation answers a server error, and every answer conforms
to the document (status codes, content types, bodies)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pacsai.api import ApiServer, create_app
from pacsai.config import Settings
from pacsai.db import Database, DeliveryStatus, JobStatus, TokenRole, upgrade, utcnow
from pacsai.db.tokens import create_token
from tests.support import REPO, make_settings, report_worker, seed_study

pytestmark = pytest.mark.slow

CT_SUMMARY = {"labels": [{"value": 1, "name": "liver", "voxels": 50, "volume_ml": 10.0}]}


OPTIONS = {"open_health": False, "open_metrics": False}


def _document() -> dict[str, Any]:
    """The OpenAPI document, from an application that is not serving (it reads nothing)."""
    app = create_app(Settings(api=OPTIONS), Database("sqlite://"))
    return app.openapi()


# Loaded at import: schemathesis' lazy `from_fixture` relies on a pytest internal (`_nodeid`)
# that pytest 9 no longer has. The served document is checked against this one below.
schema = schemathesis.openapi.from_dict(_document())


@dataclass
class Served:
    """The API on a free port and an admin token for it."""

    base_url: str
    token: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("schema")
    settings = make_settings(
        home,
        api={"enabled": True, "port": 0, **OPTIONS},
        inference={"models_dir": str(REPO / "models")},
        queue={"lease_seconds": 3600},  # the worker registered below stays live while fuzzed
        routes=[
            {
                "name": "ct-abdomen",
                "model": "ct_abdomen_demo",
                "priority": [{"finding": "liver", "min_volume_ml": 5}],
            }
        ],
    )
    settings.storage.spool_dir.mkdir(parents=True)
    database = Database(settings.database.url)
    upgrade(database)
    with database.transaction() as session:
        _, token = create_token(session=session, name="fuzzer", role=TokenRole.ADMIN, now=utcnow())
    # A live worker with its model warm: /readyz answers 200 (a 503 would be a server error).
    report_worker(database, {"ct_abdomen_demo": "warm"})
    for status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.QUEUED, None):
        seed_study(
            database,
            job=status,
            summaries=[("ct-abdomen", "ct_abdomen_demo", CT_SUMMARY)],
            delivery=DeliveryStatus.FAILED,
        )
    server = ApiServer(create_app(settings, database), host="127.0.0.1", port=0)
    server.start()
    served_document = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert served_document == _document()
    yield Served(f"http://127.0.0.1:{server.port}", token)
    server.stop()
    database.dispose()


@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_error_and_answers_conform(case: Any, served: Served) -> None:
    case.call_and_validate(
        base_url=served.base_url,
        headers={"Authorization": f"Bearer {served.token}"},
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
