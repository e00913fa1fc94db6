"""Migrations upgrade an empty database to exactly the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from pacsai.db import Base, Database, current_revision, head_revision, upgrade


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
