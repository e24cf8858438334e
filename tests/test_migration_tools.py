"""The shipped sql/ files applied by real migration tools (Alembic, yoyo), then used.

Each tool runs on an empty database of either dialect; afterwards
``kms_async.migrate`` must find nothing to do (it recognises the tables and
records the core file as applied) and the KMS must work normally.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import sqlalchemy.exc
import yoyo
from alembic import command
from alembic.config import Config
from conftest import POSTGRES_DSN, TestDB, _with_search_path

import kms_async

ALEMBIC_DIR = pathlib.Path(__file__).resolve().parent.parent / "examples" / "alembic"
SQL_DIR = pathlib.Path(__file__).resolve().parent.parent / "sql"


@contextlib.asynccontextmanager
async def fresh_database(dialect: str, directory: pathlib.Path) -> AsyncIterator[TestDB]:
    """An empty database: a new SQLite file, or a new PostgreSQL schema (dropped afterwards)."""
    if dialect == "sqlite":
        yield TestDB("sqlite", f"sqlite:///{directory}/{secrets.token_hex(4)}.db")
        return
    if not POSTGRES_DSN:
        if os.environ.get("CI"):
            pytest.fail("KMS_TEST_POSTGRES_DSN is not set; CI must run the PostgreSQL cases")
        pytest.skip("set KMS_TEST_POSTGRES_DSN=postgresql://... to run the PostgreSQL cases")
    schema = "t_" + secrets.token_hex(6)
    admin = await asyncpg.connect(POSTGRES_DSN)
    try:
        await admin.execute(f"create schema {schema}")
        yield TestDB("postgres", _with_search_path(POSTGRES_DSN, schema), schema)
    finally:
        await admin.execute(f"drop schema if exists {schema} cascade")
        await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def empty_db(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[TestDB]:
    """Like conftest's ``db`` but not migrated: the tool under test creates the tables."""
    async with fresh_database(request.param, tmp_path) as database:
        yield database


@pytest.fixture(autouse=True)
def _no_database_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # examples/alembic/env.py prefers DATABASE_URL; the tests pass their own URL.
    monkeypatch.delenv("DATABASE_URL", raising=False)
    yield


def _sync_url(db: TestDB, scheme: str) -> str:
    """The same database for a synchronous driver (psycopg2 / pysqlite)."""
    if db.dialect == "sqlite":
        return "sqlite:///" + db.dsn[len("sqlite:///") :]
    assert POSTGRES_DSN is not None and db.schema is not None
    parts = urllib.parse.urlsplit(POSTGRES_DSN)
    query = urllib.parse.parse_qsl(parts.query)
    # psycopg2 (libpq) has no search_path parameter; it takes server options.
    query.append(("options", f"-csearch_path={db.schema}"))
    return urllib.parse.urlunsplit(
        parts._replace(scheme=scheme, query=urllib.parse.urlencode(query))
    )


async def _use_the_kms(db: TestDB) -> None:
    """migrate() records the core file as present; KMS.open accepts the database; keys work.

    The later files (re-runnable by design) are run again by migrate(), which
    cannot tell that another tool ran them.
    """
    later = [m.name for m in kms_async.migrations(db.dialect) if m.number > 1]
    assert await kms_async.migrate(db.dsn) == later
    assert await kms_async.migrate(db.dsn) == []
    root = kms_async.AeadWrapper(secrets.token_bytes(32), key_id="root-1")
    async with await kms_async.KMS.open(
        db.dsn, purposes=["database"], root_wrapper=root, max_staleness=None
    ) as kms:
        assert await kms.validate_schema() == kms_async.SCHEMA_VERSION
        await kms.create_keys("tenant-1")
        old = await kms.encrypt("tenant-1", "database", b"hello", aad=b"row-1")
        await kms.rotate_keys("tenant-1", rewrap=True)
        new = await kms.encrypt("tenant-1", "database", b"again", aad=b"row-2")
        assert (
            kms_async.BlobInfo.from_bytes(old).key_id != kms_async.BlobInfo.from_bytes(new).key_id
        )
        assert await kms.decrypt("tenant-1", "database", old, aad=b"row-1") == b"hello"
        assert await kms.decrypt("tenant-1", "database", new, aad=b"row-2") == b"again"
        keys = await kms.list_keys("tenant-1")
        assert [[v.version for v in k.versions] for k in keys] == [[1, 2], [1, 2]]
    # Every file is recorded now; the core file was not run again.
    assert await db.fetch("select name from kms_migration order by name") == [
        (m.name,) for m in kms_async.migrations(db.dialect)
    ]


def _alembic_config(url: str) -> Config:
    config = Config()  # no ini file: the test's logging stays as it is
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.set_main_option("path_separator", "os")
    config.set_main_option("prepend_sys_path", str(ALEMBIC_DIR))
    # Config values go through ConfigParser interpolation: a literal % is %%.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


async def test_alembic_upgrade_runs_the_sql_files(empty_db: TestDB) -> None:
    config = _alembic_config(_sync_url(empty_db, "postgresql+psycopg2"))
    command.upgrade(config, "head")
    assert (
        await empty_db.fetchval("select version_num from alembic_version")
        == "0007_kms_key_version_usage"
    )
    assert await empty_db.fetchval("select version from kms_schema_version") == "v0.0.2"
    await _use_the_kms(empty_db)
    command.upgrade(config, "head")  # already at head: nothing to do
    assert await empty_db.fetchval("select count(*) from kms_root_key") == 1


async def test_a_failed_alembic_upgrade_leaves_nothing(empty_db: TestDB) -> None:
    # A clash near the end of the file: everything before it must roll back too.
    await empty_db.execute("create table kms_data_key_version (private_id text)")
    with pytest.raises(sqlalchemy.exc.DatabaseError):
        command.upgrade(_alembic_config(_sync_url(empty_db, "postgresql+psycopg2")), "head")
    if empty_db.dialect == "sqlite":
        tables = await empty_db.fetch("select name from sqlite_master where type = 'table'")
    else:
        tables = await empty_db.fetch(
            "select table_name::text from information_schema.tables where table_schema = $1",
            empty_db.schema,
        )
    assert tables == [("kms_data_key_version",)]


async def test_alembic_creates_what_the_builtin_runner_creates(
    empty_db: TestDB, tmp_path: pathlib.Path
) -> None:
    command.upgrade(_alembic_config(_sync_url(empty_db, "postgresql+psycopg2")), "head")
    async with fresh_database(empty_db.dialect, tmp_path) as reference:
        await kms_async.migrate(reference.dsn)
        expected = await _objects(reference)
    assert len(expected) > 10
    assert await _objects(empty_db) == expected


async def _objects(db: TestDB) -> list[tuple[str, ...]]:
    if db.dialect == "sqlite":
        rows = await db.fetch(
            "select type, name from sqlite_master where name like 'kms%'"
            " and name <> 'kms_migration' order by 1, 2"
        )
    else:
        rows = await db.fetch(
            "select 'table', table_name::text from information_schema.tables"
            " where table_schema = $1 and table_name like 'kms%' and table_name <> 'kms_migration'"
            " union all select 'trigger', trigger_name::text || ' ' || event_manipulation::text"
            " from information_schema.triggers where trigger_schema = $1"
            " union all select 'function', routine_name::text from information_schema.routines"
            " where routine_schema = $1 order by 1, 2",
            db.schema,
        )
    return [tuple(row) for row in rows]


# yoyo records its applied-at times through sqlite3's default datetime
# adapter, deprecated since Python 3.12.
@pytest.mark.filterwarnings("ignore:The default datetime adapter is deprecated:DeprecationWarning")
async def test_yoyo_applies_the_sql_directory(empty_db: TestDB, tmp_path: pathlib.Path) -> None:
    dialect = empty_db.dialect
    migrations_dir = tmp_path / "migrations"
    migrations_dir.mkdir()
    for migration in kms_async.migrations(dialect):
        shipped = SQL_DIR / dialect / migration.name
        assert shipped.read_text(encoding="utf-8") == migration.sql
        (migrations_dir / migration.name).write_text(migration.sql, encoding="utf-8")

    if dialect == "sqlite":
        url = empty_db.dsn  # sqlite:////absolute/path: yoyo and kms_async agree
    else:
        assert POSTGRES_DSN is not None
        parts = urllib.parse.urlsplit(POSTGRES_DSN)
        # yoyo's postgresql:// is psycopg2; its schema= sets search_path.
        url = urllib.parse.urlunsplit(
            parts._replace(query=urllib.parse.urlencode({"schema": empty_db.schema}))
        )
    backend = yoyo.get_backend(url)
    try:
        migrations = yoyo.read_migrations(str(migrations_dir))
        assert [m.id for m in migrations] == [
            m.name.removesuffix(".sql") for m in kms_async.migrations(dialect)
        ]
        with backend.lock():
            backend.apply_migrations(backend.to_apply(migrations))
        assert not backend.to_apply(yoyo.read_migrations(str(migrations_dir)))
    finally:
        backend.connection.close()

    assert await empty_db.fetchval("select version from kms_schema_version") == "v0.0.2"
    await _use_the_kms(empty_db)
    if dialect == "sqlite":
        # yoyo's statement splitting kept the trigger bodies whole.
        conn = sqlite3.connect(empty_db.dsn[len("sqlite:///") :])
        try:
            count = conn.execute(
                "select count(*) from sqlite_master where type = 'trigger' and name like 'kms%'"
            ).fetchone()[0]
        finally:
            conn.close()
        assert count == _sqlite_trigger_count()


def _sqlite_trigger_count() -> int:
    text = (SQL_DIR / "sqlite" / "01_kms_core.up.sql").read_text(encoding="utf-8").lower()
    return sum(1 for line in text.splitlines() if line.startswith("create trigger"))
