"""The models a node has and how its routes would treat a stored study.

:func:`model_statuses` is the one place the console, the API and commands read a model's state
from: ``ready`` or ``refused`` (with why) from the bundle check. A model kept loaded by a worker
is ``warm``; that comes from the workers' heartbeats, which extend this function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sqlalchemy import select

from pacsai.config import Settings
from pacsai.db import Database, Study
from pacsai.db.jobs import study_instances
from pacsai.errors import PacsaiError
from pacsai.inference.labels import Code
from pacsai.operations._audit import record_read
from pacsai.operations.caller import Caller
from pacsai.operations.errors import ConflictError, NotFoundError

if TYPE_CHECKING:
    from pacsai.inference import ModelRegistry

__all__ = [
    "LabelInfo",
    "ModelState",
    "ModelStatus",
    "PlannedSeries",
    "RoutingPlan",
    "model_statuses",
    "plan_stored_study",
    "registry_of",
]

ModelState = Literal["ready", "refused", "warm"]


@dataclass(frozen=True)
class LabelInfo:
    """One output channel of a model with its coded meaning (CID 7150/7151) and colour."""

    value: int
    name: str
    category: Code
    type: Code
    color: tuple[int, int, int]


@dataclass(frozen=True)
class ModelStatus:
    """One bundle directory: what it is and whether it can run."""

    name: str
    state: ModelState
    version: str | None = None
    weights_sha256: str | None = None
    modalities: tuple[str, ...] = ()
    task: str | None = None
    spatial_dims: int | None = None
    labels: tuple[LabelInfo, ...] = ()
    device: str | None = None
    problems: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()


def registry_of(settings: Settings, registry: ModelRegistry | None) -> ModelRegistry:
    """``registry``, or one scanned from ``inference.models_dir`` (metadata only, no torch)."""
    if registry is not None:
        return registry
    from pacsai.inference import ModelRegistry

    return ModelRegistry.from_settings(settings.inference)


def _device(settings: Settings, registry: ModelRegistry) -> str:
    if settings.inference.device == "cpu":
        return "cpu"  # no need to import PyTorch to know
    try:
        return registry.device_name()
    except PacsaiError as exc:
        return f"unavailable: {exc}"


def model_statuses(settings: Settings, registry: ModelRegistry | None) -> list[ModelStatus]:
    """Every bundle under ``inference.models_dir`` with its version, weights checksum, device,
    labels and codes, the routes that use it, and ``ready`` or ``refused`` with the reasons."""
    from pacsai.inference.routing import routes_for

    registry = registry_of(settings, registry)
    entries = registry.entries
    routes = routes_for(settings, lambda: registry.bundles)
    device = _device(settings, registry) if any(e.bundle for e in entries.values()) else None
    statuses = []
    for entry in entries.values():
        used_by = tuple(route.name for route in routes if route.model == entry.name)
        bundle = entry.bundle
        if bundle is None:
            statuses.append(
                ModelStatus(
                    name=entry.name, state="refused", problems=entry.problems, routes=used_by
                )
            )
            continue
        statuses.append(
            ModelStatus(
                name=bundle.name,
                state="ready",
                version=bundle.version,
                weights_sha256=bundle.weights_sha256,
                modalities=bundle.modalities,
                task=bundle.task,
                spatial_dims=bundle.spatial_dims,
                labels=tuple(
                    LabelInfo(label.value, label.name, label.category, label.type, label.color)
                    for label in bundle.labels
                ),
                device=device,
                routes=used_by,
            )
        )
    return statuses


@dataclass(frozen=True)
class PlannedSeries:
    """One route that would fire on one series of the study."""

    route: str
    model: str
    series_instance_uid: str
    series: str  # modality, description and image count, for people


@dataclass(frozen=True)
class RoutingPlan:
    """What the routes would do with a stored study (no model runs)."""

    study_instance_uid: str
    runs: tuple[PlannedSeries, ...]
    reasons: tuple[str, ...]  # why each route that does not fire does not

    @property
    def skip_reason(self) -> str | None:
        """Why the job would be SKIPPED, or ``None`` when something runs."""
        return None if self.runs else ("; ".join(self.reasons) or "no route is configured")


def plan_stored_study(
    database: Database,
    caller: Caller,
    settings: Settings,
    registry: ModelRegistry | None,
    study_instance_uid: str,
) -> RoutingPlan:
    """Route a study stored on this node as a job would: from what the receiver recorded, or
    from the headers of its spool files (``pacsai routes test``) when its rows predate that;
    audited (110112) as a read of the study.

    Raises
    ------
    NotFoundError
        If no such study is stored here.
    ConflictError
        If it has no image, or none of its instance files can be read any more.
    """
    from pacsai.inference.routing import (
        SeriesInfo,
        plan_study,
        read_study,
        recorded_study,
        routes_for,
    )

    with database.reading() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
        if study is None:
            raise NotFoundError(f"no study {study_instance_uid} on this node")
        instances = study_instances(session=session, study_id=study.id)
        calling, patient_id = study.calling_ae_title, study.patient_id
    root = Path(settings.storage.spool_dir)
    if instances.series:
        series = [
            SeriesInfo(s.series_instance_uid, s.attributes, [root / p for p in s.paths], s.images)
            for s in instances.series
        ]
        info = recorded_study(study_instance_uid, series, calling)
    elif instances.series is not None:
        what = "no image instance to route" if instances.paths else "no instance any more"
        raise ConflictError(f"study {study_instance_uid} has {what}")
    else:
        try:
            paths = [root / path for path in instances.paths]
            info = read_study(study_instance_uid, paths, calling)
        except FileNotFoundError as exc:
            raise ConflictError(
                f"no instance file of study {study_instance_uid} can be read in {root}"
            ) from exc
    registry = registry_of(settings, registry)
    plan = plan_study(info, routes_for(settings, lambda: registry.bundles))
    record_read(
        database,
        caller,
        study_instance_uid=study_instance_uid,
        patient_id=patient_id,
        action="routing dry run",
    )
    return RoutingPlan(
        study_instance_uid=study_instance_uid,
        runs=tuple(
            PlannedSeries(
                route=run.route.name,
                model=run.route.model,
                series_instance_uid=run.series.series_instance_uid,
                series=(
                    f"{run.series.modality or '?'}, "
                    f"{run.series.description or 'no description'!r}, {run.series.images} images"
                ),
            )
            for run in plan.runs
        ),
        reasons=tuple(plan.reasons),
    )
