"""The operator console and the hardening of every HTTP answer, over real HTTP (uvicorn on a free
port, SQLite; the session and audit checks also on PostgreSQL): sign-in sessions, roles, CSRF,
audited reads, tokens and audit pages, security headers, trusted proxies, offline docs.

The browser itself (pages as a person sees them, a real node and a real PACS) is
``test_console_browser.py``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import select, update

from pacsai.api import ApiServer, create_app
from pacsai.api.console.pages import router as console_router
from pacsai.config import Settings
from pacsai.db import (
    AuditEvent,
    ConsoleSession,
    Database,
    DeliveryStatus,
    Job,
    JobStatus,
    TokenRole,
    upgrade,
    utcnow,
)
from pacsai.db.tokens import create_token, revoke_token
from tests.support import SeededStudy, make_settings, seed_study

SECURITY_HEADERS = {
    "content-security-policy": "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
CT_SUMMARY = {"labels": [{"value": 1, "name": "liver", "voxels": 50, "volume_ml": 1234.5}]}
PATIENT = "PAT-CONSOLE-SECRET"


@dataclass
class Console:
    """A node's API and console on a free port, a token per role, and a seeded study."""

    settings: Settings
    database: Database
    server: ApiServer
    tokens: dict[str, str]
    study: SeededStudy
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def client(self, **headers: str) -> httpx.Client:
        client = httpx.Client(base_url=self.base_url, headers=headers, timeout=60)
        self.clients.append(client)
        return client

    def signed_in(self, name: str) -> httpx.Client:
        """A client holding a console session of token ``name``."""
        client = self.client()
        response = sign_in(client, self.tokens[name])
        assert response.status_code == 303, response.text
        assert client.cookies.get("pacsai_session")
        return client

    def events(self, **where: Any) -> list[AuditEvent]:
        with self.database.reading() as session:
            query = select(AuditEvent).order_by(AuditEvent.id)
            for name, value in where.items():
                query = query.where(getattr(AuditEvent, name) == value)
            rows = list(session.scalars(query))
            for row in rows:
                session.expunge(row)
        return rows


def sign_in(client: httpx.Client, token: str, next_path: str = "/overview") -> httpx.Response:
    page = client.get("/sign-in")
    nonce = re.search(r'name="nonce" value="([^"]+)"', page.text)
    assert nonce, page.text
    return client.post(
        "/sign-in", data={"token": token, "nonce": nonce.group(1), "next": next_path}
    )


def csrf_of(page: httpx.Response) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
    assert match, page.text
    return match.group(1)


@pytest.fixture
def make_console(tmp_path: Path) -> Iterator[Callable[..., Console]]:
    made: list[Console] = []

    def make(database_url: str | None = None, **sections: Any) -> Console:
        api = {"enabled": True, "port": 0, **sections.pop("api", {})}
        settings = make_settings(tmp_path / f"c{len(made)}", database_url, api=api, **sections)
        settings.storage.spool_dir.mkdir(parents=True, exist_ok=True)
        database = Database(settings.database.url)
        upgrade(database)
        tokens = {}
        with database.transaction() as session:
            for name, role in [
                ("ward", TokenRole.VIEWER),
                ("dpo", TokenRole.AUDITOR),
                ("it", TokenRole.ADMIN),
                ("gone", TokenRole.VIEWER),
            ]:
                _, tokens[name] = create_token(session=session, name=name, role=role, now=utcnow())
            revoke_token(session=session, name_or_id="gone", now=utcnow())
        study = seed_study(
            database,
            patient_id=PATIENT,
            accession="ACC-CON",
            job=JobStatus.SUCCEEDED,
            timings={"route": 0.05, "forward": 2.0, "report": 0.5},
            summaries=[("ct-abdomen", "ct_abdomen_demo", CT_SUMMARY)],
            delivery=DeliveryStatus.FAILED,
        )
        server = ApiServer(create_app(settings, database), host="127.0.0.1", port=0)
        server.start()
        console = Console(settings, database, server, tokens, study)
        made.append(console)
        return console

    yield make
    for console in made:
        for client in console.clients:
            client.close()
        console.server.stop()
        console.database.dispose()


def console_pages(console: Console) -> list[tuple[str, str]]:
    """(method, concrete path) of every console route, path parameters filled in."""
    values = {
        "study_uid": console.study.study_instance_uid,
        "job_id": str(console.study.job_id),
        "token_id": "1",
        "object_id": "1",
        "name": "seg-slice001.png",
    }
    pages = []
    for route in console_router.routes:
        assert isinstance(route, APIRoute)
        if route.path.startswith("/sign-in") or route.path == "/":
            continue
        path = route.path
        for key, value in values.items():
            path = path.replace("{" + key + "}", value)
        for method in route.methods:
            pages.append((method, path))
    return sorted(pages)


# --- sessions -----------------------------------------------------------------------------------


def test_every_console_page_without_a_session_redirects_to_sign_in_and_shows_nothing(
    make_console: Callable[..., Console],
) -> None:
    console = make_console()
    pages = console_pages(console)
    assert {path for _, path in pages} >= {
        "/overview",
        "/studies",
        f"/studies/{console.study.study_instance_uid}",
        "/jobs",
        "/models",
        "/audit",
        "/tokens",
        "/audit/export",
    }
    stale = console.client()
    stale.cookies.set("pacsai_session", "not-a-session")
    for client in (console.client(), stale):
        for method, path in pages:
            response = client.request(method, path, data={"csrf_token": "x"})
            assert response.status_code == 303, (method, path, response.status_code)
            assert response.headers["location"].startswith("/sign-in"), (method, path)
            assert PATIENT not in response.text and "ACC-CON" not in response.text
    assert console.client().get("/").headers["location"] == "/overview"
    # After signing in, the browser goes back where it was sent away from.
    client = console.client()
    wanted = "/studies?accession=ACC-CON"
    redirect = client.get(wanted).headers["location"]
    assert redirect == "/sign-in?next=/studies%3Faccession%3DACC-CON"
    response = sign_in(client, console.tokens["ward"], next_path=wanted)
    assert response.headers["location"] == wanted
    # ...but never to another site.
    other = console.client()
    assert sign_in(other, console.tokens["ward"], "//evil.example/x").headers["location"] == (
        "/overview"
    )


def test_sign_in_needs_a_known_unrevoked_token_and_the_form_it_was_given(
    make_console: Callable[..., Console],
) -> None:
    console = make_console()
    client = console.client()
    unknown = sign_in(client, "pacsai_" + "A" * 43)
    assert unknown.status_code == 401 and "not known" in unknown.text
    revoked = sign_in(client, console.tokens["gone"])
    assert revoked.status_code == 401 and "revoked" in revoked.text
    # A sign-in posted without the form's nonce cookie (login CSRF) is refused.
    bare = console.client().post(
        "/sign-in", data={"token": console.tokens["it"], "nonce": "x", "next": "/overview"}
    )
    assert bare.status_code == 401 and not bare.cookies.get("pacsai_session")
    ok = sign_in(client, console.tokens["it"])
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert console.tokens["it"] not in cookie
    logins = console.events(event_id="110114")
    assert [(e.actor, e.event_type, e.outcome) for e in logins] == [
        ("api:gone", "110122", 4),
        ("api:it", "110122", 0),
    ]


def test_sign_out_idle_timeout_and_revocation_end_sessions(
    make_console: Callable[..., Console], database_url: str
) -> None:
    console = make_console(database_url, api={"session_idle_minutes": 5})
    client = console.signed_in("ward")
    secret = client.cookies["pacsai_session"]
    page = client.get("/overview")
    assert page.status_code == 200
    assert client.post("/sign-out", data={"csrf_token": csrf_of(page)}).status_code == 303
    replay = console.client()
    replay.cookies.set("pacsai_session", secret)  # a copy of the cookie is worthless now
    assert replay.get("/overview").status_code == 303
    assert [e.event_type for e in console.events(event_id="110114")] == ["110122", "110123"]

    idle = console.signed_in("ward")
    assert idle.get("/overview").status_code == 200
    with console.database.transaction() as session:
        session.execute(update(ConsoleSession).values(last_seen_at=utcnow() - timedelta(minutes=6)))
    assert idle.get("/overview").status_code == 303
    with console.database.reading() as session:
        assert all(row.ended_at is not None for row in session.scalars(select(ConsoleSession)))

    revoked = console.signed_in("dpo")
    assert revoked.get("/audit").status_code == 200
    admin = console.signed_in("it")
    confirm = admin.get("/tokens/2/revoke")
    assert "Revoke token &#39;dpo&#39;?" in confirm.text
    done = admin.post("/tokens/2/revoke", data={"csrf_token": csrf_of(confirm)})
    assert done.status_code == 303
    assert revoked.get("/audit").status_code == 303  # the token's sessions ended with it


# --- roles, CSRF and audited reads --------------------------------------------------------------


def test_roles_decide_pages_and_buttons_and_forms_need_the_csrf_token(
    make_console: Callable[..., Console],
) -> None:
    console = make_console()
    job_id = console.study.job_id
    viewer = console.signed_in("ward")
    overview = viewer.get("/overview")
    assert 'href="/audit"' not in overview.text and 'href="/tokens"' not in overview.text
    assert viewer.get("/audit").status_code == 403
    assert viewer.get("/tokens").status_code == 403
    assert viewer.get(f"/jobs/{job_id}/retry").status_code == 403
    assert "/retry" not in viewer.get("/jobs").text
    assert "/retry" not in viewer.get(f"/jobs/{job_id}").text
    forged = viewer.post(f"/jobs/{job_id}/retry", data={"csrf_token": csrf_of(overview)})
    assert forged.status_code == 403

    admin = console.signed_in("it")
    page = admin.get(f"/jobs/{job_id}")
    assert f"/jobs/{job_id}/retry?mode=retry" in page.text
    for data in ({}, {"csrf_token": "0" * 64}, {"csrf_token": csrf_of(overview)}):
        refused = admin.post(f"/jobs/{job_id}/retry", data={"mode": "retry", **data})
        assert refused.status_code == 403 and "CSRF" in refused.text
    with console.database.reading() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.SUCCEEDED
    assert "FAILED" in admin.get(f"/jobs/{job_id}").text  # the delivery was not touched

    confirm = admin.get(f"/jobs/{job_id}/retry", params={"mode": "retry"})
    done = admin.post(
        f"/jobs/{job_id}/retry", data={"mode": "retry", "csrf_token": csrf_of(confirm)}
    )
    assert done.status_code == 303 and done.headers["location"].endswith("notice=retried")
    assert "PENDING" in admin.get(f"/jobs/{job_id}").text

    alerts = console.events(event_id="110113")
    reasons = [json.loads(e.detail or "{}").get("reason") for e in alerts]
    assert reasons.count("CSRF token missing or wrong") == 3
    assert any(r and r.startswith("role viewer") for r in reasons)
    (retry,) = [e for e in console.events(event_id="110100") if e.actor == "api:it"]
    assert retry.event_type == "110132"
    assert json.loads(retry.detail or "{}")["via"] == "console"


def test_pages_with_patient_data_are_audited_like_the_api(
    make_console: Callable[..., Console], database_url: str
) -> None:
    console = make_console(database_url)
    viewer = console.signed_in("ward")
    uid = console.study.study_instance_uid
    before = len(console.events(event_id="110112"))
    listed = viewer.get("/studies", params={"patient_id": PATIENT})
    assert listed.status_code == 200 and uid in listed.text
    study = viewer.get(f"/studies/{uid}")
    assert study.status_code == 200
    assert "liver" in study.text and "1234.5 ml" in study.text
    assert "forward" in study.text and "<svg" in study.text  # a bar per stage
    assert viewer.get("/jobs").status_code == 200
    assert viewer.get(f"/jobs/{console.study.job_id}").status_code == 200
    for _ in range(3):
        assert viewer.get("/overview/panel").status_code == 200  # no patient data: no event
    events = console.events(event_id="110112")[before:]
    assert [json.loads(e.detail or "{}")["route"] for e in events] == [
        "GET /studies",
        "GET /studies/{study_uid}",
        "GET /jobs",
        "GET /jobs/{job_id}",
    ]
    assert {e.actor for e in events} == {"api:ward"}
    assert {json.loads(e.detail or "{}")["via"] for e in events} == {"console"}
    assert events[1].patient_id == PATIENT and events[1].study_instance_uid == uid
    # Bad input is a message on the page, never a server error.
    for params in ({"date_from": "yesterday"}, {"patient_id": "a\x01b"}, {"cursor": "zz"}):
        response = viewer.get("/studies", params=params)
        assert response.status_code == 422 and 'class="error"' in response.text
    assert viewer.get("/studies/not-a-uid").status_code == 422
    assert viewer.get("/studies/1.2.3").status_code == 404
    assert viewer.get("/jobs/424242").status_code == 404


def test_auditor_pages_verify_and_export_and_admins_manage_tokens(
    make_console: Callable[..., Console],
) -> None:
    console = make_console()
    auditor = console.signed_in("dpo")
    page = auditor.get("/audit", params={"actor": "api:gone"})
    assert page.status_code == 200
    verified = auditor.post("/audit/verify", data={"csrf_token": csrf_of(page)})
    assert verified.status_code == 200 and "intact" in verified.text
    overview = auditor.get("/overview").text
    assert "Audit chain intact" in overview and "api:dpo" in overview
    exported = auditor.get("/audit/export", params={"format": "dicom-xml"})
    assert exported.status_code == 200 and exported.text.rstrip().endswith("</AuditMessages>")
    csv = auditor.get("/audit/export", params={"format": "csv", "actor": "api:dpo"})
    assert csv.headers["content-type"].startswith("text/csv")
    uses = [e for e in console.events(event_id="110101") if e.actor == "api:dpo"]
    assert [json.loads(e.detail or "{}").get("format") for e in uses][-2:] == ["dicom-xml", "csv"]

    admin = console.signed_in("it")
    tokens = admin.get("/tokens")
    created = admin.post(
        "/tokens", data={"name": "night-ris", "role": "viewer", "csrf_token": csrf_of(tokens)}
    )
    secret = re.search(r'<code id="new-token">(pacsai_[A-Za-z0-9_-]{43})</code>', created.text)
    assert secret, created.text
    assert secret.group(1) not in admin.get("/tokens").text  # shown once
    api = console.client(authorization=f"Bearer {secret.group(1)}")
    assert api.get("/api/v1/studies").status_code == 200
    again = admin.post(
        "/tokens", data={"name": "night-ris", "role": "admin", "csrf_token": csrf_of(tokens)}
    )
    assert again.status_code == 422 and "already exists" in again.text
    made = [e for e in console.events(event_id="110113") if e.actor == "api:it"]
    assert json.loads(made[0].detail or "{}")["action"] == "token create"


# --- every HTTP answer --------------------------------------------------------------------------


def test_security_headers_on_every_answer(make_console: Callable[..., Console]) -> None:
    console = make_console(api={"open_metrics": True})
    viewer = console.signed_in("ward")
    bearer = console.client(authorization=f"Bearer {console.tokens['ward']}")
    answers = [
        console.client().get("/sign-in"),
        console.client().get("/overview"),  # a redirect
        viewer.get("/overview"),
        viewer.get("/audit"),  # 403 page
        viewer.get("/static/console.css"),
        viewer.get("/static/htmx.min.js"),
        viewer.get("/static/swagger/swagger-ui.css"),
        bearer.get("/api/v1/studies"),
        bearer.get("/api/v1/tokens"),  # problem 403
        console.client().get("/api/v1/nothing"),  # problem 404
        console.client().get("/api/v1/healthz"),
        console.client().get("/api/v1/metrics"),
        console.client().get("/api/v1/docs"),
        console.client().get("/api/v1/openapi.json"),
    ]
    for response in answers:
        for name, value in SECURITY_HEADERS.items():
            assert value in response.headers.get(name, ""), (response.request.url, name)
        static = response.request.url.path.startswith("/static/")
        assert (response.headers.get("cache-control") == "no-store") is not static
    csp = answers[0].headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_forwarded_headers_are_believed_only_from_trusted_proxies(
    make_console: Callable[..., Console],
) -> None:
    forged = {"x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "https"}
    plain = make_console()
    client = plain.client(authorization=f"Bearer {plain.tokens['ward']}", **forged)
    assert client.get("/api/v1/studies").status_code == 200
    assert plain.events(event_id="110112")[-1].remote_address == "127.0.0.1"
    signed = plain.client(**forged)
    assert "Secure" not in sign_in(signed, plain.tokens["ward"]).headers["set-cookie"]

    proxied = make_console(api={"trusted_proxies": ["127.0.0.0/8"]})
    client = proxied.client(authorization=f"Bearer {proxied.tokens['ward']}", **forged)
    assert client.get("/api/v1/studies").status_code == 200
    assert proxied.events(event_id="110112")[-1].remote_address == "203.0.113.7"
    signed = proxied.client(**forged)
    assert "Secure" in sign_in(signed, proxied.tokens["ward"]).headers["set-cookie"]


def test_docs_work_offline_and_follow_open_docs(make_console: Callable[..., Console]) -> None:
    console = make_console()
    anonymous = console.client()
    docs = anonymous.get("/api/v1/docs")
    assert docs.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert sources and all(s.startswith("/") for s in sources), sources
    for source in sources:
        assert anonymous.get(source).status_code == 200, source
    assert "<script>" not in docs.text  # no inline script: the CSP would refuse it
    assert anonymous.get("/api/v1/openapi.json").json()["info"]["title"] == "pacsai"
    assert anonymous.get("/docs").headers["location"] == "/api/v1/docs"
    index = anonymous.get("/api/v1").json()
    assert index["docs"] == "/api/v1/docs" and index["openapi"] == "/api/v1/openapi.json"
    assert "/api/v1/docs" in anonymous.get("/api/v1", headers={"accept": "text/html"}).text

    closed = make_console(api={"open_docs": False})
    for path in ("/api/v1/docs", "/api/v1/openapi.json"):
        assert closed.client().get(path).status_code == 401
        bearer = closed.client(authorization=f"Bearer {closed.tokens['ward']}")
        assert bearer.get(path).status_code == 200
        assert closed.signed_in("ward").get(path).status_code == 200
