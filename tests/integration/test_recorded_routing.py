"""Routing from what the receiver recorded: the same plan as from the files, on real data.

A study received through a real association is routed twice: from its rows (what the job does)
and from the headers of its spool files (what it did before, and still does for rows recorded
before migration 0012). Both must give the same study, series, image paths and plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select, update

from pacsai._routing_attributes import RoutingAttributes
from pacsai.config import Route
from pacsai.db import Database, Instance, JobStatus, Study, StudyStatus, upgrade, utcnow
from pacsai.db.jobs import RecordedSeries, queue_job, study_instances
from pacsai.db.repository import ReceivedInstance, StoreOutcome, record_instance
from pacsai.db.retention import PurgeRule, purge_study
from pacsai.inference.registry import ModelRegistry
from pacsai.inference.routing import (
    SeriesInfo,
    StudyInfo,
    plan_study,
    read_study,
    recorded_study,
)
from pacsai.jobs.runner import JobOutcome, JobRunner
from pacsai.operations.caller import Caller
from pacsai.operations.models import plan_stored_study
from pacsai.scu import Target, push
from pacsai.service import Node
from tests.support import make_ct_slice, make_settings

# Rules on every attribute routing reads, so that any difference between the two
# descriptions of a study shows in its plan.
ROUTES = [
    Route.model_validate({"model": "m", **route})
    for route in [
        {"name": "ct", "when": {"Modality": "CT"}, "series": {"min_instances": 3}},
        {
            "name": "ct-original",
            "when": {"Modality": "CT"},
            "series": {"Modality": "CT", "ImageType": "ORIGINAL", "select": "all"},
        },
        {"name": "thin", "series": {"SliceThickness": [0.5, 3.0], "select": "all"}},
        {"name": "thick", "series": {"SliceThickness": [3.0, 10.0]}},
        {"name": "axial", "series": {"orientation": ["axial"], "select": "all"}},
        {"name": "not-axial", "series": {"orientation": ["sagittal", "coronal"]}},
        {"name": "derived", "series": {"ImageType": ["DERIVED"], "select": "all"}},
        {"name": "described", "series": {"SeriesDescription": "t1|ax|sag|head|chest|abd"}},
        {"name": "mr", "when": {"Modality": ["MR"]}, "series": {"Modality": "MR"}},
        {"name": "xray", "when": {"Modality": ["DX", "CR", "OT"]}, "series": {"max_instances": 1}},
        {"name": "head", "when": {"BodyPartExamined": ["HEAD", "BRAIN", "CHEST", "ABDOMEN"]}},
        {"name": "study-described", "when": {"StudyDescription": "[a-z]"}},
        {"name": "institution", "when": {"InstitutionName": "[a-z]"}},
        {"name": "referred", "when": {"ReferringPhysicianName": "[a-z]"}},
        {"name": "pushed", "when": {"calling_ae_title": "PUSHER"}, "series": {"select": "all"}},
        {"name": "large", "series": {"min_instances": 20}},
        {
            "name": "two-series",
            "channels": {"first": {"min_instances": 2}, "second": {"max_instances": 1}},
        },
    ]
]


def _target(node: Node) -> Target:
    return Target(node.settings.node.ae_title, "127.0.0.1", node.receiver.port)


def _as_info(node: Node, series: tuple[RecordedSeries, ...]) -> list[SeriesInfo]:
    return [
        SeriesInfo(
            s.series_instance_uid, s.attributes, [node.spool.absolute(p) for p in s.paths], s.images
        )
        for s in series
    ]


def _both_ways(node: Node, study_instance_uid: str) -> tuple[StudyInfo | None, StudyInfo]:
    """The study from its rows (``None`` when they do not describe it) and from its files."""
    with node.database.reading() as session:
        study = session.execute(
            select(Study).where(Study.study_instance_uid == study_instance_uid)
        ).scalar_one()
        instances = study_instances(session=session, study_id=study.id)
        calling = study.calling_ae_title
    files = read_study(
        study_instance_uid, [node.spool.absolute(p.as_posix()) for p in instances.paths], calling
    )
    if instances.series is None:
        return None, files
    return recorded_study(study_instance_uid, _as_info(node, instances.series), calling), files


@pytest.mark.shared_data
def test_every_real_study_routes_from_its_rows_as_from_its_files(
    start_node: Callable[..., Node], shared_dicom: Path
) -> None:
    node = start_node()
    summary = push([shared_dicom], _target(node), calling_ae_title="PUSHER")
    assert summary.succeeded > 300

    with node.database.reading() as session:
        uids = session.scalars(select(Study.study_instance_uid).order_by(Study.id)).all()
        replaced = set(
            session.scalars(
                select(Study.study_instance_uid)
                .join(Instance, Instance.study_id == Study.id)
                .where(Instance.replaced_count > 0)
            )
        )
    compared: list[StudyInfo] = []
    for uid in uids:
        try:
            rows, files = _both_ways(node, uid)
        except FileNotFoundError:
            continue  # no image in the study (an SR on its own): nothing to route either way
        if rows is None:
            # only a replacement that may change a series' first image sends a study back
            # to its files
            assert uid in replaced
            continue
        assert rows == files
        assert plan_study(rows, ROUTES) == plan_study(files, ROUTES)
        compared.append(rows)

    assert len(compared) >= 20
    every_series = [s for study in compared for s in study.series]
    assert sum(s.images for s in every_series) > 300
    assert any(s.images > len(s.paths) for s in every_series)  # multi-frame
    assert {"CT", "MR", "DX"} <= {s.modality for s in every_series}
    assert any(len(study.series) > 2 for study in compared)
    assert {s.orientation for s in every_series} >= {"axial", "sagittal", "coronal"}
    assert any(plan_study(study, ROUTES).runs for study in compared)
    # the replacements of this data set (one series in several transfer syntaxes) keep it
    assert replaced and not replaced.isdisjoint(s.study_instance_uid for s in compared)


@pytest.mark.shared_data
def test_the_routing_dry_run_reads_the_rows_and_the_files_alike(
    start_node: Callable[..., Node], shared_dicom: Path
) -> None:
    node = start_node(routes=[route.model_dump(by_alias=True) for route in ROUTES])
    # CT and MR series, multi-frame images, SEG and SR objects, several studies
    folders = ["dcm_qa_ct", "dcm_qa_decubitus", "dcmqi", "highdicom"]
    summary = push([shared_dicom / f for f in folders], _target(node), calling_ae_title="PUSHER")
    assert summary.succeeded > 80
    with node.database.reading() as session:
        uids = session.scalars(select(Study.study_instance_uid)).all()
    caller = Caller("cli:test")

    from_rows = [plan_stored_study(node.database, caller, node.settings, None, uid) for uid in uids]
    with node.database.transaction() as session:  # as if received before migration 0012
        session.execute(update(Instance).values(frames=None))
    from_files = [
        plan_stored_study(node.database, caller, node.settings, None, uid) for uid in uids
    ]

    assert from_rows == from_files
    assert any(plan.runs for plan in from_rows)


# --- what the rows hold: receive, replace, purge ----------------------------------------------


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    upgrade(database)
    yield database
    database.dispose()


def _image(study_uid: str, series_uid: str, description: str, **values: Any) -> ReceivedInstance:
    """An instance as the receiver would record it (an image of ``description`` unless
    ``values`` say otherwise)."""
    header = make_ct_slice(study_uid=study_uid, series_uid=series_uid, index=0)
    header.SeriesDescription = description
    item: dict[str, Any] = {
        "sop_class_uid": CTImageStorage,
        "sop_instance_uid": generate_uid(),
        "study_instance_uid": study_uid,
        "series_instance_uid": series_uid,
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "path": f"{study_uid}/{generate_uid()}.dcm",
        "size_bytes": 1,
        "sha256": generate_uid(),
        "frames": 1,
        "routing_attributes": RoutingAttributes.of(header).to_json(),
    }
    return ReceivedInstance(**{**item, **values})


def _record(database: Database, item: ReceivedInstance) -> StoreOutcome:
    with database.transaction() as session:
        return record_instance(
            session=session,
            item=item,
            association_id=None,
            calling_ae_title="MODALITY",
            remote_address="127.0.0.1",
            quiet_seconds=1.0,
            now=utcnow(),
        ).outcome


def _recorded(database: Database, study_uid: str) -> tuple[RecordedSeries, ...] | None:
    with database.reading() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
        assert study_id is not None
        return study_instances(session=session, study_id=study_id).series


def test_a_series_keeps_the_attributes_of_its_first_image(database: Database) -> None:
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    _record(database, _image(study, first, "", frames=0, routing_attributes=None))  # an SR
    _record(database, _image(study, first, "first"))
    _record(database, _image(study, second, "second", frames=3))
    _record(database, _image(study, first, "later"))

    recorded = _recorded(database, study)

    assert recorded is not None
    assert [(s.series_instance_uid, s.images, len(s.paths)) for s in recorded] == [
        (first, 2, 2),
        (second, 3, 1),
    ]
    assert [s.attributes.series_description for s in recorded] == ["first", "second"]


def test_an_image_without_its_routing_attributes_is_refused() -> None:
    with pytest.raises(ValueError, match="routing attributes"):
        _image(generate_uid(), generate_uid(), "x", routing_attributes=None)


@pytest.mark.parametrize(
    ("change", "still_recorded"),
    [
        ("nothing", True),  # the same attributes in other bytes: a re-encoded image sent again
        ("description", False),
        ("not an image", False),
        ("series", False),
    ],
)
def test_a_replacement_that_may_change_a_series_first_image_sends_the_study_to_its_files(
    database: Database, change: str, still_recorded: bool
) -> None:
    study, series = generate_uid(), generate_uid()
    original = _image(study, series, "first")
    _record(database, original)
    _record(database, _image(study, series, "first"))
    values: dict[str, Any] = {
        "description": {"routing_attributes": _image(study, series, "other").routing_attributes},
        "not an image": {"frames": 0, "routing_attributes": None},
        "series": {"series_instance_uid": generate_uid()},
    }.get(change, {})
    replacement = replace(original, sha256=generate_uid(), path=f"{study}/new.dcm", **values)

    assert _record(database, replacement) is StoreOutcome.REPLACED

    recorded = _recorded(database, study)
    assert (recorded is not None) is still_recorded
    if recorded is not None:
        assert recorded[0].paths[0] == Path(f"{study}/new.dcm")


def test_a_purged_series_takes_the_attributes_of_its_next_first_image(
    database: Database,
) -> None:
    study, series = generate_uid(), generate_uid()
    _record(database, _image(study, series, "before"))
    with database.transaction() as session:
        study_row = session.execute(
            select(Study).where(Study.study_instance_uid == study)
        ).scalar_one()
        study_row.status = StudyStatus.COMPLETE
        now = utcnow()
        rule = PurgeRule(now=now, instances_before=now + timedelta(hours=1))
        assert purge_study(session=session, study_id=study_row.id, rule=rule) is not None

    _record(database, _image(study, series, "after"))

    recorded = _recorded(database, study)
    assert recorded is not None
    assert [s.attributes.series_description for s in recorded] == ["after"]


# --- the job ----------------------------------------------------------------------------------


def _run_job(database: Database, tmp_path: Path, study_uid: str) -> JobOutcome:
    route = {"name": "ct", "model": "m", "when": {"Modality": "CT"}, "series": {"min_instances": 5}}
    settings = make_settings(tmp_path, routes=[route])
    runner = JobRunner(settings, database, ModelRegistry(tmp_path / "models", device="cpu"))
    with database.transaction() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
        assert study_id is not None
        job_id = queue_job(
            session=session, study_id=study_id, instance_count=0, now=utcnow(), queue="default"
        ).id
    lease = runner.claim(job_id=job_id)
    assert lease is not None
    outcome = runner.run(lease)
    assert outcome is not None
    return outcome


def test_the_job_routes_from_the_rows_without_reading_a_file(
    database: Database, tmp_path: Path
) -> None:
    study, series = generate_uid(), generate_uid()
    for _ in range(3):  # rows only: no file was ever written
        _record(database, _image(study, series, "abdomen"))

    outcome = _run_job(database, tmp_path, study)

    assert outcome.status is JobStatus.SKIPPED
    assert outcome.reason == (
        f"route 'ct': no usable series ({series}: 3 images < min_instances 5)"
    )
    assert "route" in outcome.timings


def test_the_job_of_a_study_without_an_image_says_so(database: Database, tmp_path: Path) -> None:
    study = generate_uid()
    _record(database, _image(study, generate_uid(), "", frames=0, routing_attributes=None))

    outcome = _run_job(database, tmp_path, study)

    assert outcome.status is JobStatus.FAILED
    assert outcome.reason == (
        f"study {study} has no image: none of its 1 instances has Rows and Columns"
    )
