"""End to end: a CT phantom through a running ``pacsai serve`` to a storage SCP, cold and warm.

A phantom CT at 0.75 mm (512 x 512 x 256 by default, ``--size``/``--slices`` for less) is sent
with DCMTK ``storescu`` to ``pacsai serve`` (embedded defaults in a temporary directory: SQLite,
local worker, the route CT -> the bundle -> SEG + SR) whose one destination is DCMTK
``storescp`` (started with ``TCP_NODELAY=1``; it accepts neither the Label Map Segmentation SOP
Class nor compressed transfer syntaxes unless ``--accept-any``, so by default the node sends
the BINARY SEG uncompressed). The model is the demo CT bundle, or ``--bundle DIR`` (a zoo bundle
is given random weights made from its ``network_def``, as ``bench/inference.py`` does).

Printed, for the first study after start (cold: the node was ready, no study had run) and for a
second one (warm):

* last C-STORE acknowledged -> SEG written by storescp, and -> SR, each minus the study's quiet
  window (``--quiet``, ``node.study_quiet_seconds``);
* where that time went: study completion, queue, the job, delivery; and the job's stages
  (``jobs.timings``);
* node start -> models warm (``/readyz`` lists the worker's models as ``warm``).

``--no-warm-up`` (``inference.warm_up: false``) shows the cold start the warm-up removes.

The cold/warm ratio is printed against the issue's target (equal within 10 %). With ``--device
cuda`` also the warm targets: <= 3 s for the demo CT bundle, <= 5 s for wholeBody.

    python bench/e2e.py                                     # 512x512x256, the issue's size
    python bench/e2e.py --size 256 --slices 128 --device cpu  # a 2-core CPU machine
    python bench/e2e.py --bundle ../shared/zoo/wholeBody_ct_segmentation --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from _common import free_port
from pacsai.db import Database, Delivery, DeliveryStatus, Job, JobStatus, Study
from pacsai.phantom import write_phantom

REPO = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = REPO / "models" / "ct_abdomen_demo"
SPACING_MM = 0.75
LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"
#: Warm last-ack-to-SEG targets on a GPU (issue 11), seconds.
GPU_TARGETS = {"demo CT": 3.0, "wholeBody": 5.0}


def wait(predicate: Any, what: str, timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class Arrival:
    """A file storescp wrote: when (its modification time) and what."""

    at: float
    modality: str
    sop_class: str
    transfer_syntax: str


class StoreScp:
    """DCMTK storescp writing into ``out``; :meth:`arrivals` reads what came, per study."""

    def __init__(self, out: Path, accept_any: bool) -> None:
        self.out = out
        self.port = free_port()
        self.seen: dict[Path, tuple[str, Arrival] | None] = {}
        out.mkdir(parents=True)
        options = ["-pm", "+xa"] if accept_any else []
        self.process = subprocess.Popen(
            ["storescp", *options, "-aet", "DCMTK", "-od", str(out), str(self.port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def arrivals(self, study: str) -> list[Arrival]:
        for path in sorted(self.out.iterdir()):
            if self.seen.get(path) is not None:
                continue
            try:
                at = path.stat().st_mtime
                ds = dcmread(path, stop_before_pixels=True)
            except (OSError, InvalidDicomError, EOFError, ValueError):
                continue  # still being written
            self.seen[path] = (
                str(ds.StudyInstanceUID),
                Arrival(
                    at, str(ds.Modality), str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
                ),
            )
        return [item for uid, item in filter(None, self.seen.values()) if uid == study]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


class Node:
    """`pacsai serve` in ``folder`` with one route to ``bundle`` and storescp as destination."""

    def __init__(
        self, folder: Path, bundle: Path, device: str, quiet: float, scp: StoreScp, warm_up: bool
    ):
        models = folder / "models"
        models.mkdir(parents=True)
        (models / bundle.name).symlink_to(bundle.resolve())
        self.port, self.api_port = free_port(), free_port()
        self.quiet = quiet
        self.ready_state = "warm" if warm_up else "loaded"
        settings = {
            "node": {"port": self.port, "host": "127.0.0.1", "study_quiet_seconds": quiet},
            "storage": {
                "spool_dir": str(folder / "spool"),
                "results_dir": str(folder / "results"),
            },
            "database": {"url": f"sqlite:///{folder / 'pacsai.db'}"},
            "inference": {"models_dir": str(models), "device": device, "warm_up": warm_up},
            "routes": [
                {
                    "name": "ct",
                    "when": {"Modality": "CT"},
                    "model": bundle.name,
                    "outputs": ["seg", "sr"],
                    "send_to": ["pacs"],
                }
            ],
            "destinations": {"pacs": {"ae_title": "DCMTK", "host": "127.0.0.1", "port": scp.port}},
            "api": {"enabled": True, "host": "127.0.0.1", "port": self.api_port},
            "logging": {"level": "INFO"},
        }
        config = folder / "pacsai.yaml"
        config.write_text(yaml.safe_dump(settings))
        self.log = folder / "serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
        self.started = time.time()
        with self.log.open("wb") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacsai.cli", "serve", "--config", str(config)],
                cwd=folder,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.database = Database(f"sqlite:///{folder / 'pacsai.db'}")

    def warm(self) -> float:
        """Seconds from start until ``/readyz`` lists a worker whose models are all warm."""

        def ready() -> bool:
            if self.process.poll() is not None:
                raise SystemExit(f"pacsai serve exited:\n{self.log.read_text()[-3000:]}")
            try:
                answer = httpx.get(f"http://127.0.0.1:{self.api_port}/api/v1/readyz", timeout=5)
            except httpx.HTTPError:
                return False
            workers = answer.json().get("workers", [])
            states = [s for w in workers for s in w["models"].values()]
            if any(s not in (self.ready_state, "loading") for s in states):
                raise SystemExit(f"a model is not {self.ready_state}: {workers}")
            return bool(states) and all(s == self.ready_state for s in states)

        wait(ready, "models warm", timeout=1800, interval=0.1)
        return time.time() - self.started

    def settled(self, study: str) -> tuple[Job, list[Delivery]]:
        """The study's finished job and its deliveries, once none is pending."""

        def done() -> tuple[Job, list[Delivery]] | None:
            with self.database.reading() as session:
                job = session.scalars(
                    select(Job).join(Job.study).where(Study.study_instance_uid == study)
                ).first()
                if job is None or job.status not in JobStatus.finished():
                    return None
                deliveries = list(
                    session.scalars(select(Delivery).where(Delivery.job_id == job.id))
                )
                if any(
                    d.status in (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)
                    for d in deliveries
                ):
                    return None
                session.expunge_all()
                return job, deliveries

        settled: tuple[Job, list[Delivery]] = wait(done, "job and deliveries", 1800, 0.1)
        return settled

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.database.dispose()


@dataclass
class Run:
    """One study through the node."""

    seg: float  # last ack -> SEG at the SCP, minus the quiet window
    sr: float
    completion: float  # last ack -> job queued (quiet window included)
    queue: float
    job: float
    delivery: float  # job finished -> SEG at the SCP
    stages: dict[str, float]
    seg_form: str


def send(folder: Path, port: int) -> float:
    """storescu the series; the time its last C-STORE was acknowledged (it exits then)."""
    result = subprocess.run(
        ["storescu", "+sd", "-aec", "PACSAI", "127.0.0.1", str(port), str(folder)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"storescu failed: {result.stderr.decode()[-500:]}")
    return time.time()


def one_study(node: Node, scp: StoreScp, folder: Path, study: str) -> Run:
    acked = send(folder, node.port)
    arrived = wait(
        lambda: (a := scp.arrivals(study)) and {x.modality for x in a} >= {"SEG", "SR"} and a,
        "SEG and SR at storescp",
        timeout=1800,
    )
    job, deliveries = node.settled(study)
    if job.status is not JobStatus.SUCCEEDED or any(
        d.status is not DeliveryStatus.SENT for d in deliveries
    ):
        raise SystemExit(f"job {job.status.value}: {job.reason}")
    seg = min(a for a in arrived if a.modality == "SEG")
    sr = min(a.at for a in arrived if a.modality == "SR")
    assert job.started_at is not None and job.finished_at is not None
    created, started, finished = (
        t.timestamp() for t in (job.created_at, job.started_at, job.finished_at)
    )
    form = "LABELMAP" if seg.sop_class == LABEL_MAP_SEGMENTATION else "BINARY"
    return Run(
        seg=seg.at - acked - node.quiet,
        sr=sr - acked - node.quiet,
        completion=created - acked,
        queue=started - created,
        job=finished - started,
        delivery=seg.at - finished,
        stages=json.loads(job.timings or "{}"),
        seg_form=f"{form}, {seg.transfer_syntax}",
    )


def bundle_under_test(root: Path, given: Path | None) -> Path:
    if given is None:
        return DEMO_BUNDLE
    sys.path.insert(0, str(REPO))
    from tests.zoo_bundles import prepare_bundle

    models = root / "bundles"
    models.mkdir()
    return prepare_bundle(given.resolve(), models)


def report(cold: Run, warm: Run, quiet: float) -> None:
    print(f"\n{'':<44}{'cold':>9}{'warm':>9}{'cold/warm':>11}")
    rows = [
        (f"last ack -> SEG at the SCP, minus {quiet:g} s quiet", cold.seg, warm.seg),
        (f"last ack -> SR at the SCP, minus {quiet:g} s quiet", cold.sr, warm.sr),
    ]
    for label, a, b in rows:
        print(f"{label:<44}{a:>9.2f}{b:>9.2f}{a / b:>10.2f}x")
    print("  where it went")
    for label, a, b in [
        ("last ack -> job queued (quiet incl.)", cold.completion, warm.completion),
        ("queued -> started", cold.queue, warm.queue),
        ("job (started -> finished)", cold.job, warm.job),
        ("job finished -> SEG at the SCP", cold.delivery, warm.delivery),
    ]:
        print(f"    {label:<40}{a:>9.2f}{b:>9.2f}")
    print("  job stages")
    for stage in dict.fromkeys([*cold.stages, *warm.stages]):
        a, b = cold.stages.get(stage, 0.0), warm.stages.get(stage, 0.0)
        print(f"    {stage:<40}{a:>9.2f}{b:>9.2f}")
    print(f"  SEG received as: {cold.seg_form} (cold), {warm.seg_form} (warm)")
    ratio = max(cold.seg / warm.seg, cold.sr / warm.sr)
    verdict = "met" if ratio <= 1.10 else "NOT met"
    print(f"target cold = warm within 10%: {verdict} (worst ratio {ratio:.2f}x)")
    # The completion check runs every quiet/4 s (at most 1 s): that granularity is in both.
    after = [r.queue + r.job + r.delivery for r in (cold, warm)]
    print(f"  from job queued to SEG at the SCP: cold/warm {after[0] / after[1]:.2f}x")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512, help="rows and columns (512)")
    parser.add_argument("--slices", type=int, default=256, help="slices (256)")
    parser.add_argument("--device", default="auto", help="inference.device (auto)")
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle directory")
    parser.add_argument("--quiet", type=float, default=2.0, help="study quiet window, s (2)")
    parser.add_argument(
        "--accept-any",
        action="store_true",
        help="storescp accepts every SOP Class and transfer syntax (LABELMAP, compressed)",
    )
    parser.add_argument(
        "--no-warm-up",
        action="store_true",
        help="inference.warm_up: false, to see the cold start the warm-up removes",
    )
    args = parser.parse_args(argv)
    if not shutil.which("storescu") or not shutil.which("storescp"):
        raise SystemExit("needs DCMTK: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        bundle = bundle_under_test(root, args.bundle)
        fov = (args.size * SPACING_MM, args.size * SPACING_MM, args.slices * SPACING_MM)
        start = time.perf_counter()
        studies = [
            write_phantom("ct", root / f"study{i}", seed=11 + i, spacing=SPACING_MM, fov_mm=fov)
            for i in range(2)
        ]
        print(
            f"CT phantom {args.size}x{args.size}x{args.slices} at {SPACING_MM} mm "
            f"({len(studies[0].paths)} instances, written in {time.perf_counter() - start:.0f} s); "
            f"bundle {bundle.name}; device {args.device}; {os.cpu_count()} CPU cores"
        )
        scp = StoreScp(root / "scp", args.accept_any)
        node = Node(root / "node", bundle, args.device, args.quiet, scp, not args.no_warm_up)
        try:
            warm_at = node.warm()
            print(f"node start -> models {node.ready_state} (/readyz): {warm_at:.1f} s")
            runs = [
                one_study(node, scp, study.paths[0].parent, study.study_instance_uid)
                for study in studies
            ]
        finally:
            node.stop()
            scp.stop()
        report(runs[0], runs[1], args.quiet)
        device = next(
            (line for line in node.log.read_text().splitlines() if " ready: " in line), ""
        )
        if "device cuda" in device or args.device.startswith("cuda"):
            key = "demo CT" if args.bundle is None else "wholeBody"
            target = GPU_TARGETS[key]
            met = "met" if runs[1].seg <= target else "NOT met"
            print(f"target on a GPU, warm last ack -> SEG <= {target:g} s ({key}): {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
