"""The SQL layer: one driver-neutral interface, one implementation per driver."""

from __future__ import annotations

import aiosqlite
import asyncpg

from .._errors import InvalidParameterError
from ._base import Connection, Database, IntegrityError, Queries, Row, validate_prefix
from ._postgres import DEFAULT_POOL_TIMEOUT, PostgresDatabase
from ._sqlite import SqliteDatabase

__all__ = [
    "DEFAULT_POOL_TIMEOUT",
    "Connection",
    "Database",
    "IntegrityError",
    "PostgresDatabase",
    "Queries",
    "Row",
    "SqliteDatabase",
    "open_database",
    "sqlite_path",
    "validate_prefix",
]

DB_HELP = (
    "db must be a DSN (postgresql://..., postgres://..., sqlite:///relative.db, "
    "sqlite:////absolute/path.db, sqlite:///:memory:), an asyncpg Pool or an aiosqlite Connection"
)


def sqlite_path(dsn: str) -> str:
    """The file path of a ``sqlite:///`` DSN (SQLAlchemy's convention)."""
    if not dsn.startswith("sqlite:///"):
        raise InvalidParameterError(DB_HELP)
    path = dsn[len("sqlite:///") :]
    if not path:
        raise InvalidParameterError(f"sqlite DSN {dsn!r} names no file; {DB_HELP}")
    return path


async def open_database(
    db: object, *, prefix: str, pool_timeout: float = DEFAULT_POOL_TIMEOUT
) -> Database:
    """Open (or adopt) the database that ``db`` names."""
    validate_prefix(prefix)
    if isinstance(db, str):
        if db.startswith(("postgresql://", "postgres://")):
            return await PostgresDatabase.connect(db, prefix=prefix, pool_timeout=pool_timeout)
        if db.startswith("sqlite:"):
            return await SqliteDatabase.connect(sqlite_path(db), prefix=prefix)
        raise InvalidParameterError(f"unsupported DSN scheme in {db.split(':', 1)[0]!r}; {DB_HELP}")
    if isinstance(db, asyncpg.Pool):
        return PostgresDatabase(db, prefix=prefix, owns_pool=False, pool_timeout=pool_timeout)
    if isinstance(db, aiosqlite.Connection):
        return await SqliteDatabase.from_connection(db, prefix=prefix)
    raise InvalidParameterError(f"{DB_HELP}; got {type(db).__name__}")
