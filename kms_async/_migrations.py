"""The schema files under ``sql/`` and the built-in runner that applies them.

The files are the source of truth: ``sql/<dialect>/NN_name.up.sql``, each
runnable whole by any migration tool. They name every object with the
``kms_`` prefix; for another table prefix the runner (and
:func:`migrations`) rewrites that prefix.

:func:`migrate` records what it applied in ``<prefix>_migration``. A database
whose core tables were created some other way (the Go package's own files, or
the user's migration tool) is recognised by its ``<prefix>_schema_version``
table, and the core files are recorded as already applied.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib
import re
from typing import Literal

from ._errors import InvalidParameterError, SchemaVersionError
from ._sql import Database, open_database, validate_prefix
from ._sql import _store as repo

__all__ = ["SCHEMA_VERSION", "Migration", "migrate", "migrations"]

#: The ``<prefix>_schema_version.version`` this library (and the Go package) requires.
SCHEMA_VERSION = "v0.0.2"

#: Files up to this number create the tables both libraries share.
_CORE_FILES = 1

_FILE_NAME = re.compile(r"(\d+)_([a-z0-9_]+)\.up\.sql")


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    """One schema file: its number, its file name and its SQL for one table prefix."""

    number: int
    name: str
    sql: str


def _sql_dir(dialect: str) -> pathlib.Path:
    # Installed wheels carry the files inside the package; a source checkout
    # (and an editable install) has them beside it.
    packaged = importlib.resources.files("kms_async") / "sql" / dialect
    if packaged.is_dir():
        return pathlib.Path(str(packaged))
    return pathlib.Path(__file__).resolve().parent.parent / "sql" / dialect


def migrations(
    dialect: Literal["postgres", "sqlite"], *, table_prefix: str = "kms"
) -> list[Migration]:
    """The schema files for ``dialect`` in order, rewritten for ``table_prefix``.

    Raises:
        InvalidParameterError: unknown dialect or unsafe prefix.
    """
    if dialect not in ("postgres", "sqlite"):
        raise InvalidParameterError(f"dialect must be 'postgres' or 'sqlite', not {dialect!r}")
    prefix = validate_prefix(table_prefix)
    found = []
    for path in sorted(_sql_dir(dialect).glob("*.up.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            continue
        text = path.read_text(encoding="utf-8")
        if prefix != "kms":
            text = re.sub(r"\bkms_", f"{prefix}_", text)
        found.append(Migration(int(match.group(1)), path.name, text))
    return found


async def _apply_pending(db: Database, prefix: str) -> list[str]:
    q = db.queries
    applied_now: list[str] = []
    for migration in migrations(db.dialect, table_prefix=prefix):
        async with db.transaction() as conn:
            done = await repo.begin_migration(conn, q)
            if migration.name in done:
                continue
            if (
                migration.number <= _CORE_FILES
                and not done
                and await repo.table_exists(conn, q, f"{prefix}_schema_version")
            ):
                # Tables made by another tool: record, do not re-create.
                await repo.record_migration(conn, q, migration.name)
                continue
            await repo.run_script(conn, q, migration.sql)
            await repo.record_migration(conn, q, migration.name)
            applied_now.append(migration.name)
    return applied_now


async def migrate(db: object, *, table_prefix: str = "kms") -> list[str]:
    """Apply the schema files the database lacks; return the names applied.

    ``db`` is a DSN, an asyncpg Pool or an aiosqlite Connection, as for
    :meth:`KMS.open`. Each file runs in its own transaction; running
    ``migrate`` again, or from several processes at once, is harmless.

    Raises:
        InvalidParameterError: ``db`` or ``table_prefix`` is not usable.
        SchemaVersionError: the database holds a schema version this library
            cannot upgrade.
        StorageError: the database failed.
    """
    prefix = validate_prefix(table_prefix)
    database = await open_database(db, prefix=prefix, create=True)
    try:
        applied = await _apply_pending(database, prefix)
        async with database.read() as conn:
            version = await repo.schema_version(conn, database.queries)
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the database schema is at {version!r} but kms_async needs {SCHEMA_VERSION!r}; "
                "upgrade it with the Go package's migrations or restore a matching backup",
                found=version,
            )
        return applied
    finally:
        await database.aclose()
