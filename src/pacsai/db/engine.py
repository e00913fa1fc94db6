"""One engine per process, and sessions that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacsai.errors import DatabaseError

__all__ = ["Database"]


def _configure_sqlite(engine: Engine) -> None:
    """WAL, full fsync on commit, foreign keys, and write transactions that lock up front.

    pysqlite's own transaction handling starts transactions lazily and in DEFERRED mode; a
    deferred transaction that reads and then writes fails at once with "database is locked"
    when another writer is active, without waiting. Taking the lock at BEGIN (IMMEDIATE) makes
    SQLite's busy timeout apply instead. Read-only sessions keep a deferred BEGIN.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        readonly = connection.get_execution_options().get("pacsai_readonly", False)
        connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


class Database:
    """The engine and session factories of one database.

    Parameters
    ----------
    url
        A SQLAlchemy URL: ``sqlite:///path`` or ``postgresql+psycopg://user@host/db``.
    pool_size
        Connections kept open to PostgreSQL (one per concurrent association is plenty).
    """

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"future": True}
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        try:
            self.engine = create_engine(url, **kwargs)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise DatabaseError(f"cannot use database URL {parsed!r}: {exc}") from exc
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
        self._writer = sessionmaker(self.engine, expire_on_commit=False)
        self._reader = sessionmaker(
            self.engine.execution_options(pacsai_readonly=True), expire_on_commit=False
        )

    @property
    def display_url(self) -> str:
        """The URL with any password hidden, for logs."""
        return make_url(self.url).render_as_string(hide_password=True)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in a write transaction, committed on success and rolled back on error.

        Raises
        ------
        DatabaseError
            If the database refuses a statement or cannot be reached.
        """
        try:
            with self._writer.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise DatabaseError(f"database error: {type(exc).__name__}: {exc.args[0]}") from exc

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads only; on SQLite it does not take the write lock."""
        try:
            with self._reader() as session:
                yield session
        except SQLAlchemyError as exc:
            raise DatabaseError(f"database error: {type(exc).__name__}: {exc.args[0]}") from exc

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
