"""Schema migrations (Alembic), run programmatically by ``pacsai db upgrade`` and at start-up."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

from pacsai.db.engine import Database
from pacsai.errors import DatabaseError

__all__ = ["current_revision", "head_revision", "upgrade"]


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", "pacsai.db:migrations")
    return config


def head_revision() -> str:
    """The newest migration this version of pacsai ships."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(database: Database) -> str | None:
    """The migration the database is at, or ``None`` for an empty database."""
    try:
        with database.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot read the schema version of {database.display_url}: {exc}"
        ) from exc


def upgrade(database: Database, revision: str = "head", **attributes: Any) -> None:
    """Upgrade the database schema to `revision` (default: the newest)."""
    config = _config()
    try:
        with database.engine.begin() as connection:
            config.attributes["connection"] = connection
            config.attributes.update(attributes)
            command.upgrade(config, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot upgrade {database.display_url}: {exc}") from exc
