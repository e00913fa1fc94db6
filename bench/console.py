"""Console page times on a node that ran the demo CT model on a phantom study.

Starts an in-process node (SQLite, one job worker, the demo bundles), pushes a CT phantom, waits
for its job, signs in to the console and prints each page's median answer time over 10 requests
(the study page also on its first request, which draws the SEG previews).

    .venv/bin/python bench/console.py
"""

from __future__ import annotations

import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import select

from pacsai.config import Settings
from pacsai.db import Job, JobStatus, TokenRole
from pacsai.operations import Caller
from pacsai.operations.tokens import create_token
from pacsai.phantom import write_phantom
from pacsai.scu import Target, push
from pacsai.service import Node, configure_libraries

REPO = Path(__file__).resolve().parents[1]
PAGES = ["/overview", "/overview/panel", "/studies", "/jobs", "/jobs/1", "/models", "/audit"]


def main() -> None:
    configure_libraries()
    home = Path(tempfile.mkdtemp(prefix="pacsai-bench-console-"))
    settings = Settings(
        node={"host": "127.0.0.1", "port": 0, "study_quiet_seconds": 1.0},
        storage={
            "spool_dir": str(home / "spool"),
            "results_dir": str(home / "results"),
            "min_free_mb": 0,
        },
        database={"url": f"sqlite:///{home / 'pacsai.db'}"},
        api={"enabled": True, "host": "127.0.0.1", "port": 0},
        queue={"local_workers": 1, "poll_seconds": 0.2},
        inference={"models_dir": str(REPO / "models"), "device": "cpu"},
    )
    node = Node(settings)
    node.start()
    try:
        secret = create_token(
            node.database, Caller("cli:bench"), name="bench", role=TokenRole.ADMIN
        ).secret
        study = write_phantom("ct", home / "ct", seed=3)
        push(study.paths, Target(settings.node.ae_title, "127.0.0.1", node.receiver.port))

        def done() -> bool:
            with node.database.reading() as session:
                job = session.scalars(select(Job)).first()
                return job is not None and job.status == JobStatus.SUCCEEDED

        deadline = time.monotonic() + 600
        while not done():
            if time.monotonic() > deadline:
                sys.exit("the job did not finish within 10 minutes")
            time.sleep(0.2)
        client = httpx.Client(base_url=f"http://127.0.0.1:{node.api_port}", timeout=60)
        form = client.get("/sign-in").text
        nonce = re.search(r'name="nonce" value="([^"]+)"', form)
        assert nonce is not None
        client.post("/sign-in", data={"token": secret, "nonce": nonce.group(1)})

        def median_ms(path: str, count: int) -> float:
            times = []
            for _ in range(count):
                start = time.perf_counter()
                response = client.get(path)
                times.append((time.perf_counter() - start) * 1000)
                response.raise_for_status()
            return statistics.median(times)

        study_page = f"/studies/{study.study_instance_uid}"
        print(
            f"{'study page, first (draws the SEG previews)':45} {median_ms(study_page, 1):7.0f} ms"
        )
        print(f"{'study page, previews kept':45} {median_ms(study_page, 10):7.0f} ms")
        for path in PAGES:
            print(f"{path:45} {median_ms(path, 10):7.0f} ms")
    finally:
        node.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
