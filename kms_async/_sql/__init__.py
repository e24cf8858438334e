"""The SQL layer: one driver-neutral interface, one implementation per driver."""

from __future__ import annotations

import aiosqlite
import asyncpg

from .._errors import InvalidParameterError
from ._base import Connection, Database, IntegrityError, Queries, Row, validate_prefix
from ._postgres import DEFAULT_POOL_TIMEOUT, PostgresDatabase
from ._sqlite import SqliteDatabase, is_memory_path

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
    "prepare_dsn",
    "sqlite_path",
    "validate_prefix",
]

DB_HELP = (
    "db must be a DSN (postgresql://user@host/dbname, sqlite:///relative.db, "
    "sqlite:////absolute/path.db), an asyncpg Pool or an aiosqlite Connection"
)
_POSTGRES = ("postgresql://", "postgres://")


def sqlite_path(dsn: str) -> str:
    """The file path of a ``sqlite:///`` DSN (SQLAlchemy's convention)."""
    if not dsn.startswith("sqlite:///"):
        raise InvalidParameterError(DB_HELP)
    path = dsn[len("sqlite:///") :]
    if not path:
        raise InvalidParameterError(f"sqlite DSN {dsn!r} names no file; {DB_HELP}")
    return path


def prepare_dsn(dsn: str, *, connect_timeout: float | None = None, in_memory: bool = True) -> str:
    """Check a DSN before it is opened, for a client that takes DSNs from people.

    With ``connect_timeout``, a PostgreSQL DSN that sets none gets libpq's
    ``connect_timeout``; other DSNs are returned as they are. With
    ``in_memory=False`` an in-memory SQLite database is refused (for a
    client whose every run opens a new one, such as the command line).

    Raises:
        InvalidParameterError: not a DSN this library opens, or in memory.
    """
    if not isinstance(dsn, str) or "\x00" in dsn or not dsn.startswith((*_POSTGRES, "sqlite:///")):
        scheme = dsn.split(":", 1)[0] if isinstance(dsn, str) and ":" in dsn else ""
        raise InvalidParameterError(
            "the database must be given as postgresql://user@host/dbname or sqlite:///FILE"
            f"{f', not {scheme}:...' if scheme.isalnum() else ''} (sqlite:///app.db is relative "
            "to the current directory, sqlite:////srv/app.db absolute)"
        )
    if dsn.startswith(_POSTGRES):
        if connect_timeout is None or "connect_timeout=" in dsn:
            return dsn
        joiner = "&" if "?" in dsn else "?"
        return f"{dsn}{joiner}connect_timeout={connect_timeout:g}"
    path = sqlite_path(dsn)
    if not in_memory and is_memory_path(path):
        raise InvalidParameterError(
            "an in-memory SQLite database lasts as long as its connection, here one command; "
            "give a file: sqlite:///app.db"
        )
    return dsn


async def open_database(
    db: object, *, prefix: str, pool_timeout: float = DEFAULT_POOL_TIMEOUT, create: bool = False
) -> Database:
    """Open (or adopt) the database that ``db`` names.

    A SQLite file is created only with ``create`` (migrations): anything else
    refuses a path where there is no database, instead of leaving an empty
    one behind.
    """
    validate_prefix(prefix)
    if isinstance(db, str):
        if db.startswith(_POSTGRES):
            return await PostgresDatabase.connect(db, prefix=prefix, pool_timeout=pool_timeout)
        if db.startswith("sqlite:"):
            return await SqliteDatabase.connect(sqlite_path(db), prefix=prefix, create=create)
        raise InvalidParameterError(f"unsupported DSN scheme in {db.split(':', 1)[0]!r}; {DB_HELP}")
    if isinstance(db, asyncpg.Pool):
        return PostgresDatabase(db, prefix=prefix, owns_pool=False, pool_timeout=pool_timeout)
    if isinstance(db, aiosqlite.Connection):
        return await SqliteDatabase.from_connection(db, prefix=prefix)
    raise InvalidParameterError(f"{DB_HELP}; got {type(db).__name__}")
