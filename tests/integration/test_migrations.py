"""Migrations upgrade an empty database to exactly the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Boolean, DateTime, Float, Integer, MetaData, Table, inspect

from pacsai.db import Base, Database, Delivery, current_revision, head_revision, upgrade


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
