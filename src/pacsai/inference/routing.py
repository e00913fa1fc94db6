"""Which model runs on which series of a study: the ``routes:`` rules of the configuration.

A study is described by the headers of its images, grouped into series: as the receiver
recorded them (:func:`recorded_study`), or read again from the files (:func:`read_study`).
Every route whose ``when:`` holds for the study fires; its ``series:`` rule then picks the
series to run on. A route that fires but finds no usable series, and a study no route fires on,
are reported with a reason a person can act on; the job stores it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from pacsai._routing_attributes import RoutingAttributes, image_frames
from pacsai.config import Route, SeriesRule, Settings, StudyRule
from pacsai.inference.bundle import BundleInfo

__all__ = [
    "Plan",
    "PlannedRun",
    "SeriesInfo",
    "StudyInfo",
    "default_routes",
    "plan_study",
    "read_study",
    "recorded_study",
    "routes_for",
    "scan_folder",
]

log = logging.getLogger(__name__)


@dataclass
class SeriesInfo:
    """One series of a study: what the rules read from its first image, its image instances
    (their files, in the order received) and its number of images (frames)."""

    series_instance_uid: str
    attributes: RoutingAttributes
    paths: list[Path] = field(default_factory=list)
    images: int = 0

    @property
    def modality(self) -> str:
        return self.attributes.modality

    @property
    def description(self) -> str:
        return self.attributes.series_description

    @property
    def image_type(self) -> list[str]:
        return list(self.attributes.image_type)

    @property
    def slice_thickness(self) -> float | None:
        return self.attributes.slice_thickness

    @property
    def orientation(self) -> str | None:
        """``axial``, ``sagittal`` or ``coronal``: the patient axis closest to the normal."""
        return self.attributes.orientation

    def describe(self) -> str:
        return (
            f"series {self.series_instance_uid} ({self.modality or '?'}, "
            f"{self.description or 'no description'!r}, {self.images} images)"
        )


@dataclass
class StudyInfo:
    """A study as the routing rules see it: its study-level attributes are its first image's."""

    study_instance_uid: str
    attributes: RoutingAttributes
    calling_ae_title: str = ""
    series: list[SeriesInfo] = field(default_factory=list)

    @property
    def modalities(self) -> set[str]:
        return {s.modality for s in self.series if s.modality}


@dataclass(frozen=True)
class PlannedRun:
    """One route firing on one series (or, with ``channels:``, on one series per input).

    Attributes
    ----------
    series:
        The series the results refer to: the only one, or the first channel's.
    channels:
        With the route's ``channels:``: (channel name, series) in the route's order.
    """

    route: Route
    series: SeriesInfo
    channels: tuple[tuple[str, SeriesInfo], ...] = ()


@dataclass
class Plan:
    """What routing decided for a study: runs, and a reason for every route that did not run."""

    runs: list[PlannedRun] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def skip_reason(self) -> str:
        """Why nothing runs (meaningful when :attr:`runs` is empty)."""
        return "; ".join(self.reasons) or "no route is configured"


def routes_for(settings: Settings, bundles: Callable[[], Iterable[BundleInfo]]) -> list[Route]:
    """The configured routes, or without ``routes:`` the default ones of the available
    ``bundles`` (called only then)."""
    if settings.routes is not None:
        return list(settings.routes)
    # Results go to every destination that takes them; alerts need a route's priority rule.
    takers = [
        name
        for name, destination in settings.destinations.items()
        if destination.kind in ("dicom", "hl7", "fhir")
    ]
    return default_routes(bundles(), takers)


def default_routes(bundles: Iterable[BundleInfo], destinations: Sequence[str]) -> list[Route]:
    """The routes used when the configuration has no ``routes:``: one per bundle, by modality.

    3D models take the largest series of their modality with at least 10 images; 2D
    classification models take single images of theirs, 2D segmentation models any series (3D
    ones slice by slice). A model that reads several series gets no default route: its route
    must name them (``channels:``). Results go to every configured destination.
    """
    routes = []
    for bundle in bundles:
        if len(bundle.inputs) > 1:
            log.info(
                "model %s reads %d series (%s): it runs only on a configured route that names "
                "them (channels:)",
                bundle.name,
                len(bundle.inputs),
                ", ".join(slot.name for slot in bundle.inputs),
            )
            continue
        modalities = list(bundle.modalities)
        series: dict[str, Any] = {"Modality": modalities}
        if bundle.spatial_dims == 3:
            series["min_instances"] = 10
        elif bundle.task == "classification":
            series["max_instances"] = 1
        # a 2D segmentation model takes any series: 3D ones slice by slice
        routes.append(
            Route(
                name=bundle.name,
                when=StudyRule(Modality=modalities),
                series=SeriesRule(**series),
                model=bundle.name,
                send_to=list(destinations),
            )
        )
    return routes


def plan_study(study: StudyInfo, routes: Sequence[Route]) -> Plan:
    """Apply every route to ``study``."""
    plan = Plan()
    if not routes:
        plan.reasons.append("no route is configured and no model bundle is available")
    for route in routes:
        why_not = _study_mismatch(route.when, study)
        if why_not:
            plan.reasons.append(f"route {route.name!r}: {why_not}")
            continue
        if route.channels:
            picked: list[tuple[str, SeriesInfo]] = []
            for channel, rule in route.channels.items():
                found, rejected = _select_series(
                    rule.model_copy(update={"select": "largest"}), study.series
                )
                if not found:
                    detail = "; ".join(rejected) if rejected else "the study has no series"
                    plan.reasons.append(
                        f"route {route.name!r}: no series for channel {channel!r} ({detail})"
                    )
                    break
                picked.append((channel, found[0]))
            else:
                plan.runs.append(PlannedRun(route, picked[0][1], tuple(picked)))
            continue
        chosen, rejected = _select_series(route.series, study.series)
        if not chosen:
            detail = "; ".join(rejected) if rejected else "the study has no series"
            plan.reasons.append(f"route {route.name!r}: no usable series ({detail})")
            continue
        plan.runs.extend(PlannedRun(route, s) for s in chosen)
    return plan


def _one_or_more(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _study_mismatch(rule: StudyRule, study: StudyInfo) -> str | None:
    if rule.Modality is not None:
        wanted = {m.upper() for m in _one_or_more(rule.Modality)}
        if not wanted & {m.upper() for m in study.modalities}:
            found = ", ".join(sorted(study.modalities)) or "none"
            return f"study modalities {found} are not {', '.join(sorted(wanted))}"
    if rule.BodyPartExamined is not None:
        wanted = {b.upper() for b in _one_or_more(rule.BodyPartExamined)}
        parts = {s.attributes.body_part_examined.upper() for s in study.series}
        if not wanted & parts:
            return f"BodyPartExamined is not {', '.join(sorted(wanted))}"
    for keyword, value in (
        ("StudyDescription", study.attributes.study_description),
        ("InstitutionName", study.attributes.institution_name),
        ("ReferringPhysicianName", study.attributes.referring_physician_name),
    ):
        pattern = getattr(rule, keyword)
        if pattern is not None and not re.search(pattern, value, re.IGNORECASE):
            return f"{keyword} does not match {pattern!r}"
    if rule.CallingAETitle is not None:
        wanted = set(_one_or_more(rule.CallingAETitle))
        if study.calling_ae_title not in wanted:
            return f"sent by {study.calling_ae_title!r}, not {', '.join(sorted(wanted))}"
    return None


def _series_mismatch(rule: SeriesRule, series: SeriesInfo) -> str | None:
    if rule.Modality is not None:
        wanted = {m.upper() for m in _one_or_more(rule.Modality)}
        if series.modality.upper() not in wanted:
            return f"modality {series.modality or 'none'}"
    if rule.SeriesDescription is not None and not re.search(
        rule.SeriesDescription, series.description, re.IGNORECASE
    ):
        return f"description {series.description!r}"
    if rule.ImageType is not None:
        required = [v.upper() for v in _one_or_more(rule.ImageType)]
        if not all(v in series.image_type for v in required):
            found = "\\".join(series.image_type) or "none"
            return f"ImageType {found}"
    if rule.SliceThickness is not None:
        low, high = rule.SliceThickness
        thickness = series.slice_thickness
        if thickness is None or not low <= thickness <= high:
            return f"SliceThickness {thickness}"
    if series.images < rule.min_instances:
        return f"{series.images} images < min_instances {rule.min_instances}"
    if rule.max_instances is not None and series.images > rule.max_instances:
        return f"{series.images} images > max_instances {rule.max_instances}"
    if rule.orientation is not None and series.orientation not in rule.orientation:
        return f"orientation {series.orientation or 'unknown'}"
    return None


def _select_series(
    rule: SeriesRule, candidates: Sequence[SeriesInfo]
) -> tuple[list[SeriesInfo], list[str]]:
    chosen, rejected = [], []
    for series in candidates:
        why_not = _series_mismatch(rule, series)
        if why_not:
            rejected.append(f"{series.series_instance_uid}: {why_not}")
        else:
            chosen.append(series)
    if rule.select == "largest" and chosen:
        chosen = [max(chosen, key=lambda s: s.images)]
    return chosen, rejected


def read_study(study_instance_uid: str, paths: Iterable[Path], calling_ae_title: str) -> StudyInfo:
    """Describe a study from its stored instance files (headers only).

    A job routes from what the receiver recorded (:func:`recorded_study`) and reads the files
    only for studies recorded before it did so.
    """
    studies = _group(paths)
    study = studies.get(study_instance_uid)
    if study is None:
        raise FileNotFoundError(f"no readable instance of study {study_instance_uid}")
    study.calling_ae_title = calling_ae_title
    return study


def recorded_study(
    study_instance_uid: str, series: Sequence[SeriesInfo], calling_ae_title: str
) -> StudyInfo:
    """Describe a study from its image series as the receiver recorded them, in the order of
    their first image: the study-level attributes are the first series' (its first image's),
    as :func:`read_study` takes them from the first image file.

    Raises
    ------
    ValueError
        If ``series`` is empty: a study with no image has nothing to route.
    """
    if not series:
        raise ValueError(f"study {study_instance_uid} has no image series")
    return StudyInfo(study_instance_uid, series[0].attributes, calling_ae_title, list(series))


def scan_folder(folder: Path) -> list[StudyInfo]:
    """Every study whose instances are under ``folder`` (recursively); non-DICOM files skipped."""
    return list(_group(p for p in sorted(folder.rglob("*")) if p.is_file()).values())


def _group(paths: Iterable[Path]) -> dict[str, StudyInfo]:
    studies: dict[str, StudyInfo] = {}
    for path in paths:
        try:
            header = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            log.debug("skipping %s: %s", path, exc)
            continue
        study_uid = str(header.get("StudyInstanceUID", "") or "")
        series_uid = str(header.get("SeriesInstanceUID", "") or "")
        frames = image_frames(header)
        if not study_uid or not series_uid or not frames:
            continue
        study = studies.get(study_uid)
        series = None
        if study is not None:
            series = next((s for s in study.series if s.series_instance_uid == series_uid), None)
        if series is None:
            series = SeriesInfo(series_uid, RoutingAttributes.of(header))
            if study is None:
                study = studies[study_uid] = StudyInfo(study_uid, series.attributes)
            study.series.append(series)
        series.paths.append(path)
        series.images += frames
    return studies
