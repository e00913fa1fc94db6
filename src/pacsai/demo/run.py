"""``pacsai demo``: the whole loop on one machine, with no PACS around.

It starts a node in this process and a PACS stand-in beside it (a real Orthanc when installed,
else :class:`~pacsai.demo.local_pacs.LocalPacs`), writes a phantom study per modality, has the
PACS push each study to the node, follows each study through the node (received, job, results,
deliveries) until its SEG and SR are back in the PACS, then reports what came back, how long it
took, and writes PNG previews of each SEG over its source slices.

The node is configured like a small ``pacsai serve``: spool, database and results under the work
directory, one job worker, the demo bundles, and the PACS as its only destination.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table
from sqlalchemy import select

from pacsai.config import Settings
from pacsai.db import DeliveryStatus, Job, JobStatus, Study
from pacsai.demo.local_pacs import LocalPacs
from pacsai.demo.orthanc import Orthanc
from pacsai.demo.preview import write_segmentation_previews
from pacsai.errors import ConfigError, PacsaiError
from pacsai.inference.bundle import BundleInfo
from pacsai.inference.registry import ModelRegistry
from pacsai.phantom import PhantomStudy, write_phantom
from pacsai.reporting.sop_classes import LABEL_MAP_SEGMENTATION_STORAGE
from pacsai.reporting.variants import binary_form_uid
from pacsai.scu import Target, push
from pacsai.service import Node, configure_libraries

__all__ = [
    "MODALITIES",
    "DemoError",
    "DemoOptions",
    "DemoReport",
    "StudyProgress",
    "print_report",
    "run_demo",
]

log = logging.getLogger(__name__)

#: Phantom kind -> the DICOM Modality it is written with and a demo bundle is routed by.
MODALITIES: dict[str, str] = {"ct": "CT", "mr": "MR", "cr": "CR"}

PacsChoice = Literal["auto", "orthanc", "local"]


class DemoError(PacsaiError):
    """The demo cannot run as asked (no bundle for a modality, Orthanc missing...)."""


@dataclass(frozen=True)
class DemoOptions:
    """What ``pacsai demo`` was asked to do (its command-line options)."""

    modalities: tuple[str, ...] = ("ct", "mr", "cr")
    pacs: PacsChoice = "auto"
    models_dir: Path = Path("models")
    out: Path = Path("demo-out")
    workdir: Path | None = None
    seed: int = 0
    timeout: float = 600.0
    device: str = "auto"
    quiet_seconds: float = 2.0


@dataclass
class StudyProgress:
    """One phantom study on its way through the node and back into the PACS."""

    kind: str
    study: PhantomStudy
    seed: int = 0
    pushed_at: float | None = None
    back_at: float | None = None
    stage: str = "waiting to be pushed"
    models: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    expected: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> SEG | SR...
    back: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> Modality in PACS
    problem: str | None = None
    previews: list[Path] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """Back in the PACS, or given up on."""
        return self.back_at is not None or self.problem is not None

    @property
    def ok(self) -> bool:
        """Every object the node wrote for it is in the PACS."""
        return self.back_at is not None and self.problem is None

    @property
    def seconds(self) -> float | None:
        """From the push to the last object back in the PACS."""
        if self.pushed_at is None or self.back_at is None:
            return None
        return self.back_at - self.pushed_at

    @property
    def missing(self) -> str:
        """What did not come back, and why (for the report)."""
        if self.problem:
            return self.problem
        absent = sorted(kind for uid, kind in self.expected.items() if uid not in self.back)
        return f"not in the PACS: {', '.join(absent)}" if absent else ""


@dataclass
class DemoReport:
    """What the demo found."""

    pacs: str
    studies: list[StudyProgress]
    out: Path
    workdir: Path
    log_path: Path

    @property
    def ok(self) -> bool:
        """Whether every study came back with its objects."""
        return bool(self.studies) and all(progress.ok for progress in self.studies)

    def as_dict(self) -> dict[str, Any]:
        """What ``demo-report.json`` holds: the table, as data."""
        return {
            "ok": self.ok,
            "pacs": self.pacs,
            "studies": [
                {
                    "modality": MODALITIES[progress.kind],
                    "study_instance_uid": progress.study.study_instance_uid,
                    "models": progress.models,
                    "findings": progress.findings,
                    "back": sorted(set(progress.back.values())),
                    "seconds": None if progress.seconds is None else round(progress.seconds, 2),
                    "previews": [path.name for path in progress.previews],
                    "missing": progress.missing or None,
                }
                for progress in self.studies
            ],
        }


# --- the PACS stand-ins -------------------------------------------------------------------------


class _Pacs(Protocol):
    description: str

    def push(self, study: PhantomStudy, node: Target) -> None: ...

    def received(self, study_instance_uid: str) -> dict[str, str]: ...

    def fetch(self, study_instance_uid: str, sop_instance_uid: str) -> bytes: ...


class _OrthancPacs:
    """Orthanc: studies are uploaded over REST and pushed by Orthanc itself (C-STORE)."""

    def __init__(self, orthanc: Orthanc, modality: str) -> None:
        self.orthanc = orthanc
        self.modality = modality
        self.description = (
            f"Orthanc {orthanc.system().get('Version', '')} (AE {orthanc.ae_title}, DICOM port "
            f"{orthanc.dicom_port}, {orthanc.url})"
        )

    def push(self, study: PhantomStudy, node: Target) -> None:
        answers = self.orthanc.upload_all(study.paths)
        studies = sorted({str(answer["ParentStudy"]) for answer in answers})
        self.orthanc.store_to(self.modality, studies, synchronous=True)

    def received(self, study_instance_uid: str) -> dict[str, str]:
        return {
            str(instance["MainDicomTags"].get("SOPInstanceUID", "")): modality
            for modality, instances in self.orthanc.study_contents(study_instance_uid).items()
            for instance in instances
        }

    def fetch(self, study_instance_uid: str, sop_instance_uid: str) -> bytes:
        instance = self.orthanc.lookup_instance(sop_instance_uid)
        if instance is None:
            raise DemoError(f"Orthanc has no instance {sop_instance_uid}")
        return self.orthanc.instance_file(instance)


class _LocalPacs:
    """The local storage SCP: studies are pushed by pacsai's own SCU."""

    def __init__(self, pacs: LocalPacs) -> None:
        self.pacs = pacs
        self.description = (
            f"local storage SCP (AE {pacs.ae_title}, 127.0.0.1:{pacs.port}, {pacs.folder}); "
            "install Orthanc for a real PACS"
        )

    def push(self, study: PhantomStudy, node: Target) -> None:
        summary = push(study.paths, node, calling_ae_title=self.pacs.ae_title)
        if summary.failed:
            reasons = "; ".join(why for _, why in summary.failures[:3])
            raise DemoError(f"{summary.failed} of {len(study.paths)} images refused: {reasons}")

    def received(self, study_instance_uid: str) -> dict[str, str]:
        return {
            item.sop_instance_uid: item.modality for item in self.pacs.instances(study_instance_uid)
        }

    def fetch(self, study_instance_uid: str, sop_instance_uid: str) -> bytes:
        for item in self.pacs.instances(study_instance_uid):
            if item.sop_instance_uid == sop_instance_uid:
                return item.path.read_bytes()
        raise DemoError(f"the local PACS has no instance {sop_instance_uid}")


# --- set-up -------------------------------------------------------------------------------------


def _bundles(options: DemoOptions) -> dict[str, BundleInfo]:
    """The usable bundles, after checking that each asked modality has one."""
    unknown = [kind for kind in options.modalities if kind not in MODALITIES]
    if unknown or not options.modalities:
        raise ConfigError(
            f"unknown modalities {', '.join(unknown) or '(none given)'}: choose among "
            f"{', '.join(MODALITIES)}"
        )
    if not options.models_dir.is_dir():
        raise DemoError(
            f"models directory {options.models_dir} not found: run from the pacsai checkout "
            "(its models/ folder) or pass --models DIR"
        )
    registry = ModelRegistry(options.models_dir, device=options.device)
    bundles = {bundle.name: bundle for bundle in registry.bundles}
    refused = {e.name: e.problems for e in registry.entries.values() if e.bundle is None}
    for kind in options.modalities:
        modality = MODALITIES[kind]
        if not any(modality in bundle.modalities for bundle in bundles.values()):
            detail = "; ".join(f"{name}: {', '.join(why)}" for name, why in refused.items())
            raise DemoError(
                f"no usable model bundle for {modality} in {options.models_dir}"
                + (f" (refused: {detail})" if detail else "")
                + f"; leave {kind} out with --modalities"
            )
    return bundles


def _choose_pacs(choice: PacsChoice) -> Literal["orthanc", "local"]:
    if choice == "local":
        return "local"
    if Orthanc.is_installed():
        return "orthanc"
    if choice == "orthanc":
        raise DemoError("--pacs orthanc: Orthanc is not installed (apt-get install orthanc)")
    return "local"


def _settings(
    options: DemoOptions, workdir: Path, ae_title: str, port: int, backoff: float = 1.0
) -> Settings:
    node = workdir / "node"
    return Settings(
        node={
            "ae_title": "PACSAI",
            "host": "127.0.0.1",
            "port": 0,
            "study_quiet_seconds": options.quiet_seconds,
            "shutdown_grace_seconds": 5,
        },
        storage={
            "spool_dir": node / "spool",
            "results_dir": node / "results",
            "min_free_mb": 64,
        },
        database={"url": f"sqlite:///{node / 'pacsai.db'}"},
        queue={"backend": "local", "local_workers": 1, "poll_seconds": 0.5},
        inference={"models_dir": options.models_dir, "device": options.device},
        api={"enabled": False},  # the demo shows its own table; a busy 8080 must not stop it
        destinations={
            "pacs": {
                "ae_title": ae_title,
                "host": "127.0.0.1",
                "port": port,
                "backoff_seconds": backoff,
                "max_backoff_seconds": 10,
                "max_attempts": 5,
            }
        },
    )


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send the node's log records to ``path`` while the demo runs (the terminal shows
    progress instead)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_level = root.level
    saved_handlers = list(root.handlers)
    for existing in saved_handlers:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    network = logging.getLogger("pynetdicom")
    saved_network = network.level
    network.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        for existing in saved_handlers:
            root.addHandler(existing)
        root.setLevel(saved_level)
        network.setLevel(saved_network)


# --- following a study --------------------------------------------------------------------------


def findings_text(summary: dict[str, Any]) -> list[str]:
    """A result summary as people read it: labels found with their volume, or probabilities."""
    if "probabilities" in summary:
        return [f"{name} p={p:.2f}" for name, p in summary["probabilities"].items()]
    found = [
        f"{label['name']} {label['volume_ml']:.1f} ml"
        for label in summary.get("labels", [])
        if label.get("voxels")
    ]
    return found or ["no label found"]


def _follow(node: Node, pacs: _Pacs, progress: StudyProgress, now: float) -> None:
    """Update ``progress`` from the node's database and the PACS."""
    uid = progress.study.study_instance_uid
    with node.database.reading() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).first()
        if study is None:
            progress.stage = "pushed; waiting for pacsai"
            return
        count = study.instance_count
        received = f"received {count} image{'s' if count != 1 else ''}"
        job = session.scalars(
            select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())
        ).first()
        if job is None:
            progress.stage = f"{received}; waiting for the study to go quiet"
            return
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            progress.stage = f"{received}; job {job.status.value}"
            return
        if job.status is not JobStatus.SUCCEEDED or not job.results:
            progress.problem = f"job {job.status.value}: {job.reason or 'no result'}"
            return
        progress.models = [f"{r.model_name} {r.model_version}" for r in job.results]
        progress.findings = [
            text for r in job.results for text in findings_text(json.loads(r.summary))
        ]
        expected: dict[str, str] = {}
        states: list[str] = []
        for result in job.results:
            for delivery in result.deliveries:
                sent = set(delivery.kinds.split(","))
                # A PACS that does not take the Label Map SEG got the BINARY form of it and of
                # the SR referring to it (pacsai.reporting.variants).
                binary = delivery.seg_type == "BINARY" and any(
                    o.sop_class_uid == LABEL_MAP_SEGMENTATION_STORAGE for o in result.objects
                )
                expected.update(
                    (
                        binary_form_uid(o.sop_instance_uid)
                        if binary and o.kind in ("SEG", "SR")
                        else o.sop_instance_uid,
                        o.kind,
                    )
                    for o in result.objects
                    if o.kind in sent
                )
                state = delivery.status.value
                if delivery.status is DeliveryStatus.RETRYING and delivery.last_error:
                    state += f" ({delivery.last_error[:80]})"
                if delivery.status is DeliveryStatus.FAILED:
                    progress.problem = f"delivery FAILED: {delivery.last_error}"
                    return
                states.append(state)
        if not expected:
            progress.problem = "the job wrote no object to send (is a destination configured?)"
            return
        progress.expected = expected
    in_pacs = pacs.received(uid)
    progress.back = {sop: in_pacs[sop] for sop in expected if sop in in_pacs}
    kinds = ", ".join(sorted(set(expected.values())))
    if len(progress.back) == len(expected):
        progress.back_at = now
        progress.stage = f"back in the PACS: {kinds}"
    else:
        progress.stage = (
            f"results {kinds}; delivery {', '.join(states)}; "
            f"{len(progress.back)}/{len(expected)} in the PACS"
        )


def _status_table(studies: Sequence[StudyProgress], started: float, now: float) -> Table:
    count = f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}"
    table = Table(title=f"pacsai demo: following {count} ({now - started:.0f} s)")
    table.add_column("study")
    table.add_column("stage", overflow="fold")
    table.add_column("s", justify="right")
    for progress in studies:
        if progress.problem:
            stage = f"[red]{progress.problem}[/red]"
        elif progress.back_at is not None:
            stage = f"[green]{progress.stage}[/green]"
        else:
            stage = progress.stage
        end = progress.back_at or now
        seconds = f"{end - progress.pushed_at:.0f}" if progress.pushed_at is not None else ""
        table.add_row(_study_name(progress), stage, seconds)
    return table


def _study_name(progress: StudyProgress) -> str:
    return f"{MODALITIES[progress.kind]} phantom (seed {progress.seed})"


class _Display:
    """A live table on a terminal; one line per change of stage elsewhere (logs, CI)."""

    def __init__(self, console: Console, render: Callable[[], RenderableType]) -> None:
        self.console = console
        self.render = render
        self.live: Live | None = None
        self._seen: dict[int, str] = {}

    def __enter__(self) -> _Display:
        if self.console.is_terminal:
            self.live = Live(self.render(), console=self.console, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self.render())
            self.live.__exit__(None, None, None)

    def update(self, studies: Sequence[StudyProgress]) -> None:
        if self.live is not None:
            self.live.update(self.render())
            return
        for index, progress in enumerate(studies):
            line = progress.problem or progress.stage
            if self._seen.get(index) != line:
                self._seen[index] = line
                self.console.print(f"{_study_name(progress)}: {line}", highlight=False)


# --- previews -----------------------------------------------------------------------------------


def _previews(
    pacs: _Pacs, progress: StudyProgress, bundles: dict[str, BundleInfo], out: Path
) -> list[Path]:
    """PNG previews of every SEG of ``progress`` that came back, read from the PACS."""
    segmentations = [uid for uid, kind in progress.expected.items() if kind == "SEG"]
    if not segmentations or not progress.ok:
        return []
    sources: dict[str, Dataset] = {}
    for path in progress.study.paths:
        ds = dcmread(path)
        sources[str(ds.SOPInstanceUID)] = ds
    colors = {label.name: label.color for bundle in bundles.values() for label in bundle.labels}
    written: list[Path] = []
    model = progress.models[0].split()[0] if progress.models else "seg"
    for sop_uid in segmentations:
        segmentation = dcmread(io.BytesIO(pacs.fetch(progress.study.study_instance_uid, sop_uid)))
        written += write_segmentation_previews(
            segmentation, sources, out, prefix=f"{progress.kind}-{model}", colors=colors
        )
    return written


# --- the demo -----------------------------------------------------------------------------------


def run_demo(options: DemoOptions, console: Console) -> DemoReport:
    """Run the demo; every process and thread it started is stopped when it returns or raises
    (Ctrl-C included).

    Raises
    ------
    DemoError
        If a modality has no usable bundle, or ``--pacs orthanc`` is asked without Orthanc.
    ConfigError
        If an option is invalid.
    """
    bundles = _bundles(options)
    pacs_kind = _choose_pacs(options.pacs)
    temporary = options.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="pacsai-demo-")) if temporary else options.workdir
    assert workdir is not None
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "pacsai.log"
    options.out.mkdir(parents=True, exist_ok=True)
    report = DemoReport(pacs="", studies=[], out=options.out, workdir=workdir, log_path=log_path)
    with _log_to(log_path):
        configure_libraries()
        _run(options, console, bundles, pacs_kind, workdir, report)
    (options.out / "demo-report.json").write_text(
        json.dumps(report.as_dict(), indent=2), encoding="utf-8"
    )
    if temporary and report.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _run(
    options: DemoOptions,
    console: Console,
    bundles: dict[str, BundleInfo],
    pacs_kind: Literal["orthanc", "local"],
    workdir: Path,
    report: DemoReport,
) -> None:
    orthanc: Orthanc | None = None
    local: LocalPacs | None = None
    node: Node | None = None
    try:
        if pacs_kind == "orthanc":
            orthanc = Orthanc(workdir / "orthanc", dicomweb=False)
            destination = (orthanc.ae_title, orthanc.dicom_port)
        else:
            local = LocalPacs(workdir / "pacs").start()
            destination = (local.ae_title, local.port)
        console.print(f"starting pacsai (models from {options.models_dir}, work in {workdir})")
        node = Node(_settings(options, workdir, *destination))
        node.start()
        target = Target(node.settings.node.ae_title, "127.0.0.1", node.receiver.port)
        pacs: _Pacs
        if orthanc is not None:
            orthanc.modalities["PACSAI"] = (target.ae_title, target.host, target.port)
            orthanc.start()
            pacs = _OrthancPacs(orthanc, "PACSAI")
        else:
            assert local is not None
            pacs = _LocalPacs(local)
        report.pacs = pacs.description
        console.print(f"PACS: {pacs.description}")
        console.print(f"pacsai: AE {target.ae_title} on {target.host}:{target.port}")
        report.studies = [
            StudyProgress(
                kind,
                write_phantom(kind, workdir / "phantoms" / kind, seed=options.seed),
                seed=options.seed,
            )
            for kind in options.modalities
        ]
        _push_and_follow(options, console, node, pacs, report.studies)
        for progress in report.studies:
            try:
                progress.previews = _previews(pacs, progress, bundles, options.out)
            except (PacsaiError, OSError, ValueError, AttributeError, IndexError) as exc:
                log.warning("no preview of the %s study: %s", progress.kind, exc)
                console.print(f"[yellow]no preview of the {progress.kind} study: {exc}[/yellow]")
    finally:
        if node is not None:
            node.stop()
        if orthanc is not None:
            orthanc.stop()
        if local is not None:
            local.stop()


def _push_and_follow(
    options: DemoOptions,
    console: Console,
    node: Node,
    pacs: _Pacs,
    studies: list[StudyProgress],
) -> None:
    started = time.monotonic()
    with _Display(console, lambda: _status_table(studies, started, time.monotonic())) as display:
        for progress in studies:
            progress.stage = "pushing"
            progress.pushed_at = time.monotonic()
            display.update(studies)
            try:
                target = Target(node.settings.node.ae_title, "127.0.0.1", node.receiver.port)
                pacs.push(progress.study, target)
            except PacsaiError as exc:
                progress.problem = f"push failed: {exc}"
        deadline = time.monotonic() + options.timeout
        while True:
            now = time.monotonic()
            for progress in studies:
                if not progress.done:
                    _follow(node, pacs, progress, now)
            display.update(studies)
            if all(progress.done for progress in studies):
                return
            if now > deadline:
                for progress in studies:
                    if not progress.done:
                        progress.problem = (
                            f"timed out after {options.timeout:.0f} s at: {progress.stage}"
                        )
                display.update(studies)
                return
            time.sleep(0.5)


def print_report(report: DemoReport, console: Console) -> None:
    """The table of what came back, the previews written, and what is missing."""
    table = Table(title=f"pacsai demo: results back in {report.pacs.split(' (')[0]}")
    table.add_column("study")
    table.add_column("model")
    table.add_column("findings")
    table.add_column("back in PACS")
    table.add_column("seconds", justify="right")
    for progress in report.studies:
        back = ", ".join(sorted(set(progress.back.values()))) or "-"
        seconds = progress.seconds
        table.add_row(
            _study_name(progress),
            "\n".join(progress.models) or "-",
            "\n".join(progress.findings) or "-",
            back if progress.ok else f"[red]{back}[/red]",
            f"{seconds:.1f}" if seconds is not None else "-",
        )
    console.print(table)
    previews = [path for progress in report.studies for path in progress.previews]
    if previews:
        console.print(f"{len(previews)} PNG previews of the SEGs in {report.out.resolve()}:")
        for path in previews:
            console.print(f"  {path}", highlight=False)
    for progress in report.studies:
        if not progress.ok:
            console.print(f"[red]missing[/red] {_study_name(progress)}: {progress.missing}")
    if not report.ok:
        console.print(f"work directory kept for a look: {report.workdir} (log: {report.log_path})")
