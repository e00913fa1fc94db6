"""One job, start to end: route the study, build volumes, run models, store and audit the results.

Each step's failure is converted here into the job's state: a study no route fires on, or whose
series cannot become volumes without guessing, is SKIPPED with the reason; a model that fails
makes the job FAILED with the error. Either way the reason is stored on the job and audited
(DICOM Instances Accessed, 110103, with the model name and version).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from pacsai._atomic import write_atomically
from pacsai.config import Route, Settings
from pacsai.db import (
    DEFAULT_QUEUE,
    AuditAction,
    AuditEventId,
    AuditOutcome,
    Database,
    JobStatus,
    ResultKind,
    append_event,
    utcnow,
)
from pacsai.db.deliveries import add_objects, queue_deliveries, queue_job_messages
from pacsai.db.jobs import (
    JobContext,
    JobLease,
    add_result,
    claim_job,
    finish_job,
    hold_job,
    job_context,
    queue_job,
)
from pacsai.errors import (
    InferenceError,
    LeaseLostError,
    ModelError,
    ReportError,
    UnusableSeriesError,
)
from pacsai.inference.labels import label_voxel_counts
from pacsai.inference.registry import ModelRegistry
from pacsai.inference.routing import (
    PlannedRun,
    SeriesInfo,
    StudyInfo,
    plan_study,
    read_study,
    recorded_study,
    routes_for,
)
from pacsai.inference.volume import Volume, load_datasets, read_series
from pacsai.jobs.study_messages import StudyMessages, describe_targets, plan_study_messages
from pacsai.storage import FileStore, SharedDirectory

if TYPE_CHECKING:
    from pacsai.inference.model import LoadedModel, ModelOutput

__all__ = ["JobOutcome", "JobRunner", "summarise"]

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    """How a job ended."""

    status: JobStatus
    reason: str | None = None
    result_ids: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class JobRunner:
    """Runs claimed jobs for one worker; safe to call from several threads.

    Parameters
    ----------
    owner
        The worker's id, the owner of the leases it takes.
    serves
        Whether this worker takes jobs of a queue: a route pinned to a queue it does not serve
        becomes a job of its own on that queue.
    """

    def __init__(
        self,
        settings: Settings,
        database: Database,
        registry: ModelRegistry,
        *,
        owner: str = "local",
        serves: Callable[[str], bool] = lambda queue: True,
    ) -> None:
        self.settings = settings
        self.database = database
        self.registry = registry
        self.owner = owner
        self.serves = serves
        self.spool: FileStore = SharedDirectory(settings.storage.spool_dir)
        self.results: FileStore = SharedDirectory(settings.storage.results_dir)
        self.results_dir = settings.storage.results_dir
        self.on_delivery_queued: Callable[[], None] | None = None
        self.on_jobs_queued: Callable[[Sequence[int]], None] | None = None

    @property
    def routes(self) -> list[Route]:
        """The configured routes, or one per available bundle when none are configured."""
        return routes_for(self.settings, lambda: self.registry.bundles)

    def claim(
        self, *, queues: Sequence[str] | None = None, job_id: int | None = None
    ) -> JobLease | None:
        """Take a QUEUED job (the oldest of ``queues``, or ``job_id``) under this worker's lease
        and audit the attempt (110100); ``None`` if there is none to take."""
        with self.database.transaction() as session:
            lease = claim_job(
                session=session,
                now=utcnow(),
                owner=self.owner,
                lease_seconds=self.settings.queue.lease_seconds,
                queues=queues,
                job_id=job_id,
            )
            if lease is None:
                return None
            context = job_context(session=session, job_id=lease.job_id)
            append_event(
                session=session,
                event_id=AuditEventId.APPLICATION_ACTIVITY,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.SUCCESS,
                actor=self.settings.node.ae_title,
                study_instance_uid=context.study_instance_uid,
                patient_id=context.patient_id,
                detail={
                    "activity": "job attempt started",
                    "job_id": lease.job_id,
                    "attempt": lease.attempt,
                    "worker": self.owner,
                },
            )
        log.info(
            "job %d: attempt %d started on %s",
            lease.job_id,
            lease.attempt,
            self.owner,
            extra={"action": "job_started", "job_id": lease.job_id, "attempt": lease.attempt},
        )
        return lease

    def run(self, lease: JobLease) -> JobOutcome | None:
        """Run a claimed job and record its end; never raises for the study.

        Every write is fenced by ``lease``: if the worker lost it (it was taken for lost and
        the job may run elsewhere), nothing more is recorded and ``None`` is returned.
        """
        job_id = lease.job_id
        with self.database.reading() as session:
            context = job_context(session=session, job_id=job_id)
        outcome = JobOutcome(JobStatus.FAILED)
        try:
            outcome = self._run(context, lease)
        except LeaseLostError as exc:
            log.warning("%s; its results are dropped", exc)
            return None
        except InferenceError as exc:
            outcome.reason = str(exc)
        except Exception as exc:
            log.exception("job %d failed unexpectedly", job_id)
            outcome.reason = f"internal error: {type(exc).__name__}: {exc}"
        messages = self._study_messages(context, outcome)
        queued: list[int] = []
        try:
            with self.database.transaction() as session:
                finish_job(
                    session=session,
                    job_id=job_id,
                    status=outcome.status,
                    now=utcnow(),
                    reason=outcome.reason,
                    timings=outcome.timings,
                    lease=lease,
                )
                if messages is not None:
                    # In the transaction of the job's end: a finished job has its messages.
                    queued = queue_job_messages(
                        session=session,
                        job_id=job_id,
                        targets=messages.targets,
                        payload=messages.payload,
                        now=utcnow(),
                        resend=context.resend,
                    )
                if outcome.status != JobStatus.SUCCEEDED:
                    self._audit(session, context, outcome)
        except LeaseLostError as exc:
            log.warning("%s; its end is not recorded", exc)
            return None
        if queued:
            assert messages is not None
            log.info(
                "job %d: study result%s queued for %s",
                job_id,
                " (priority)" if messages.result.priority else "",
                describe_targets(messages.targets),
                extra={"action": "messages_queued", "job_id": job_id},
            )
            if self.on_delivery_queued is not None:
                self.on_delivery_queued()
        log.info(
            "job %d %s%s",
            job_id,
            outcome.status.value,
            f": {outcome.reason}" if outcome.reason else "",
            extra={"action": "job_finished", "job_id": job_id, "status": outcome.status.value},
        )
        return outcome

    def _study_messages(self, context: JobContext, outcome: JobOutcome) -> StudyMessages | None:
        """The study result this run sends to the RIS and as alerts, and to whom (``None``:
        nobody); a result that cannot be built is noted in the job's reason instead."""
        if outcome.status != JobStatus.SUCCEEDED or not outcome.result_ids:
            return None
        try:
            with self.database.reading() as session:
                return plan_study_messages(
                    session,
                    self.settings,
                    self.spool,
                    job_id=context.job_id,
                    result_ids=outcome.result_ids,
                    routes={route.name: route for route in self.routes},
                )
        except ValueError as exc:
            log.error("job %d: its study result cannot be sent: %s", context.job_id, exc)
            note = f"study result not sent to the RIS or as an alert: {_short(exc)}"
            outcome.reason = f"{outcome.reason}; {note}" if outcome.reason else note
            return None

    def _run(self, context: JobContext, lease: JobLease) -> JobOutcome:
        outcome = JobOutcome(JobStatus.SUCCEEDED)
        timings = outcome.timings
        with _timed(timings, "route"):
            study = self._study(context)
            routes = self.routes
            if context.routes is not None:
                routes = [route for route in routes if route.name in context.routes]
            plan = plan_study(study, routes)
        handed = self._hand_over(context, lease, plan.runs)
        runs = [run for run in plan.runs if not any(run is other for other, _, _ in handed)]
        if not plan.runs:
            outcome.status, outcome.reason = JobStatus.SKIPPED, plan.skip_reason
            return outcome
        unusable: list[str] = []
        errors: list[str] = []
        for index, run in enumerate(runs):
            try:
                outcome.result_ids.append(self._run_one(context, lease, index, run, timings))
            except UnusableSeriesError as exc:
                unusable.append(f"route {run.route.name!r}: {_short(exc)}")
            except (ModelError, ReportError) as exc:  # the other routes still run
                errors.append(f"route {run.route.name!r}: {_short(exc)}")
        notes = plan.reasons + unusable + errors
        if outcome.result_ids:
            outcome.reason = "; ".join(unusable + errors + handed_notes(handed)) or None
        elif errors:
            outcome.status, outcome.reason = JobStatus.FAILED, "; ".join(errors + unusable)
        elif handed and not runs:
            outcome.reason = "; ".join(handed_notes(handed))
        else:
            outcome.status, outcome.reason = JobStatus.SKIPPED, "; ".join(notes)
        return outcome

    def _study(self, context: JobContext) -> StudyInfo:
        """The job's study as routing sees it: from what the receiver recorded, or from the
        headers of its files when its rows predate that."""
        if context.series is None:
            paths = [self.spool.local_path(p.as_posix()) for p in context.paths]
            try:
                return read_study(context.study_instance_uid, paths, context.calling_ae_title)
            except FileNotFoundError as exc:
                raise InferenceError(f"{exc}: were the spool files removed?") from exc
        series = [
            SeriesInfo(
                one.series_instance_uid,
                one.attributes,
                [self.spool.local_path(p.as_posix()) for p in one.paths],
                one.images,
            )
            for one in context.series
        ]
        if not context.paths:
            raise InferenceError(
                f"study {context.study_instance_uid} holds no instance any more: was it purged?"
            )
        if not series:
            raise InferenceError(
                f"study {context.study_instance_uid} has no image: none of its "
                f"{len(context.paths)} instances has Rows and Columns"
            )
        return recorded_study(context.study_instance_uid, series, context.calling_ae_title)

    def _hand_over(
        self, context: JobContext, lease: JobLease, runs: list[PlannedRun]
    ) -> list[tuple[PlannedRun, str, int]]:
        """Queue the runs whose route is pinned to a queue this worker does not serve as jobs
        of their own on that queue; (run, queue, job id) for each."""
        elsewhere: dict[str, list[PlannedRun]] = {}
        for run in runs:
            queue = run.route.queue or DEFAULT_QUEUE
            if queue != context.queue and not self.serves(queue):
                elsewhere.setdefault(queue, []).append(run)
        if not elsewhere:
            return []
        handed: list[tuple[PlannedRun, str, int]] = []
        with self.database.transaction() as session:
            hold_job(session=session, lease=lease)
            for queue, pinned in elsewhere.items():
                names = sorted({run.route.name for run in pinned})
                job = queue_job(
                    session=session,
                    study_id=context.study_id,
                    instance_count=len(context.paths),
                    now=utcnow(),
                    queue=queue,
                    routes=names,
                    resend=context.resend,
                    uid_salt=context.uid_salt or None,
                )
                handed.extend((run, queue, job.id) for run in pinned)
        new_jobs = sorted({job_id for _, _, job_id in handed})
        log.info(
            "job %d: routes pinned to other queues handed over as jobs %s",
            context.job_id,
            ", ".join(map(str, new_jobs)),
            extra={"action": "job_handed_over", "job_id": context.job_id},
        )
        if self.on_jobs_queued is not None:
            self.on_jobs_queued(new_jobs)
        return handed

    def _run_one(
        self,
        context: JobContext,
        lease: JobLease,
        index: int,
        run: PlannedRun,
        timings: dict[str, float],
    ) -> int:
        with _timed(timings, "load_model"):
            model = self.registry.load(run.route.model)
        max_voxels = self.settings.inference.max_voxels
        with _timed(timings, "volume"):
            series = [run.series] if not run.channels else _by_input(run, model.bundle)
            volumes = []
            for position, one in enumerate(series):
                datasets = read_series(one.paths)
                volumes.append(
                    load_datasets(datasets, max_voxels=max_voxels, allocate=model.allocate_volume)
                )
                if position == 0:
                    sources = datasets
            for ds in sources:  # the DICOM outputs need the headers, not the pixels
                if "PixelData" in ds:
                    del ds.PixelData
            volume = volumes[0]
        output = model.predict(volumes)
        for stage, seconds in output.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        bundle = model.bundle
        with _timed(timings, "store"):
            relative = Path(f"job-{context.job_id}") / f"{index:02d}-{run.route.name}.npz"
            summary = summarise(output.label_map, output.probabilities, volume, bundle.labels)
            _save_output(
                self.results.local_path(relative.as_posix()),
                volume,
                output.label_map,
                output.probabilities,
            )
            self.results.stored(relative.as_posix())
            with self.database.transaction() as session:
                hold_job(session=session, lease=lease)
                result = add_result(
                    session=session,
                    job_id=context.job_id,
                    route_name=run.route.name,
                    series_instance_uid=volume.series_instance_uid,
                    kind=(
                        ResultKind.SEGMENTATION
                        if output.label_map is not None
                        else ResultKind.CLASSIFICATION
                    ),
                    model_name=bundle.name,
                    model_version=bundle.version,
                    weights_sha256=bundle.weights_sha256,
                    output_path=relative.as_posix(),
                    summary=summary,
                    now=utcnow(),
                )
                append_event(
                    session=session,
                    event_id=AuditEventId.INSTANCES_ACCESSED,
                    action=AuditAction.READ,
                    outcome=AuditOutcome.SUCCESS,
                    actor=self.settings.node.ae_title,
                    study_instance_uid=context.study_instance_uid,
                    patient_id=context.patient_id,
                    model_name=bundle.name,
                    model_version=bundle.display_version,
                    detail={
                        "job_id": context.job_id,
                        "result_id": result.id,
                        "route": run.route.name,
                        "series_instance_uid": volume.series_instance_uid,
                        "weights_sha256": bundle.weights_sha256,
                        "device": str(model.device),
                    },
                )
                result_id = result.id
        if run.route.outputs:
            with _timed(timings, "report"):
                self._report(
                    context, lease, run, result_id, relative.parent, sources, volume, model, output
                )
        return result_id

    def _report(
        self,
        context: JobContext,
        lease: JobLease,
        run: PlannedRun,
        result_id: int,
        folder: Path,
        sources: list[Dataset],
        volume: Volume,
        model: LoadedModel,
        output: ModelOutput,
    ) -> None:
        """Write the route's DICOM outputs and queue one delivery per destination."""
        from pacsai.reporting.outputs import write_result_objects

        route = run.route
        destinations = self.settings.dicom_destinations
        dicom = [name for name in route.send_to if name in destinations]  # the others: messages
        outputs = list(route.outputs)
        if any(destinations[name].overlay for name in dicom) and "overlay" not in outputs:
            outputs.append("overlay")
        objects = write_result_objects(
            results_dir=self.results_dir,
            folder=folder / f"result-{result_id}",
            sources=sources,
            volume=volume,
            bundle=model.bundle,
            route_name=route.name,
            label_map=output.label_map,
            probabilities=output.probabilities,
            outputs=outputs,
            seg_type=route.seg_type,
            device_serial_number=self.settings.node.ae_title,
            salt=context.uid_salt,
        )
        targets = []
        for name in dicom:
            kinds = ["SEG", "SR"]
            if "overlay" in route.outputs or destinations[name].overlay:
                kinds.append("OVERLAY")
            targets.append((name, kinds))
        with self.database.transaction() as session:
            hold_job(session=session, lease=lease)
            add_objects(
                session=session,
                result_id=result_id,
                objects=[
                    (
                        o.kind,
                        o.sop_class_uid,
                        o.sop_instance_uid,
                        o.series_instance_uid,
                        o.path.as_posix(),
                    )
                    for o in objects
                ],
                now=utcnow(),
            )
            queued = queue_deliveries(
                session=session,
                result_id=result_id,
                targets=targets,
                now=utcnow(),
                resend=context.resend,
            )
            for obj in objects:
                append_event(
                    session=session,
                    event_id=AuditEventId.INSTANCES_ACCESSED,
                    action=AuditAction.CREATE,
                    outcome=AuditOutcome.SUCCESS,
                    actor=self.settings.node.ae_title,
                    study_instance_uid=context.study_instance_uid,
                    patient_id=context.patient_id,
                    model_name=model.bundle.name,
                    model_version=model.bundle.display_version,
                    detail={
                        "job_id": context.job_id,
                        "result_id": result_id,
                        "object": obj.kind,
                        "sop_class_uid": obj.sop_class_uid,
                        "sop_instance_uid": obj.sop_instance_uid,
                    },
                )
        if queued and self.on_delivery_queued is not None:
            self.on_delivery_queued()

    def _audit(self, session: Any, context: JobContext, outcome: JobOutcome) -> None:
        append_event(
            session=session,
            event_id=AuditEventId.INSTANCES_ACCESSED,
            action=AuditAction.READ,
            outcome=(
                AuditOutcome.MINOR_FAILURE
                if outcome.status == JobStatus.SKIPPED
                else AuditOutcome.SERIOUS_FAILURE
            ),
            actor=self.settings.node.ae_title,
            study_instance_uid=context.study_instance_uid,
            patient_id=context.patient_id,
            detail={
                "job_id": context.job_id,
                "status": outcome.status.value,
                "reason": outcome.reason,
            },
        )


def _by_input(run: PlannedRun, bundle: Any) -> list[Any]:
    """The route's channel series in the order of the model's inputs (names matched loosely)."""
    from pacsai.inference.labels import normalise_name

    given = {normalise_name(name): series for name, series in run.channels}
    wanted = [normalise_name(slot.name) for slot in bundle.inputs]
    if sorted(given) != sorted(wanted):
        raise ModelError(
            f"route {run.route.name!r} names channels {', '.join(n for n, _ in run.channels)}; "
            f"model {bundle.name!r} reads {', '.join(s.name for s in bundle.inputs)}: name one "
            "series rule per model input"
        )
    first = normalise_name(run.channels[0][0])
    ordered = [given[name] for name in wanted]
    # The route's first channel is the grid the others are resampled onto.
    return [given[first]] + [s for name, s in zip(wanted, ordered, strict=True) if name != first]


def handed_notes(handed: list[tuple[PlannedRun, str, int]]) -> list[str]:
    """One note per route handed to another queue."""
    return [
        f"route {run.route.name!r} runs on queue {queue!r} as job {job_id}"
        for run, queue, job_id in handed
    ]


def _short(error: Exception, limit: int = 800) -> str:
    """An error message short enough for a job's reason (a PyTorch error can run to pages)."""
    text = str(error)
    return text if len(text) <= limit else text[: limit - 20] + " ... (truncated)"


def summarise(
    label_map: np.ndarray | None,
    probabilities: dict[str, float] | None,
    volume: Volume,
    labels: Any,
) -> dict[str, Any]:
    """What a result found: per label its voxel count and volume in ml, or the probabilities."""
    if probabilities is not None:
        return {"probabilities": {k: round(v, 6) for k, v in probabilities.items()}}
    assert label_map is not None
    voxel_ml = float(abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
    counts = label_voxel_counts(label_map, labels)
    found = []
    for label in labels:
        voxels = counts[label.value]
        found.append(
            {
                "value": label.value,
                "name": label.name,
                "voxels": voxels,
                "volume_ml": round(voxels * voxel_ml, 3),
            }
        )
    return {"labels": found}


def _save_output(
    path: Path,
    volume: Volume,
    label_map: np.ndarray | None,
    probabilities: dict[str, float] | None,
) -> None:
    """Write the output atomically: temp file, fsync, rename."""
    arrays: dict[str, Any] = {
        "affine": volume.affine,
        "sop_instance_uids": np.asarray([uid for uid, _ in volume.sources]),
        "frame_numbers": np.asarray([frame or 0 for _, frame in volume.sources]),
        "series_instance_uid": np.asarray(volume.series_instance_uid),
    }
    if label_map is not None:
        arrays["label_map"] = label_map
    if probabilities is not None:
        arrays["probabilities"] = np.asarray(json.dumps(probabilities))
    write_atomically(path, lambda handle: np.savez_compressed(handle, **arrays))


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
