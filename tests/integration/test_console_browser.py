"""The operator console in a real headless Chromium (Debian's, driven by Playwright) against a
real node (`pacsai serve`), a phantom study pushed over DICOM, the demo CT model, and a real
destination (DCMTK storescp) that is down at first, then up.

Screenshots of every page go to ``$PACSAI_TEST_ARTIFACTS/console`` (or the test's temporary
directory), and every request the browser made is checked to have stayed on the node.
"""

from __future__ import annotations

import os
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from pacsai.db import Database, Delivery, DeliveryStatus, Job, JobStatus, TokenRole
from pacsai.operations import Caller
from pacsai.operations.tokens import create_token
from pacsai.phantom import write_phantom
from pacsai.scu import Target, push
from tests.support import REPO, ServeProcess, free_port, require_tool, start_storescp, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.dcmtk]

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PATIENT = "PH-CONSOLE-0042"
SETUP = Caller("cli:test", None, {"command": "token create"})


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser() -> Iterator[Any]:
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    root = os.environ.get("PACSAI_TEST_ARTIFACTS")
    folder = (Path(root) if root else tmp_path) / "console"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Session:
    """One browser context (one person), recording every request it makes and every console
    message that reports an error (a CSP violation, a script error)."""

    def __init__(self, browser: Any, base_url: str, artifacts: Path, who: str) -> None:
        self.context = browser.new_context(
            base_url=base_url, viewport={"width": 1280, "height": 860}, accept_downloads=True
        )
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.context.on("request", lambda request: self.requests.append(request.url))
        self.page = self.context.new_page()
        self.page.on("console", self._console_message)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.artifacts = artifacts
        self.who = who

    def _console_message(self, message: Any) -> None:
        # Refused answers (403, asked for on purpose) are checked where they are made.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def sign_in(self, token: str) -> None:
        self.page.goto("/overview")
        assert "/sign-in" in self.page.url
        self.page.fill("#token", token)
        self.page.click("form[action='/sign-in'] button[type=submit]")
        self.page.wait_for_url(re.compile(r".*/overview$"))

    def shot(self, name: str, *, full: bool = True) -> Path:
        path = self.artifacts / f"{self.who}-{name}.png"
        self.page.screenshot(path=str(path), full_page=full)
        return path

    def text(self, selector: str = "main") -> str:
        return str(self.page.inner_text(selector))


def _deliveries(database: Database) -> list[Delivery]:
    with database.reading() as session:
        rows = list(session.scalars(select(Delivery).order_by(Delivery.id)))
        for row in rows:
            session.expunge(row)
    return rows


def _job(database: Database) -> Job | None:
    with database.reading() as session:
        job = session.scalars(select(Job).order_by(Job.id.desc())).first()
        if job is not None:
            session.expunge(job)
    return job


def test_the_console_in_a_real_browser(
    tmp_path: Path,
    serve_process: Callable[..., ServeProcess],
    browser: Any,
    artifacts: Path,
) -> None:
    require_tool("storescp")
    pacs_port, api_port = free_port(), free_port()
    node = serve_process(
        api={"enabled": True, "host": "127.0.0.1", "port": api_port},
        queue={"local_workers": 1, "poll_seconds": 0.2},
        inference={"models_dir": str(REPO / "models"), "device": "cpu"},
        destinations={
            "pacs": {
                "ae_title": "DCMTK",
                "host": "127.0.0.1",
                "port": pacs_port,
                "max_attempts": 2,
                "backoff_seconds": 0.2,
                "max_backoff_seconds": 1,
                "timeout_seconds": 5,
            }
        },
    )
    base = f"http://127.0.0.1:{api_port}"
    wait_for(lambda: _answers(base + "/api/v1/healthz"), timeout=60)
    database = Database(node.settings.database.url)
    tokens = {
        role: create_token(database, SETUP, name=f"{role}-desk", role=TokenRole(role)).secret
        for role in ("viewer", "auditor", "admin")
    }

    # A phantom CT study, pushed over DICOM; its SEG and SR cannot be delivered (PACS down).
    study = write_phantom("ct", tmp_path / "ct", seed=11, patient_id=PATIENT)
    target = Target(node.settings.node.ae_title, "127.0.0.1", node.port)
    assert push(study.paths, target).failed == 0

    def settled() -> bool:
        job = _job(database)
        deliveries = _deliveries(database)
        return (
            job is not None
            and job.status == JobStatus.SUCCEEDED
            and bool(deliveries)
            and all(d.status == DeliveryStatus.FAILED for d in deliveries)
        )

    wait_for(settled, timeout=300, interval=0.5)
    job = _job(database)
    assert job is not None
    uid = study.study_instance_uid
    sessions: list[Session] = []

    try:
        # --- a viewer -------------------------------------------------------------------------
        viewer = Session(browser, base, artifacts, "viewer")
        sessions.append(viewer)
        viewer.page.goto(f"/studies/{uid}")  # no session: sent to sign in, shown nothing
        assert "/sign-in" in viewer.page.url and PATIENT not in viewer.page.content()
        viewer.sign_in(tokens["viewer"])
        overview = viewer.text("#overview")
        assert re.search(r"\b1\s+studies received today", overview), overview
        assert "FAILED" in overview and "ct_abdomen_demo" in overview
        assert viewer.page.locator("nav a", has_text="Audit").count() == 0
        with viewer.page.expect_response(re.compile(r".*/overview/panel$"), timeout=30_000) as got:
            pass  # htmx refreshes the overview by itself
        assert got.value.status == 200 and "studies received today" in got.value.text()
        viewer.shot("overview")
        viewer.shot("overview-top", full=False)

        viewer.page.goto("/studies")
        assert PATIENT in viewer.text()
        viewer.shot("studies")
        viewer.page.click(f"a[href='/studies/{uid}']")
        viewer.page.wait_for_url(re.compile(f".*/studies/{re.escape(uid)}$"))
        page_text = viewer.text()
        for label in ("liver", "spleen", "kidney"):
            assert label in page_text
        assert "Structured report measurements" in page_text and "Volume" in page_text
        image = viewer.page.locator(".previews img").first
        image.wait_for()
        assert image.evaluate("img => img.complete && img.naturalWidth > 0")
        viewer.shot("study")
        viewer.page.locator("h2", has_text="Findings").evaluate(
            "heading => heading.scrollIntoView({block: 'start'})"
        )
        viewer.shot("study-findings", full=False)

        viewer.page.goto("/jobs")
        assert viewer.page.locator("a", has_text=re.compile("^Retry$")).count() == 0
        viewer.page.goto(f"/jobs/{job.id}")
        assert viewer.page.locator("a", has_text=re.compile("^Retry$")).count() == 0
        viewer.shot("job")
        viewer.page.goto("/models")
        viewer.page.fill("input[name=study_uid]", uid)
        viewer.page.click("form[action='/models'] button")
        assert "ct_abdomen_demo" in viewer.text(".card:last-of-type")
        viewer.shot("models")
        response = viewer.page.goto("/audit")
        assert response is not None and response.status == 403
        assert "needs auditor" in viewer.text()
        forged = viewer.page.request.post(f"/jobs/{job.id}/retry", form={"mode": "retry"})
        assert forged.status == 403

        cookies = viewer.context.cookies()
        viewer.page.goto("/overview")
        viewer.page.click("form[action='/sign-out'] button")
        viewer.page.wait_for_url(re.compile(".*/sign-in$"))
        replay = Session(browser, base, artifacts, "replay")
        sessions.append(replay)
        replay.context.add_cookies(cookies)
        replay.page.goto("/overview")
        assert "/sign-in" in replay.page.url  # the session ended with the sign-out

        # --- an auditor -----------------------------------------------------------------------
        auditor = Session(browser, base, artifacts, "auditor")
        sessions.append(auditor)
        auditor.sign_in(tokens["auditor"])
        auditor.page.goto(f"/audit?patient_id={PATIENT}")
        assert "api:viewer-desk" in auditor.text()  # the viewer's reads, audited
        auditor.shot("audit")
        auditor.page.click("form[action='/audit/verify'] button")
        assert "Audit chain intact" in auditor.text()
        auditor.shot("audit-verified")
        export = auditor.page.request.get("/audit/export?format=dicom-xml")
        assert export.status == 200
        assert ET.fromstring(export.text()).tag == "AuditMessages"

        # --- an admin retries the failed delivery once the PACS is up -------------------------
        admin = Session(browser, base, artifacts, "admin")
        sessions.append(admin)
        admin.sign_in(tokens["admin"])
        no_csrf = admin.page.request.post(f"/jobs/{job.id}/retry", form={"mode": "retry"})
        assert no_csrf.status == 403 and "CSRF" in no_csrf.text()
        assert {d.status for d in _deliveries(database)} == {DeliveryStatus.FAILED}

        storescp = start_storescp(tmp_path / "pacs", pacs_port)
        try:
            admin.page.goto(f"/jobs/{job.id}")
            admin.page.click("a.button:text-is('Retry')")
            admin.page.wait_for_url(re.compile(r".*/retry\?mode=retry$"))
            admin.shot("confirm-retry")
            admin.page.click("form button.danger")
            admin.page.wait_for_url(re.compile(r".*notice=retried$"))
            assert "Retry requested" in admin.text()

            def sent() -> bool:
                admin.page.goto(f"/studies/{uid}")
                states = admin.page.locator("table.deliveries .state").all_inner_texts()
                return bool(states) and set(states) == {"SENT"}

            wait_for(sent, timeout=90, interval=1.0)
            admin.shot("study-sent")
        finally:
            storescp.terminate()
            storescp.wait(timeout=10)
        received = sorted(p.name.split(".")[0] for p in (tmp_path / "pacs").iterdir())
        assert len(received) == 2, received  # the SEG and the SR, once each

        admin.page.goto("/tokens")
        admin.shot("tokens")
        admin.page.goto("/api/v1/docs")
        admin.page.locator(".swagger-ui .info").wait_for()
        admin.shot("api-docs", full=False)
    finally:
        for session in sessions:
            session.context.close()
        database.dispose()

    for session in sessions:
        outside = [u for u in session.requests if not u.startswith((base + "/", "data:"))]
        assert outside == [], f"{session.who} fetched from outside the node: {outside}"
        assert session.errors == [], f"{session.who}: errors in the browser: {session.errors}"
    shots = sorted(p.name for p in artifacts.glob("*.png"))
    assert len(shots) >= 10, shots


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
