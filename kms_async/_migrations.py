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
import sqlite3
from typing import Literal

from ._errors import InvalidParameterError, SchemaVersionError
from ._sql import Connection, Database, open_database, validate_prefix

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


def split_sqlite_script(script: str) -> list[str]:
    """Split a SQLite script into statements, keeping trigger bodies whole."""
    statements = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip().strip(";").strip():
                statements.append(pending.strip())
            pending = ""
    if pending.strip():
        statements.append(pending.strip())
    return statements


async def _table_exists(db: Database, conn: Connection, table: str) -> bool:
    if db.dialect == "postgres":
        return bool(await conn.fetchval("select to_regclass($1) is not null", table))
    return bool(
        await conn.fetchval(
            "select count(*) from sqlite_master where type = 'table' and name = $1", table
        )
    )


async def _apply_pending(db: Database, prefix: str) -> list[str]:
    applied_now: list[str] = []
    tracking = f"{prefix}_migration"
    for migration in migrations(db.dialect, table_prefix=prefix):
        async with db.transaction() as conn:
            if db.dialect == "postgres":
                # Serialise concurrent migrators; released at commit.
                await conn.execute("select pg_advisory_xact_lock(hashtext($1))", tracking)
            await conn.execute(
                f"create table if not exists {tracking} ("
                " name text primary key,"
                " applied_at timestamp not null default current_timestamp)"
            )
            done = {row[0] for row in await conn.fetch(f"select name from {tracking}")}
            if migration.name in done:
                continue
            if (
                migration.number <= _CORE_FILES
                and not done
                and await _table_exists(db, conn, f"{prefix}_schema_version")
            ):
                # Tables made by another tool: record, do not re-create.
                await conn.execute(f"insert into {tracking} (name) values ($1)", migration.name)
                continue
            if db.dialect == "postgres":
                await conn.execute(migration.sql)
            else:
                for statement in split_sqlite_script(migration.sql):
                    await conn.execute(statement)
            await conn.execute(f"insert into {tracking} (name) values ($1)", migration.name)
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
    database = await open_database(db, prefix=prefix)
    try:
        applied = await _apply_pending(database, prefix)
        async with database.read() as conn:
            version = await conn.fetchval(database.queries.schema_version)
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the database schema is at {version!r} but kms_async needs {SCHEMA_VERSION!r}; "
                "upgrade it with the Go package's migrations or restore a matching backup",
                found=version,
            )
        return applied
    finally:
        await database.aclose()
