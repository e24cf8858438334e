"""The SQL layer: one driver-neutral interface, one implementation per driver."""

from __future__ import annotations

import aiosqlite
import asyncpg

from .._errors import InvalidParameterError
from ._base import Connection, Database, IntegrityError, Queries, Row, validate_prefix
from ._postgres import DEFAULT_POOL_TIMEOUT, POOLERS, Pooler, PostgresDatabase
from ._sqlite import SqliteDatabase, is_memory_path

__all__ = [
    "DEFAULT_POOL_TIMEOUT",
    "POOLERS",
    "Connection",
    "Database",
    "IntegrityError",
    "Pooler",
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


def _check_postgres_dsn(name: str, value: object, *, pool: bool = False) -> None:
    if isinstance(value, str) and value.startswith(_POSTGRES):
        return
    if pool and isinstance(value, asyncpg.Pool):
        return
    what = "a postgresql:// DSN or an asyncpg Pool" if pool else "a postgresql:// DSN"
    raise InvalidParameterError(f"{name} must be {what}, not {type(value).__name__}")


async def open_database(
    db: object,
    *,
    prefix: str,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT,
    create: bool = False,
    pooler: Pooler = "auto",
    listen_dsn: str | None = None,
    read_dsn: object = None,
) -> Database:
    """Open (or adopt) the database that ``db`` names.

    A SQLite file is created only with ``create`` (migrations): anything else
    refuses a path where there is no database, instead of leaving an empty
    one behind. ``pooler``, ``listen_dsn`` and ``read_dsn`` are PostgreSQL's
    (see ``KMS.open``).
    """
    validate_prefix(prefix)
    if pooler not in POOLERS:
        raise InvalidParameterError(
            f"pooler must be 'auto', 'transaction' or 'none', not {pooler!r}"
        )
    postgres = (isinstance(db, str) and db.startswith(_POSTGRES)) or isinstance(db, asyncpg.Pool)
    if not postgres and (listen_dsn is not None or read_dsn is not None or pooler != "auto"):
        given = [
            name
            for name, value in (("listen_dsn", listen_dsn), ("read_dsn", read_dsn))
            if value is not None
        ] or ["pooler"]
        raise InvalidParameterError(
            f"{' and '.join(given)} work on PostgreSQL only (LISTEN, replicas and poolers); "
            "leave them out for SQLite"
        )
    if listen_dsn is not None:
        _check_postgres_dsn("listen_dsn", listen_dsn)
    if read_dsn is not None:
        _check_postgres_dsn("read_dsn", read_dsn, pool=True)
    database: Database
    if isinstance(db, str):
        if db.startswith(_POSTGRES):
            database = await PostgresDatabase.connect(
                db, prefix=prefix, pool_timeout=pool_timeout, pooler=pooler
            )
        elif db.startswith("sqlite:"):
            return await SqliteDatabase.connect(sqlite_path(db), prefix=prefix, create=create)
        else:
            raise InvalidParameterError(
                f"unsupported DSN scheme in {db.split(':', 1)[0]!r}; {DB_HELP}"
            )
    elif isinstance(db, asyncpg.Pool):
        database = await PostgresDatabase.adopt(
            db, prefix=prefix, pool_timeout=pool_timeout, pooler=pooler
        )
    elif isinstance(db, aiosqlite.Connection):
        return await SqliteDatabase.from_connection(db, prefix=prefix)
    else:
        raise InvalidParameterError(f"{DB_HELP}; got {type(db).__name__}")
    assert isinstance(database, PostgresDatabase)
    try:
        if listen_dsn is not None:
            database.use_listen_dsn(listen_dsn)
        if read_dsn is not None:
            await database.use_replica(read_dsn, pooler)
    except BaseException:
        await database.aclose()
        raise
    return database
