"""migrate, validate_schema, table prefixes and list_data_key_version_referencers."""

from __future__ import annotations

import pathlib
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiosqlite
import asyncpg
import pytest
from conftest import input_validation

import kms_async
from kms_async import KMS, SCHEMA_VERSION, AeadWrapper, InvalidParameterError, KeyNotFoundError

OpenKMS = Callable[..., Awaitable[KMS]]

SQL_DIR = pathlib.Path(__file__).resolve().parent.parent / "sql"
CORE_TABLES = {
    "kms_schema_version",
    "kms_collection_version",
    "kms_root_key",
    "kms_root_key_version",
    "kms_data_key",
    "kms_data_key_version",
}


def _with_search_path(dsn: str, schema: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


class EmptyDB:
    """A database of the same dialect as ``db`` with nothing applied."""

    def __init__(self, dialect: str, dsn: str) -> None:
        self.dialect = dialect
        self.dsn = dsn

    async def tables(self) -> set[str]:
        if self.dialect == "postgres":
            conn = await asyncpg.connect(self.dsn)
            try:
                rows = await conn.fetch(
                    "select tablename from pg_tables where schemaname = current_schema()"
                )
            finally:
                await conn.close()
            return {r[0] for r in rows}
        async with aiosqlite.connect(self.dsn[len("sqlite:///") :]) as conn:
            rows = await conn.execute_fetchall(
                "select name from sqlite_master where type = 'table'"
            )
        return {r[0] for r in rows}

    async def run_sql_files(self) -> list[str]:
        """Apply sql/<dialect>/*.up.sql as a migration tool would; return their names."""
        paths = sorted((SQL_DIR / self.dialect).glob("*.up.sql"))
        for path in paths:
            script = path.read_text(encoding="utf-8")
            if self.dialect == "postgres":
                conn = await asyncpg.connect(self.dsn)
                try:
                    await conn.execute(script)
                finally:
                    await conn.close()
            else:
                async with aiosqlite.connect(self.dsn[len("sqlite:///") :]) as conn:
                    await conn.executescript(script)
        return [path.name for path in paths]


@pytest.fixture
async def empty_db(db: Any, tmp_path: Any) -> AsyncIterator[EmptyDB]:
    if db.dialect == "sqlite":
        yield EmptyDB("sqlite", f"sqlite:///{tmp_path}/empty.db")
        return
    schema = f"{db.schema}_empty"
    await db.execute(f"create schema {schema}")
    try:
        yield EmptyDB("postgres", _with_search_path(db.dsn, schema))
    finally:
        await db.execute(f"drop schema {schema} cascade")


def file_names(dialect: str) -> list[str]:
    return [path.name for path in sorted((SQL_DIR / dialect).glob("*.up.sql"))]


# -- migrate -----------------------------------------------------------------------


async def test_migrate_applies_every_file_then_nothing(empty_db: EmptyDB) -> None:
    applied = await kms_async.migrate(empty_db.dsn)
    assert applied == file_names(empty_db.dialect)
    assert applied == [m.name for m in kms_async.migrations(empty_db.dialect)]  # type: ignore[arg-type]
    assert await empty_db.tables() >= CORE_TABLES

    assert await kms_async.migrate(empty_db.dsn) == []


async def test_migrated_database_opens(empty_db: EmptyDB, root_wrapper: AeadWrapper) -> None:
    await kms_async.migrate(empty_db.dsn)
    async with await KMS.open(
        empty_db.dsn, purposes=["database"], root_wrapper=root_wrapper, max_staleness=None
    ) as kms:
        assert await kms.validate_schema() == SCHEMA_VERSION
        await kms.create_keys("s1")


async def test_migrate_records_tables_created_by_running_the_sql_files(
    empty_db: EmptyDB, root_wrapper: AeadWrapper
) -> None:
    names = await empty_db.run_sql_files()
    assert "kms_migration" not in await empty_db.tables()

    # The core file is recorded as present; the later ones (re-runnable by
    # design) run again, since nothing records that they ran.
    later = [m.name for m in kms_async.migrations(empty_db.dialect) if m.number > 1]  # type: ignore[arg-type]
    assert await kms_async.migrate(empty_db.dsn) == later

    assert "kms_migration" in await empty_db.tables()
    assert await kms_async.migrate(empty_db.dsn) == []
    async with await KMS.open(
        empty_db.dsn, purposes=["database"], root_wrapper=root_wrapper, max_staleness=None
    ) as kms:
        await kms.create_keys("s1")
        assert (
            await kms.decrypt("s1", "database", await kms.encrypt("s1", "database", b"x")) == b"x"
        )
    assert names == file_names(empty_db.dialect)


async def test_validate_schema_returns_the_version(kms: KMS) -> None:
    assert await kms.validate_schema() == "v0.0.2"
    assert SCHEMA_VERSION == "v0.0.2"


# -- table prefixes ------------------------------------------------------------------


async def test_a_second_prefix_gets_its_own_tables(db: Any) -> None:
    applied = await kms_async.migrate(db.dsn, table_prefix="acme")
    assert applied == file_names(db.dialect)
    assert await kms_async.migrate(db.dsn, table_prefix="acme") == []
    assert await db.fetchval("select version from acme_schema_version") == SCHEMA_VERSION
    assert await db.fetchval("select count(*) from acme_root_key") == 0


async def test_kms_instances_with_different_prefixes_do_not_see_each_others_keys(
    db: Any, open_kms: OpenKMS
) -> None:
    await kms_async.migrate(db.dsn, table_prefix="acme")
    async with await open_kms() as default, await open_kms(table_prefix="acme") as acme:
        await default.create_keys("shared")
        await acme.create_keys("acme-only")

        with pytest.raises(KeyNotFoundError):
            await acme.list_keys("shared")
        with pytest.raises(KeyNotFoundError):
            await default.list_keys("acme-only")
        ciphertext = await default.encrypt("shared", "database", b"x")
        with pytest.raises(KeyNotFoundError):
            await acme.decrypt("shared", "database", ciphertext)

        # The same scope id may hold independent keys under each prefix.
        await acme.create_keys("shared")
        acme_ciphertext = await acme.encrypt("shared", "database", b"y")
        assert await acme.decrypt("shared", "database", acme_ciphertext) == b"y"
        with pytest.raises(KeyNotFoundError):  # UnknownKeyVersionError is one
            await acme.decrypt("shared", "database", ciphertext)

    assert await db.fetch("select scope_id from kms_root_key") == [("shared",)]
    assert await db.fetch("select scope_id from acme_root_key order by scope_id") == [
        ("acme-only",),
        ("shared",),
    ]
    # Each prefix has its own change counter: 1 + one create vs 1 + two creates.
    assert await db.fetchval("select version from kms_collection_version") == 2
    assert await db.fetchval("select version from acme_collection_version") == 3


async def test_opening_an_unmigrated_prefix_is_a_schema_error(db: Any, open_kms: OpenKMS) -> None:
    with pytest.raises(kms_async.SchemaVersionError, match="migrate"):
        await open_kms(table_prefix="acme")


BAD_PREFIXES = ["Kms", "a;drop table x", "", "k" * 25, "1kms", "kms-x", "kms x", "kms\x00"]


@input_validation
@pytest.mark.parametrize("prefix", BAD_PREFIXES, ids=repr)
async def test_migrate_rejects_bad_prefixes_before_any_sql(db: Any, prefix: str) -> None:
    before = await db.fetch("select count(*) from kms_root_key")
    with pytest.raises(InvalidParameterError, match="table_prefix"):
        await kms_async.migrate(db.dsn, table_prefix=prefix)
    # An unreachable database shows the check needs no connection.
    with pytest.raises(InvalidParameterError, match="table_prefix"):
        await kms_async.migrate("postgresql://nobody@127.0.0.1:1/none", table_prefix=prefix)
    assert await db.fetch("select count(*) from kms_root_key") == before


@input_validation
@pytest.mark.parametrize("prefix", BAD_PREFIXES, ids=repr)
async def test_open_rejects_bad_prefixes_before_any_sql(
    db: Any, root_wrapper: AeadWrapper, prefix: str
) -> None:
    with pytest.raises(InvalidParameterError, match="table_prefix"):
        await KMS.open(db.dsn, purposes=["database"], table_prefix=prefix, max_staleness=None)
    with pytest.raises(InvalidParameterError, match="table_prefix"):
        await KMS.open(
            "postgresql://nobody@127.0.0.1:1/none",
            purposes=["database"],
            table_prefix=prefix,
            max_staleness=None,
        )


@pytest.mark.parametrize("prefix", BAD_PREFIXES, ids=repr)
def test_migrations_rejects_bad_prefixes(prefix: str) -> None:
    with pytest.raises(InvalidParameterError, match="table_prefix"):
        kms_async.migrations("sqlite", table_prefix=prefix)


# -- list_data_key_version_referencers -------------------------------------------------


async def test_no_referencers_without_application_tables(kms: KMS) -> None:
    assert await kms.list_data_key_version_referencers() == []


async def test_referencers_lists_application_tables(kms: KMS, db: Any) -> None:
    await db.add_app_table("app_secret")
    await db.add_app_table("app_token")
    assert await kms.list_data_key_version_referencers() == ["app_secret", "app_token"]


async def test_referencers_lists_a_table_with_two_foreign_keys_once(kms: KMS, db: Any) -> None:
    await db.execute(
        "create table app_pair ("
        " id text primary key,"
        " current_version text references kms_data_key_version(private_id) on delete restrict,"
        " previous_version text references kms_data_key_version(private_id) on delete restrict)"
    )
    assert await kms.list_data_key_version_referencers() == ["app_pair"]


async def test_referencers_finds_a_foreign_key_without_a_target_column(kms: KMS, db: Any) -> None:
    # Both dialects resolve a column-less reference to the primary key.
    await db.execute(
        "create table app_implicit ("
        " id text primary key,"
        " key_version_id text references kms_data_key_version on delete restrict)"
    )
    assert await kms.list_data_key_version_referencers() == ["app_implicit"]


async def test_referencers_finds_a_table_level_foreign_key(kms: KMS, db: Any) -> None:
    await db.execute(
        "create table app_table_level ("
        " id text primary key,"
        " key_version_id text,"
        " constraint app_fk foreign key (key_version_id)"
        "  references kms_data_key_version (private_id) on delete restrict)"
    )
    assert await kms.list_data_key_version_referencers() == ["app_table_level"]


async def test_referencers_ignores_tables_referencing_other_kms_tables(kms: KMS, db: Any) -> None:
    await db.execute(
        "create table app_scope ("
        " id text primary key,"
        " root_key_id text references kms_root_key(private_id) on delete cascade)"
    )
    assert await kms.list_data_key_version_referencers() == []


async def test_referencers_honour_the_table_prefix(db: Any, open_kms: OpenKMS) -> None:
    await kms_async.migrate(db.dsn, table_prefix="acme")
    await db.add_app_table("app_secret")
    await db.execute(
        "create table acme_secret ("
        " id text primary key,"
        " key_version_id text references acme_data_key_version(private_id) on delete restrict)"
    )
    async with await open_kms() as default, await open_kms(table_prefix="acme") as acme:
        assert await default.list_data_key_version_referencers() == ["app_secret"]
        assert await acme.list_data_key_version_referencers() == ["acme_secret"]
