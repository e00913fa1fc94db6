"""The HTTP API over real HTTP (uvicorn on a free port), on SQLite and PostgreSQL: tokens and
roles, problem details, audit of reads, pagination under inserts, filters, jobs and retries,
worklist results with priority rules, health, readiness and metrics, the token CLI and
`pacsai api`, and a node serving the API on results of a real job."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select, text

from pacsai.api import ApiServer, create_app
from pacsai.config import Settings
from pacsai.db import (
    AuditEvent,
    Database,
    DeliveryStatus,
    JobStatus,
    TokenRole,
    upgrade,
    utcnow,
)
from pacsai.db.tokens import create_token, revoke_token
from pacsai.phantom import write_phantom
from pacsai.scu import Target, push
from pacsai.service import Node
from tests.support import (
    REPO,
    SeededStudy,
    make_settings,
    report_worker,
    seed_study,
    wait_for,
)

PROBLEM = "application/problem+json"
CT_SUMMARY = {
    "labels": [
        {"value": 1, "name": "liver", "voxels": 5000, "volume_ml": 1500.0},
        {"value": 2, "name": "spleen", "voxels": 0, "volume_ml": 0.0},
        {"value": 3, "name": "lesion", "voxels": 40, "volume_ml": 12.5},
    ]
}
CR_SUMMARY = {"probabilities": {"nodule": 0.82, "effusion": 0.10}}
ROUTES = [
    {
        "name": "ct-abdomen",
        "when": {"Modality": "CT"},
        "model": "ct_abdomen_demo",
        "priority": [{"finding": "lesion", "min_volume_ml": 10.0}],
    },
    {
        "name": "cxr",
        "when": {"Modality": "CR"},
        "model": "cxr_findings_demo",
        "priority": [{"finding": "nodule", "min_probability": 0.9}],
    },
]


@dataclass
class Api:
    """A database, an API server on a free port, and a token per role."""

    settings: Settings
    database: Database
    server: ApiServer
    tokens: dict[str, str] = field(default_factory=dict)
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, token: str | None = None) -> httpx.Client:
        """A client authenticated as the token called ``token`` (or as nobody)."""
        headers = {} if token is None else {"Authorization": f"Bearer {self.tokens[token]}"}
        client = httpx.Client(base_url=self.server.url + "/", headers=headers, timeout=30)
        self.clients.append(client)
        return client

    def events(self, **where: Any) -> list[AuditEvent]:
        """Audit events with the given column values, in chain order."""
        with self.database.reading() as session:
            query = select(AuditEvent).order_by(AuditEvent.id)
            for name, value in where.items():
                query = query.where(getattr(AuditEvent, name) == value)
            rows = list(session.scalars(query))
            for row in rows:
                session.expunge(row)
        return rows


@pytest.fixture
def make_api(tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """``make_api(database_url, api={...}, routes=[...])``: a migrated database, tokens
    ``ris`` (viewer), ``audit-office`` (auditor), ``it-admin`` (admin) and ``old-ris``
    (viewer, revoked), and the API serving it on a free port."""
    made: list[Api] = []

    def make(database_url: str | None = None, **sections: Any) -> Api:
        api_section = {"enabled": True, "port": 0, **sections.pop("api", {})}
        home = tmp_path / f"api{len(made)}"
        settings = make_settings(home, database_url, api=api_section, **sections)
        settings.storage.spool_dir.mkdir(parents=True, exist_ok=True)
        database = Database(settings.database.url)
        upgrade(database)
        tokens = {}
        with database.transaction() as session:
            for name, role in [
                ("ris", TokenRole.VIEWER),
                ("audit-office", TokenRole.AUDITOR),
                ("it-admin", TokenRole.ADMIN),
                ("old-ris", TokenRole.VIEWER),
            ]:
                _, tokens[name] = create_token(session=session, name=name, role=role, now=utcnow())
            revoke_token(session=session, name_or_id="old-ris", now=utcnow())
        server = ApiServer(create_app(settings, database), host="127.0.0.1", port=0)
        server.start()
        api = Api(settings, database, server, tokens)
        made.append(api)
        return api

    yield make
    for api in made:
        for client in api.clients:
            client.close()
        api.server.stop()
        api.database.dispose()


def server_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the node logged (the test's own HTTP client logs its URLs, query strings too)."""
    return "\n".join(
        caplog.handler.format(record)
        for record in caplog.records
        if not record.name.startswith(("httpx", "httpcore"))
    )


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    assert body["instance"] == response.request.url.path
    return body


# --- tokens, roles and problem details ----------------------------------------------------------

# The least role of each operation with health and metrics protected; the audit trail's routes
# are checked when that module is there.
LEAST_ROLE = {
    ("GET", "/studies"): "viewer",
    ("GET", "/studies/{study_uid}"): "viewer",
    ("GET", "/jobs"): "viewer",
    ("GET", "/jobs/{job_id}"): "viewer",
    ("POST", "/jobs/{job_id}/retry"): "admin",
    ("GET", "/worklist-results"): "viewer",
    ("GET", "/tokens"): "admin",
    ("GET", "/healthz"): "viewer",
    ("GET", "/readyz"): "viewer",
    ("GET", "/metrics"): "admin",
    ("GET", "/audit"): "auditor",
    ("GET", "/audit/verify"): "auditor",
    ("POST", "/retrieve"): "admin",
    ("GET", "/retrieve"): "admin",
    ("GET", "/retrieve/{retrieval_id}"): "admin",
}
TOKEN_OF_ROLE = {"viewer": "ris", "auditor": "audit-office", "admin": "it-admin"}
ROLE_ORDER = ["viewer", "auditor", "admin"]


def test_every_route_refuses_missing_unknown_revoked_and_too_low_tokens(
    make_api: Callable[..., Api],
) -> None:
    api = make_api(api={"open_health": False, "open_metrics": False})
    anonymous = api.client()
    operations = [
        (method.upper(), path.removeprefix("/api/v1"))
        for path, item in anonymous.get("openapi.json").json()["paths"].items()
        for method in item
    ]
    assert {op for op in LEAST_ROLE if not op[1].startswith("/audit")} <= set(operations)
    unknown = httpx.Client(
        base_url=api.server.url + "/", headers={"Authorization": "Bearer pacsai_" + "A" * 43}
    )
    basic = httpx.Client(base_url=api.server.url + "/", headers={"Authorization": "Basic eDp5"})
    api.clients += [unknown, basic]

    for method, path in operations:
        assert (method, path) in LEAST_ROLE, f"{method} {path}: no role declared in this test"
        url = path.replace("{study_uid}", "1.2.3").replace("{job_id}", "1")
        url = url.replace("{retrieval_id}", "1").lstrip("/")
        least = LEAST_ROLE[(method, path)]
        for client in (anonymous, unknown, basic, api.client("old-ris")):
            response = client.request(method, url)
            assert_problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer")
        for role in ROLE_ORDER[: ROLE_ORDER.index(least)]:
            assert_problem(api.client(TOKEN_OF_ROLE[role]).request(method, url), 403)
        response = api.client(TOKEN_OF_ROLE[least]).request(method, url)
        assert response.status_code not in (401, 403), f"{method} {path}: {response.text}"

    refused = api.events(event_id="110113", actor="api:ris")
    assert refused and all(e.outcome == 4 for e in refused)
    assert {json.loads(e.detail or "{}")["path"] for e in refused} >= {"/api/v1/tokens"}
    revoked = api.events(event_id="110113", actor="api:old-ris")
    assert revoked and json.loads(revoked[0].detail or "{}")["reason"] == "revoked token"


def test_problem_details_for_not_found_validation_and_server_errors(
    make_api: Callable[..., Api], caplog: pytest.LogCaptureFixture
) -> None:
    api = make_api()
    viewer = api.client("ris")
    body = assert_problem(viewer.get("studies/1.2.3"), 404)
    assert body["type"] == "urn:pacsai:problem:not-found" and "1.2.3" in body["detail"]
    assert assert_problem(viewer.get("nothing-here"), 404)["type"] == "about:blank"
    body = assert_problem(viewer.get("studies", params={"limit": 0, "status": "LOST"}), 422)
    assert body["type"] == "urn:pacsai:problem:validation"
    assert {tuple(e["loc"]) for e in body["errors"]} == {("query", "limit"), ("query", "status")}
    assert_problem(viewer.get("studies", params={"cursor": "not-ours"}), 422)
    assert_problem(viewer.get("studies/not-a-uid"), 422)
    assert_problem(viewer.get("jobs/99999999999"), 422)
    assert_problem(viewer.get("worklist-results"), 422)  # needs accession, study_uid or since
    body = assert_problem(viewer.post("jobs/1/retry"), 403)
    assert body["type"] == "urn:pacsai:problem:forbidden"

    # A database failure: a generic 500 that says nothing of the SQL, and a log line without
    # the statement's values (which may be patient IDs).
    with api.database.transaction() as session:
        session.execute(text("ALTER TABLE studies RENAME TO studies_gone"))
    with caplog.at_level(logging.INFO):
        body = assert_problem(viewer.get("studies", params={"patient_id": "SECRET-PID-9"}), 500)
    assert "studies" not in body["detail"] and "SQL" not in body["detail"]
    logged = server_log(caplog)
    assert "internal error answering GET /api/v1/studies" in logged
    assert "SECRET-PID-9" not in logged


# --- audit of reads -----------------------------------------------------------------------------


def test_reads_are_audited_naming_the_token(
    make_api: Callable[..., Api], database_url: str
) -> None:
    api = make_api(database_url)
    study = seed_study(
        api.database,
        patient_id="PAT-AUDIT",
        job=JobStatus.SUCCEEDED,
        summaries=[("ct-abdomen", "ct_abdomen_demo", CT_SUMMARY)],
    )
    seed_study(api.database, patient_id="PAT-OTHER")
    viewer = api.client("ris")
    before = len(api.events(event_id="110112"))

    assert viewer.get("studies", params={"patient_id": "PAT-AUDIT"}).status_code == 200
    assert viewer.get(f"studies/{study.study_instance_uid}").status_code == 200
    assert viewer.get(f"jobs/{study.job_id}").status_code == 200
    assert viewer.get("jobs").status_code == 200
    assert viewer.get("worklist-results", params={"accession": "ACC001"}).status_code == 200

    events = api.events(event_id="110112")[before:]
    assert [json.loads(e.detail or "{}")["route"] for e in events] == [
        "GET /studies",
        "GET /studies/{study_uid}",
        "GET /jobs/{job_id}",
        "GET /jobs",
        "GET /worklist-results",
    ]
    assert {e.actor for e in events} == {"api:ris"}
    assert {e.remote_address for e in events} == {"127.0.0.1"}
    assert {e.action for e in events} == {"E"} and {e.outcome for e in events} == {0}
    listed, detail, job, jobs, worklist = events
    assert json.loads(listed.detail or "{}")["filters"]["patient_id"] == "PAT-AUDIT"
    assert listed.study_instance_uid == study.study_instance_uid  # a list of one names it
    for single in (detail, job):
        assert single.study_instance_uid == study.study_instance_uid
        assert single.patient_id == "PAT-AUDIT"
    assert study.study_instance_uid in json.loads(jobs.detail or "{}")["studies"]
    assert json.loads(worklist.detail or "{}")["returned"] == 2 - 1  # only one has a job
    # Token listing is no patient data: not a 110112 event; last use is recorded.
    assert api.client("it-admin").get("tokens").status_code == 200
    assert len(api.events(event_id="110112")) == before + 5
    tokens = {t["name"]: t for t in api.client("it-admin").get("tokens").json()}
    assert tokens["ris"]["last_used_at"] is not None
    assert tokens["old-ris"]["revoked_at"] is not None
    assert all("secret" not in t and "token_hash" not in t for t in tokens.values())


# --- lists: pagination and filters --------------------------------------------------------------


def test_pagination_is_stable_under_inserts(
    make_api: Callable[..., Api], database_url: str
) -> None:
    api = make_api(database_url)
    original = {
        seed_study(api.database, job=JobStatus.SUCCEEDED).study_instance_uid for _ in range(7)
    }
    viewer = api.client("ris")

    first = viewer.get("studies", params={"limit": 3}).json()
    jobs_first = viewer.get("jobs", params={"limit": 3}).json()
    assert len(first["items"]) == 3 and first["next_cursor"]
    inserted = {
        seed_study(api.database, job=JobStatus.SUCCEEDED).study_instance_uid for _ in range(4)
    }

    def rest(route: str, page: dict[str, Any]) -> list[str]:
        uids = [item["study_instance_uid"] for item in page["items"]]
        while page["next_cursor"]:
            page = viewer.get(route, params={"limit": 3, "cursor": page["next_cursor"]}).json()
            uids += [item["study_instance_uid"] for item in page["items"]]
        return uids

    for route, page in (("studies", first), ("jobs", jobs_first)):
        seen = rest(route, page)
        assert len(seen) == len(set(seen)) == 7, route  # no duplicate, no gap
        assert set(seen) == original, route
    newest = viewer.get("studies", params={"limit": 4}).json()["items"]
    assert {item["study_instance_uid"] for item in newest} == inserted


def test_study_filters_combine(make_api: Callable[..., Api], database_url: str) -> None:
    api = make_api(database_url)
    t0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    studies: dict[str, SeededStudy] = {}
    attributes: dict[str, tuple[str, str, str, datetime, JobStatus | None]] = {
        "a": ("CT", "P1", "ACC1", t0, JobStatus.SUCCEEDED),
        "b": ("CT", "P1", "ACC2", t0 + timedelta(hours=2), None),
        "c": ("MR", "P1", "ACC3", t0 + timedelta(hours=4), JobStatus.SUCCEEDED),
        "d": ("CT", "P2", "ACC4", t0 + timedelta(hours=6), JobStatus.FAILED),
        "e": ("CR", "P2", "ACC1", t0 + timedelta(days=1), JobStatus.SUCCEEDED),
    }
    for key, (modality, patient, accession, when, job) in attributes.items():
        studies[key] = seed_study(
            api.database,
            modality=modality,
            patient_id=patient,
            accession=accession,
            received_at=when,
            job=job,
        )
    viewer = api.client("ris")

    def found(**params: Any) -> set[str]:
        response = viewer.get("studies", params=params)
        assert response.status_code == 200, response.text
        uids = {item["study_instance_uid"] for item in response.json()["items"]}
        return {key for key, study in studies.items() if study.study_instance_uid in uids}

    assert found() == set("abcde")
    assert found(modality="CT") == set("abd")
    assert found(modality="ct", patient_id="P1") == set("ab")
    assert found(modality="CT", patient_id="P1", status="COMPLETE") == {"a"}
    assert found(status="RECEIVING") == {"b"}
    assert found(accession="ACC1") == set("ae")
    assert found(accession="ACC1", modality="CR") == {"e"}
    assert found(accession="ACC1", patient_id="P1", modality="CR") == set()
    start, end = t0 + timedelta(hours=1), t0 + timedelta(hours=6)
    assert found(received_from=start.isoformat(), received_to=end.isoformat()) == set("bc")
    assert found(received_from="2026-03-01T13:00:00+05:00", patient_id="P2") == set("de")
    assert found(received_to="2026-03-01T10:00:00") == {"a"}  # naive: UTC
    listed = viewer.get("studies", params={"accession": "ACC3"}).json()["items"]
    assert listed[0]["modalities"] == ["MR"] and listed[0]["patient_id"] == "P1"
    assert "patient_name" not in listed[0]
    jobs = viewer.get("jobs", params={"status": "FAILED"}).json()["items"]
    assert [j["study_instance_uid"] for j in jobs] == [studies["d"].study_instance_uid]
    by_study = viewer.get("jobs", params={"study_uid": studies["c"].study_instance_uid})
    assert [j["id"] for j in by_study.json()["items"]] == [studies["c"].job_id]
    both = viewer.get(
        "jobs", params={"study_uid": studies["c"].study_instance_uid, "status": "FAILED"}
    )
    assert both.json()["items"] == []


# --- studies and jobs in detail, retries --------------------------------------------------------


def test_study_detail_has_series_jobs_results_and_deliveries(
    make_api: Callable[..., Api],
) -> None:
    api = make_api()
    study = seed_study(
        api.database,
        job=JobStatus.SUCCEEDED,
        summaries=[("ct-abdomen", "ct_abdomen_demo", CT_SUMMARY)],
        delivery=DeliveryStatus.SENT,
    )
    body = api.client("ris").get(f"studies/{study.study_instance_uid}").json()
    assert body["instance_count"] == 2 and body["modalities"] == ["CT"]
    assert [s["instance_count"] for s in body["series"]] == [2]
    assert [j["status"] for j in body["jobs"]] == ["SUCCEEDED"]
    (result,) = body["results"]
    assert (result["model_name"], result["model_version"]) == ("ct_abdomen_demo", "0.1.0")
    assert {f["label"]: f["volume_ml"] for f in result["findings"]} == {
        "liver": 1500.0,
        "lesion": 12.5,
    }  # spleen: not present
    assert {o["kind"]: o["series_instance_uid"] for o in result["objects"]} == {
        "SEG": study.seg_series_uid,
        "SR": study.sr_series_uid,
    }
    (delivery,) = body["deliveries"]
    assert delivery["status"] == "SENT" and delivery["kinds"] == ["SEG", "SR"]


def test_job_detail_timings_and_retry_by_admin_only(
    make_api: Callable[..., Api], database_url: str
) -> None:
    api = make_api(database_url)
    timings = {"route": 0.01, "volume": 0.2, "forward": 1.5, "report": 0.3}
    failed = seed_study(api.database, job=JobStatus.FAILED, timings=timings)
    done = seed_study(
        api.database,
        job=JobStatus.SUCCEEDED,
        summaries=[("cxr", "cxr_findings_demo", CR_SUMMARY)],
        delivery=DeliveryStatus.FAILED,
    )
    viewer, admin = api.client("ris"), api.client("it-admin")

    job = viewer.get(f"jobs/{failed.job_id}").json()
    assert job["timings"] == timings and job["reason"] == "seeded failure"
    assert job["status"] == "FAILED" and job["seconds"] == 9.0
    assert job["patient_id"] == "PAT-001" and job["accession_number"] == "ACC001"
    assert_problem(viewer.post(f"jobs/{failed.job_id}/retry"), 403)

    retried = admin.post(f"jobs/{failed.job_id}/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json() == {
        "job_id": failed.job_id,
        "status": "QUEUED",
        "message": "queued again",
    }
    body = assert_problem(admin.post(f"jobs/{failed.job_id}/retry"), 409)
    assert "QUEUED" in body["detail"]
    assert_problem(admin.post("jobs/424242/retry"), 404)
    assert_problem(admin.post(f"jobs/{failed.job_id}/retry", json={"again": True}), 422)

    # A succeeded job with a failed delivery: the delivery is pending again, the job stays.
    outcome = admin.post(f"jobs/{done.job_id}/retry", json={}).json()
    assert outcome["status"] == "SUCCEEDED" and "1 failed deliveries" in outcome["message"]
    assert admin.get(f"jobs/{done.job_id}").json()["deliveries"][0]["status"] == "PENDING"
    assert_problem(admin.post(f"jobs/{done.job_id}/retry"), 409)  # nothing failed now
    rerun = admin.post(f"jobs/{done.job_id}/retry", json={"rerun": True, "resend": True})
    assert rerun.json()["status"] == "QUEUED"

    retries = [
        e for e in api.events(event_id="110100", actor="api:it-admin") if e.event_type == "110132"
    ]
    assert len(retries) == 3
    assert retries[0].study_instance_uid == failed.study_instance_uid
    assert retries[0].remote_address == "127.0.0.1"
    assert json.loads(retries[2].detail or "{}")["rerun"] is True


# --- worklist results ---------------------------------------------------------------------------


def test_worklist_results_with_findings_priority_and_result_uids(
    make_api: Callable[..., Api], database_url: str
) -> None:
    api = make_api(database_url, routes=ROUTES)
    big_lesion = seed_study(
        api.database,
        accession="ACC-CT",
        job=JobStatus.SUCCEEDED,
        summaries=[("ct-abdomen", "ct_abdomen_demo", CT_SUMMARY)],
    )
    chest = seed_study(
        api.database,
        modality="CR",
        accession="ACC-CR",
        job=JobStatus.SUCCEEDED,
        summaries=[("cxr", "cxr_findings_demo", CR_SUMMARY)],
        outputs=("SR",),
    )
    skipped = seed_study(api.database, accession="ACC-SKIP", job=JobStatus.SKIPPED)
    seed_study(api.database, accession="ACC-WAIT")  # no job yet: not a worklist result
    viewer = api.client("ris")

    (ct,) = viewer.get("worklist-results", params={"accession": "ACC-CT"}).json()["items"]
    assert ct["study_instance_uid"] == big_lesion.study_instance_uid
    assert ct["job_status"] == "SUCCEEDED"
    assert ct["models"] == [
        {
            "name": "ct_abdomen_demo",
            "version": "0.1.0",
            "route": "ct-abdomen",
            "series_instance_uid": ct["models"][0]["series_instance_uid"],
        }
    ]
    assert {f["label"]: f["volume_ml"] for f in ct["findings"]} == {"liver": 1500.0, "lesion": 12.5}
    assert ct["priority"] is True
    assert ct["priority_reasons"] == ["ct-abdomen: lesion 12.5 ml >= 10 ml"]
    assert ct["seg_series_uids"] == [big_lesion.seg_series_uid]
    assert ct["sr_series_uids"] == [big_lesion.sr_series_uid]

    response = viewer.get("worklist-results", params={"study_uid": chest.study_instance_uid})
    (cr,) = response.json()["items"]
    assert {f["label"]: f["probability"] for f in cr["findings"]} == {
        "nodule": 0.82,
        "effusion": 0.10,
    }
    assert cr["priority"] is False  # nodule 0.82 < 0.9
    assert cr["seg_series_uids"] == [] and cr["sr_series_uids"] == [chest.sr_series_uid]

    (skip,) = viewer.get("worklist-results", params={"accession": "ACC-SKIP"}).json()["items"]
    assert skip["job_status"] == "SKIPPED" and skip["models"] == [] and not skip["priority"]
    assert skip["study_instance_uid"] == skipped.study_instance_uid

    since = viewer.get("worklist-results", params={"since": "2000-01-01T00:00:00Z"}).json()
    assert {item["accession_number"] for item in since["items"]} == {"ACC-CT", "ACC-CR", "ACC-SKIP"}
    future = (utcnow() + timedelta(hours=1)).isoformat()
    assert viewer.get("worklist-results", params={"since": future}).json()["items"] == []


# --- health, readiness, metrics -----------------------------------------------------------------


def test_health_readiness_and_metrics_open_or_protected(make_api: Callable[..., Api]) -> None:
    open_api = make_api(api={"open_health": True, "open_metrics": True})
    anonymous = open_api.client()
    assert anonymous.get("healthz").json()["status"] == "ok"
    ready = anonymous.get("readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert set(ready.json()["checks"]) == {"database", "spool", "models", "queue"}
    assert anonymous.get("metrics").status_code == 200

    protected = make_api(api={"open_health": True, "open_metrics": False})
    assert_problem(protected.client().get("metrics"), 401)
    assert_problem(protected.client("audit-office").get("metrics"), 403)
    assert protected.client().get("healthz").status_code == 200

    # Readiness fails, with the reason, when the spool is gone.
    open_api.settings.storage.spool_dir.rmdir()
    not_ready = anonymous.get("readyz")
    assert not_ready.status_code == 503
    checks = not_ready.json()["checks"]
    assert checks["spool"]["ok"] is False and "not writable" in checks["spool"]["detail"]
    assert checks["database"]["ok"] is True


def test_readiness_waits_for_the_models_to_be_warm_on_a_live_worker(
    make_api: Callable[..., Api],
) -> None:
    """The models check reads the workers' heartbeats (the API process never loads a model):
    503 while a model warms up, 200 once it is warm; a refused bundle is named, not blocking."""
    api = make_api(
        inference={"models_dir": str(REPO / "models"), "device": "cpu"},
        routes=[
            {"name": "ct", "model": "ct_abdomen_demo"},
            {"name": "zoo", "model": "swin_unetr_btcv_segmentation"},
        ],
    )
    client = api.client()

    def models() -> tuple[int, dict[str, Any]]:
        answer = client.get("readyz")
        return answer.status_code, answer.json()["checks"]["models"]

    status, check = models()
    assert status == 503 and check["ok"] is False
    assert "ct_abdomen_demo: not loaded by any live worker" in check["detail"]

    refused = "refused: label 'Left Kideny' has no code"
    worker = report_worker(
        api.database, {"ct_abdomen_demo": "loading", "swin_unetr_btcv_segmentation": refused}
    )
    status, check = models()
    assert status == 503 and "ct_abdomen_demo: loading" in check["detail"]

    states = {"ct_abdomen_demo": "warm", "swin_unetr_btcv_segmentation": refused}
    report_worker(api.database, states, worker_id=worker)
    status, check = models()
    assert status == 200 and check["ok"] is True
    assert check["detail"] == f"ct_abdomen_demo: warm; swin_unetr_btcv_segmentation: {refused}"


def _samples(exposition: str) -> dict[str, float]:
    values = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_are_read_from_the_database(make_api: Callable[..., Api]) -> None:
    api = make_api(routes=ROUTES)
    seed_study(
        api.database,
        instances=3,
        job=JobStatus.SUCCEEDED,
        timings={"forward": 1.5, "volume": 0.2},
        summaries=[("ct-abdomen", "ct_abdomen_demo", CT_SUMMARY)],
        delivery=DeliveryStatus.SENT,
    )
    seed_study(api.database, job=JobStatus.FAILED, timings={"forward": 30.0})
    seed_study(api.database, job=JobStatus.QUEUED)
    seed_study(api.database)
    response = api.client("it-admin").get("metrics")
    assert response.headers["content-type"].startswith("text/plain")
    values = _samples(response.text)
    assert values["pacsai_instances_received_total"] == 3 + 2 + 2 + 2
    assert values["pacsai_received_bytes_total"] == 9 * 1000
    assert values["pacsai_studies_completed_total"] == 3
    assert values["pacsai_queue_depth"] == 1
    assert values['pacsai_jobs{status="FAILED"}'] == 1
    assert values['pacsai_deliveries{status="SENT"}'] == 1
    assert values['pacsai_deliveries{status="FAILED"}'] == 0
    assert values['pacsai_job_stage_seconds_count{stage="forward"}'] == 2
    assert values['pacsai_job_stage_seconds_sum{stage="forward"}'] == 31.5
    assert values['pacsai_job_stage_seconds_bucket{le="2.5",stage="forward"}'] == 1
    assert values["pacsai_job_duration_seconds_count"] == 2
    assert values["pacsai_database_up"] == 1
    assert "pacsai_associations_total" in response.text


# --- the token CLI and `pacsai api` -------------------------------------------------------------


def _pacsai(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    return subprocess.run(
        [sys.executable, "-m", "pacsai.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_token_cli_and_pacsai_api(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api={"enabled": False, "port": 0})
    settings.storage.spool_dir.mkdir(parents=True)
    config = tmp_path / "pacsai.yaml"
    data = settings.model_dump(mode="json", exclude_none=True)
    config.write_text(yaml.safe_dump(data))

    created = _pacsai("token", "create", "--role", "viewer", "--name", "night-ris", config=config)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.splitlines()[-1]
    assert re.fullmatch(r"pacsai_[A-Za-z0-9_-]{43}", secret)
    again = _pacsai("token", "create", "--role", "admin", "--name", "night-ris", config=config)
    assert again.returncode == 1 and "already exists" in again.stderr

    listed = _pacsai("token", "list", config=config)
    assert listed.returncode == 0 and "night-ris" in listed.stdout and "viewer" in listed.stdout
    assert secret not in listed.stdout and secret[7:20] not in listed.stdout

    # `pacsai api` alone, on a port it picks: the port is in its log line.
    data["api"] = {"enabled": False, "host": "127.0.0.1", "port": 0}
    config.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pacsai.cli", "api", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        match = wait_for(
            lambda: re.search(r"API listening on (http://\S+)", log.read_text()), timeout=60
        )
        client = httpx.Client(
            base_url=match.group(1) + "/", headers={"Authorization": f"Bearer {secret}"}
        )
        with client:
            assert client.get("studies").status_code == 200
            revoked = _pacsai("token", "revoke", "night-ris", config=config)
            assert revoked.returncode == 0 and "revoked" in revoked.stdout
            assert_problem(client.get("studies"), 401)
        assert _pacsai("token", "revoke", "night-ris", config=config).returncode == 1
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    assert "Bearer" not in log.read_text() and secret not in log.read_text()

    database = Database(settings.database.url)
    with database.reading() as session:
        events = list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.event_id == "110113").order_by(AuditEvent.id)
            )
        )
        activity = list(
            session.scalars(select(AuditEvent.event_type).where(AuditEvent.event_id == "110100"))
        )
    database.dispose()
    created_event, revoked_event, refused_event = events
    assert json.loads(created_event.detail or "{}")["command"] == "token create"
    assert json.loads(revoked_event.detail or "{}")["command"] == "token revoke"
    for event in (created_event, revoked_event):
        assert event.actor.startswith("cli:") and event.event_type == "110132"
    assert refused_event.actor == "api:night-ris"  # the revoked token, used after all
    assert activity == ["110120", "110121"]  # `pacsai api` started and stopped


# --- a node serving the API on the results of a real job ---------------------------------------


@pytest.mark.slow
def test_node_serves_worklist_results_of_a_real_job(
    start_node: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    patient_id = "PH-API-SECRET-77"
    study = write_phantom("cr", tmp_path / "cr", seed=5, patient_id=patient_id)
    routes = [
        {
            "name": "cxr",
            "when": {"Modality": ["CR", "DX"]},
            "model": "cxr_findings_demo",
            "priority": [{"finding": "nodule", "min_probability": 0.0}],
        }
    ]
    with caplog.at_level(logging.DEBUG):
        node = start_node(
            api={"enabled": True, "host": "127.0.0.1", "port": 0, "open_metrics": True},
            queue={"local_workers": 1, "poll_seconds": 0.2},
            inference={"models_dir": str(REPO / "models"), "device": "cpu"},
            routes=routes,
        )
        assert node.api is not None and node.api_port not in (None, 0)
        with node.database.transaction() as session:
            _, secret = create_token(
                session=session, name="ward-ris", role=TokenRole.VIEWER, now=utcnow()
            )
        target = Target(node.settings.node.ae_title, "127.0.0.1", node.receiver.port)
        assert push(study.paths, target).failed == 0
        client = httpx.Client(
            base_url=node.api.url + "/", headers={"Authorization": f"Bearer {secret}"}
        )
        with client:

            def finished() -> dict[str, Any] | None:
                items = client.get(
                    "worklist-results", params={"study_uid": study.study_instance_uid}
                ).json()["items"]
                return items[0] if items else None

            item = wait_for(finished, timeout=120)
            assert item["job_status"] == "SUCCEEDED", item
            assert {f["label"] for f in item["findings"]} == {"nodule", "effusion"}
            assert item["priority"] is True and item["sr_series_uids"]
            job = client.get(f"jobs/{item['job_id']}").json()
            assert {"route", "volume", "forward"} <= set(job["timings"])
            ready = client.get("readyz").json()
            assert ready["checks"]["queue"]["detail"].startswith("1/1 local workers alive")
            assert ready["checks"]["models"]["ok"] is True
            listed = client.get("studies", params={"patient_id": patient_id}).json()["items"]
            assert [s["study_instance_uid"] for s in listed] == [study.study_instance_uid]
            metrics = _samples(client.get("metrics").text)
            assert metrics["pacsai_instances_received_total"] == len(study.paths)
            assert metrics['pacsai_job_stage_seconds_count{stage="forward"}'] == 1
    logged = server_log(caplog)
    assert "GET /api/v1/studies 200" in logged  # the access log, without its query string
    assert "patient_id=" not in logged
    assert patient_id not in logged and "PHANTOM^" not in logged
