"""Migrations upgrade an empty database to exactly the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import Boolean, DateTime, Float, Integer, MetaData, Table, inspect

from pacsai._routing_attributes import RoutingAttributes
from pacsai.db import (
    Base,
    Database,
    Delivery,
    current_revision,
    head_revision,
    upgrade,
    utcnow,
)
from pacsai.db.jobs import study_instances
from pacsai.db.repository import ReceivedInstance, record_instance
from tests.support import make_ct_slice


def test_upgrade_of_an_empty_database_matches_the_models(database_url: str) -> None:
    database = Database(database_url)
    assert current_revision(database) is None

    upgrade(database)

    assert current_revision(database) == head_revision()
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
        tables = set(inspect(connection).get_table_names())
    assert differences == []
    assert set(Base.metadata.tables) <= tables
    upgrade(database)  # a second upgrade is a no-op
    assert current_revision(database) == head_revision()
    database.dispose()


def _insert(connection: Any, name: str, **values: Any) -> int:
    """A row of table ``name`` as it stands now: ``values``, and a plain value for every other
    required column."""
    table = Table(name, MetaData(), autoload_with=connection)
    row = dict(values)
    for column in table.columns:
        if column.name in row or column.primary_key or column.nullable:
            continue
        if isinstance(column.type, Integer | Float):
            row[column.name] = 0
        elif isinstance(column.type, DateTime):
            row[column.name] = datetime(2026, 1, 1)
        elif isinstance(column.type, Boolean):
            row[column.name] = False
        else:
            row[column.name] = "1"
    key = connection.execute(table.insert().values(row)).inserted_primary_key
    return int(key[0])


def test_deliveries_made_before_0010_belong_to_their_result_s_job(database_url: str) -> None:
    database = Database(database_url)
    upgrade(database, "0009")
    with database.engine.begin() as connection:
        study = _insert(connection, "studies", study_instance_uid="1.2.3", status="COMPLETE")
        job = _insert(connection, "jobs", study_id=study, status="SUCCEEDED")
        other = _insert(connection, "jobs", study_id=study, status="SUCCEEDED")
        result = _insert(connection, "results", job_id=job, kind="SEGMENTATION")
        _insert(connection, "results", job_id=other, kind="SEGMENTATION")
        delivery = _insert(
            connection, "deliveries", result_id=result, status="SENT", destination="pacs"
        )

    upgrade(database)

    with database.reading() as session:
        row = session.get(Delivery, delivery)
        assert row is not None
        assert (row.job_id, row.result_id, row.kind, row.message_key) == (
            job,
            result,
            "dicom",
            None,
        )
    database.dispose()


def test_a_study_with_instances_recorded_before_0012_is_routed_from_its_files(
    database_url: str,
) -> None:
    database = Database(database_url)
    upgrade(database, "0011")
    with database.engine.begin() as connection:
        study = _insert(connection, "studies", study_instance_uid="1.2.3", status="RECEIVING")
        series = _insert(connection, "series", study_id=study, series_instance_uid="1.2.3.4")
        _insert(
            connection,
            "instances",
            study_id=study,
            series_id=series,
            sop_instance_uid="1.2.3.4.1",
            path="old.dcm",
        )

    upgrade(database)
    header = make_ct_slice(study_uid="1.2.3", series_uid="1.2.3.4", index=1)
    with database.transaction() as session:  # an image of the same series, after the upgrade
        record_instance(
            session=session,
            item=ReceivedInstance(
                sop_class_uid=header.SOPClassUID,
                sop_instance_uid="1.2.3.4.2",
                study_instance_uid="1.2.3",
                series_instance_uid="1.2.3.4",
                transfer_syntax_uid=ExplicitVRLittleEndian,
                path="new.dcm",
                size_bytes=1,
                sha256="2",
                frames=1,
                routing_attributes=RoutingAttributes.of(header).to_json(),
            ),
            association_id=None,
            calling_ae_title="CT",
            remote_address="127.0.0.1",
            quiet_seconds=1.0,
            now=utcnow(),
        )

    with database.reading() as session:
        instances = study_instances(session=session, study_id=study)
    assert instances.paths == (Path("old.dcm"), Path("new.dcm"))
    assert instances.series is None  # the old row does not say whether it is an image
    database.dispose()
