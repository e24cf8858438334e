"""Tests for the core schema files in sql/postgres and sql/sqlite.

The same behaviour is checked on both dialects. Each test gets a fresh
database: a temporary SQLite file, or a PostgreSQL schema with a random name
that is dropped afterwards. PostgreSQL tests need KMS_TEST_POSTGRES_DSN; they
are skipped without it, except under CI where a missing DSN is a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import pytest
import pytest_asyncio

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
CORE_FILES = {
    "postgres": SQL_DIR / "postgres" / "01_kms_core.up.sql",
    "sqlite": SQL_DIR / "sqlite" / "01_kms_core.up.sql",
}
DIALECTS = ["sqlite", "postgres"]
KEY_TABLES = ["kms_root_key", "kms_root_key_version", "kms_data_key", "kms_data_key_version"]
ALL_TABLES = ["kms_schema_version", "kms_collection_version", *KEY_TABLES]

# A value in the past, written as an SQL literal so that it is valid for
# timestamp, timestamptz and SQLite text columns alike.
OLD_TIME = "'2000-01-01 00:00:00'"


def core_sql(dialect: str, prefix: str = "kms_") -> str:
    text = CORE_FILES[dialect].read_text()
    return re.sub(r"\bkms_", prefix, text)


def later_sql(dialect: str, prefix: str = "kms_") -> list[str]:
    """The files after the core one, in order (what migrate() applies next)."""
    paths = sorted((SQL_DIR / dialect).glob("*.up.sql"))
    return [re.sub(r"\bkms_", prefix, p.read_text()) for p in paths if p != CORE_FILES[dialect]]


async def apply_all(db: Db, prefix: str = "kms_") -> None:
    await db.apply(core_sql(db.dialect, prefix))
    for text in later_sql(db.dialect, prefix):
        await db.apply(text)


# --------------------------------------------------------------------------
# Database access shared by both dialects
# --------------------------------------------------------------------------

_PARAM = re.compile(r"\$(\d+)")


def _to_qmark(sql: str, args: Sequence[Any]) -> tuple[str, tuple[Any, ...]]:
    """Rewrite $1-style placeholders as ? and order the arguments to match."""
    order = [int(n) - 1 for n in _PARAM.findall(sql)]
    return _PARAM.sub("?", sql), tuple(args[i] for i in order)


class Db:
    """A minimal async facade over asyncpg and aiosqlite; SQL uses $1 placeholders."""

    def __init__(self, dialect: str, conn: Any, schema: str | None = None) -> None:
        self.dialect = dialect
        self.conn = conn
        self.schema = schema  # PostgreSQL only

    @property
    def is_pg(self) -> bool:
        return self.dialect == "postgres"

    async def apply(self, text: str) -> None:
        """Run a whole schema file the way a migration tool would."""
        if self.is_pg:
            await self.conn.execute(text)
        else:
            await self.conn.executescript(text)

    async def execute(self, sql: str, *args: Any) -> None:
        if self.is_pg:
            await self.conn.execute(sql, *args)
        else:
            sql, params = _to_qmark(sql, args)
            async with self.conn.execute(sql, params):
                pass

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if self.is_pg:
            return [tuple(r) for r in await self.conn.fetch(sql, *args)]
        sql, params = _to_qmark(sql, args)
        async with self.conn.execute(sql, params) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def fetchval(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        assert len(rows) == 1, rows
        return rows[0][0]

    def rejects(self, pattern: str) -> Any:
        """Expect the database to refuse a statement with a message matching pattern."""
        error = asyncpg.PostgresError if self.is_pg else sqlite3.IntegrityError
        return pytest.raises(error, match=f"(?i){pattern}")


def _postgres_dsn() -> str:
    dsn = os.environ.get("KMS_TEST_POSTGRES_DSN")
    if dsn:
        return dsn
    if os.environ.get("CI"):
        pytest.fail("KMS_TEST_POSTGRES_DSN must be set in CI", pytrace=False)
    pytest.skip("set KMS_TEST_POSTGRES_DSN (e.g. postgresql://postgres@127.0.0.1:5432/postgres)")


@contextlib.asynccontextmanager
async def _open_postgres() -> AsyncIterator[Db]:
    dsn = _postgres_dsn()
    schema = f"schema_test_{secrets.token_hex(8)}"
    quiet = {"client_min_messages": "warning"}
    admin = await asyncpg.connect(dsn, server_settings=quiet)
    try:
        await admin.execute(f'create schema "{schema}"')
        conn = await asyncpg.connect(dsn, server_settings={**quiet, "search_path": schema})
        try:
            yield Db("postgres", conn, schema)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'drop schema if exists "{schema}" cascade')
        await admin.close()


@contextlib.asynccontextmanager
async def _open_sqlite(path: Path) -> AsyncIterator[Db]:
    # isolation_level=None: autocommit, so a failed statement leaves no
    # transaction open behind it.
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        await conn.execute("pragma foreign_keys = on")
        yield Db("sqlite", conn)


@contextlib.asynccontextmanager
async def open_db(dialect: str, tmp_path: Path) -> AsyncIterator[Db]:
    if dialect == "postgres":
        async with _open_postgres() as db:
            yield db
    else:
        async with _open_sqlite(tmp_path / "kms.db") as db:
            yield db


@pytest_asyncio.fixture(params=DIALECTS)
async def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    """A fresh database with nothing applied."""
    async with open_db(request.param, tmp_path) as db:
        yield db


@pytest_asyncio.fixture
async def db(empty_db: Db) -> AsyncIterator[Db]:
    """A fresh database with every shipped file applied."""
    await apply_all(empty_db)
    yield empty_db


@pytest_asyncio.fixture
async def pg_db(tmp_path: Path) -> AsyncIterator[Db]:
    """A fresh, empty PostgreSQL schema, for PostgreSQL-only tests."""
    async with open_db("postgres", tmp_path) as db:
        yield db


# --------------------------------------------------------------------------
# Row helpers
# --------------------------------------------------------------------------


async def add_root_key(db: Db, pid: str, scope: str, p: str = "kms_") -> None:
    await db.execute(f"insert into {p}root_key (private_id, scope_id) values ($1, $2)", pid, scope)


async def add_rkv(
    db: Db, pid: str, root_key_id: str, version: Any = ..., key: bytes = b"rk", p: str = "kms_"
) -> int:
    """Insert a root key version and return the version the database assigned."""
    if version is ...:
        await db.execute(
            f"insert into {p}root_key_version (private_id, root_key_id, key) values ($1, $2, $3)",
            pid,
            root_key_id,
            key,
        )
    else:
        await db.execute(
            f"insert into {p}root_key_version (private_id, root_key_id, version, key)"
            " values ($1, $2, $3, $4)",
            pid,
            root_key_id,
            version,
            key,
        )
    return int(
        await db.fetchval(f"select version from {p}root_key_version where private_id = $1", pid)
    )


async def add_data_key(db: Db, pid: str, root_key_id: str, purpose: str) -> None:
    await db.execute(
        "insert into kms_data_key (private_id, root_key_id, purpose) values ($1, $2, $3)",
        pid,
        root_key_id,
        purpose,
    )


async def add_dkv(
    db: Db, pid: str, data_key_id: str, rkv_id: str, version: Any = ..., key: bytes = b"dk"
) -> int:
    """Insert a data key version and return the version the database assigned."""
    if version is ...:
        await db.execute(
            "insert into kms_data_key_version (private_id, data_key_id, root_key_version_id, key)"
            " values ($1, $2, $3, $4)",
            pid,
            data_key_id,
            rkv_id,
            key,
        )
    else:
        await db.execute(
            "insert into kms_data_key_version"
            " (private_id, data_key_id, root_key_version_id, version, key)"
            " values ($1, $2, $3, $4, $5)",
            pid,
            data_key_id,
            rkv_id,
            version,
            key,
        )
    return int(
        await db.fetchval("select version from kms_data_key_version where private_id = $1", pid)
    )


async def seed_keys(db: Db) -> None:
    """Two root keys, each with one version, one data key and one data key version."""
    for n in ("1", "2"):
        await add_root_key(db, f"r{n}", f"scope{n}")
        await add_rkv(db, f"rkv{n}", f"r{n}")
        await add_data_key(db, f"d{n}", f"r{n}", "database")
        await add_dkv(db, f"dkv{n}", f"d{n}", f"rkv{n}")


async def ids(db: Db, table: str) -> list[str]:
    return [r[0] for r in await db.fetch(f"select private_id from {table} order by private_id")]


# --------------------------------------------------------------------------
# The files themselves
# --------------------------------------------------------------------------

_CREATED = re.compile(
    r"\b(?:create\s+(?:unique\s+)?(?:table|index|trigger|function)|constraint)\s+(\w+)", re.I
)


def _strip_comments(text: str) -> str:
    # the files never put "--" inside a string literal
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


def _strip_strings(code: str) -> str:
    return re.sub(r"'[^']*'", "''", code)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_file_is_plain_script(dialect: str) -> None:
    code = _strip_comments(core_sql(dialect))
    assert not re.search(r"^\s*\\", code, re.M), "psql meta-command"
    assert not re.search(r"\b(begin\s+transaction|commit|rollback|savepoint)\b", code, re.I)
    assert not re.search(r"^\s*begin\s*;", code, re.I | re.M)
    assert not re.search(r"\bif\s+not\s+exists\b", code, re.I)
    # SQLAlchemy text(), used by Alembic's op.execute, reads ":name" as a bind parameter
    assert not re.search(r"(?<!:):[A-Za-z_]", _strip_strings(code))
    keywords = r"\b(?:CREATE|TABLE|INSERT|SELECT|UPDATE|TRIGGER|NOT|NULL)\b"
    assert not re.findall(keywords, _strip_strings(code)), "keywords are lower-case"


@pytest.mark.parametrize("dialect", DIALECTS)
def test_prefix_only_appears_as_object_name_prefix(dialect: str) -> None:
    text = core_sql(dialect)
    created = set(_CREATED.findall(_strip_strings(_strip_comments(text))))
    assert len(created) > 20, sorted(created)
    assert all(name.startswith("kms_") for name in created), sorted(created)
    # every occurrence of the prefix starts a word, and each such word is a
    # name this file defines
    assert text.count("kms_") == len(re.findall(r"\bkms_", text))
    assert set(re.findall(r"\bkms_\w+", text)) <= created
    assert "kms_" not in core_sql(dialect, "acme_")


def test_pg_trigger_functions_name_no_table() -> None:
    text = core_sql("postgres")
    bodies = re.findall(r"\$\$(.*?)\$\$", text, re.S)
    assert len(bodies) >= 4
    for body in bodies:
        assert "kms_" not in body


# --------------------------------------------------------------------------
# Seeds and one-row tables
# --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_seed_rows(db: Db) -> None:
    assert await db.fetch("select version from kms_schema_version") == [("v0.0.2",)]
    assert await db.fetch("select version from kms_collection_version") == [(1,)]


@pytest.mark.asyncio
async def test_one_row_tables_reject_second_row(db: Db) -> None:
    with db.rejects("kms_schema_version_one_row"):
        await db.execute("insert into kms_schema_version (version) values ('v9.9.9')")
    with db.rejects("kms_collection_version_one_row"):
        await db.execute("insert into kms_collection_version (version) values (5)")
    assert await db.fetchval("select count(*) from kms_schema_version") == 1
    assert await db.fetchval("select count(*) from kms_collection_version") == 1


@pytest.mark.asyncio
async def test_collection_version_must_be_positive(db: Db) -> None:
    for bad in (0, -1):
        with db.rejects("check constraint"):
            await db.execute("update kms_collection_version set version = $1", bad)
    with db.rejects("not.null constraint"):
        await db.execute("update kms_collection_version set version = null")


# --------------------------------------------------------------------------
# Non-blank ids, purpose, keys, uniqueness, foreign keys
# --------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("blank", ["", "   "])
@pytest.mark.parametrize("table", KEY_TABLES)
async def test_blank_private_id_rejected(db: Db, table: str, blank: str) -> None:
    await seed_keys(db)
    inserts: dict[str, Callable[[], Awaitable[object]]] = {
        "kms_root_key": lambda: add_root_key(db, blank, "scope9"),
        "kms_root_key_version": lambda: add_rkv(db, blank, "r1"),
        "kms_data_key": lambda: add_data_key(db, blank, "r1", "other"),
        "kms_data_key_version": lambda: add_dkv(db, blank, "d1", "rkv1"),
    }
    with db.rejects("check constraint"):
        await inserts[table]()
    assert blank not in await ids(db, table)


@pytest.mark.asyncio
async def test_null_private_id_rejected(db: Db) -> None:
    # SQLite lets NULL into a text primary key unless it is declared not null
    with db.rejects("not.null constraint"):
        await db.execute("insert into kms_root_key (private_id, scope_id) values (null, 's')")


@pytest.mark.asyncio
@pytest.mark.parametrize("scope", ["", "  "])
async def test_blank_scope_rejected(db: Db, scope: str) -> None:
    with db.rejects("check constraint"):
        await add_root_key(db, "r1", scope)


@pytest.mark.asyncio
async def test_scope_id_unique(db: Db) -> None:
    await add_root_key(db, "r1", "global")
    with db.rejects("unique constraint"):
        await add_root_key(db, "r2", "global")


@pytest.mark.asyncio
@pytest.mark.parametrize("purpose", [" database", "database ", " database "])
async def test_purpose_with_leading_or_trailing_space_rejected(db: Db, purpose: str) -> None:
    await add_root_key(db, "r1", "global")
    with db.rejects("kms_not_start_end_whitespace_purpose"):
        await add_data_key(db, "d1", "r1", purpose)


@pytest.mark.asyncio
async def test_purpose_unique_per_root_key(db: Db) -> None:
    await add_root_key(db, "r1", "scope1")
    await add_root_key(db, "r2", "scope2")
    await add_data_key(db, "d1", "r1", "session key")  # inner space is fine
    await add_data_key(db, "d2", "r2", "session key")  # same purpose, other root key
    with db.rejects("unique constraint"):
        await add_data_key(db, "d3", "r1", "session key")


@pytest.mark.asyncio
async def test_empty_key_rejected(db: Db) -> None:
    await seed_keys(db)
    with db.rejects("kms_not_empty_key"):
        await add_rkv(db, "rkv9", "r1", key=b"")
    with db.rejects("kms_not_empty_key"):
        await add_dkv(db, "dkv9", "d1", "rkv1", key=b"")
    with db.rejects("kms_not_empty_key"):
        await db.execute("update kms_root_key_version set key = $1 where private_id = 'rkv1'", b"")
    with db.rejects("kms_not_empty_key"):
        await db.execute("update kms_data_key_version set key = $1 where private_id = 'dkv1'", b"")


@pytest.mark.asyncio
async def test_foreign_keys_enforced(db: Db) -> None:
    await seed_keys(db)
    with db.rejects("foreign key constraint"):
        await add_rkv(db, "rkv9", "no-such-root-key")
    with db.rejects("foreign key constraint"):
        await add_data_key(db, "d9", "no-such-root-key", "x")
    with db.rejects("foreign key constraint"):
        await add_dkv(db, "dkv9", "no-such-data-key", "rkv1")
    with db.rejects("foreign key constraint"):
        await add_dkv(db, "dkv9", "d1", "no-such-rkv")


# --------------------------------------------------------------------------
# Version numbering
# --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_root_key_versions_numbered_per_root_key(db: Db) -> None:
    await add_root_key(db, "r1", "scope1")
    await add_root_key(db, "r2", "scope2")
    assert await add_rkv(db, "a", "r1") == 1
    assert await add_rkv(db, "b", "r1", version=None) == 2
    assert await add_rkv(db, "c", "r1", version=10) == 3  # supplied value ignored
    assert await add_rkv(db, "d", "r1") == 4
    assert await add_rkv(db, "e", "r2", version=7) == 1  # another root key starts at 1
    assert await add_rkv(db, "f", "r2") == 2


@pytest.mark.asyncio
async def test_data_key_versions_numbered_per_data_key(db: Db) -> None:
    await add_root_key(db, "r1", "scope1")
    await add_rkv(db, "rkv1", "r1")
    await add_data_key(db, "d1", "r1", "database")
    await add_data_key(db, "d2", "r1", "session")
    assert await add_dkv(db, "a", "d1", "rkv1") == 1
    assert await add_dkv(db, "b", "d1", "rkv1", version=None) == 2
    assert await add_dkv(db, "c", "d1", "rkv1", version=10) == 3
    assert await add_dkv(db, "d", "d2", "rkv1", version=5) == 1
    assert await add_dkv(db, "e", "d2", "rkv1") == 2
    assert await add_dkv(db, "f", "d1", "rkv1") == 4


@pytest.mark.asyncio
async def test_multi_row_insert_numbers_each_row(db: Db) -> None:
    await add_root_key(db, "r1", "scope1")
    await add_root_key(db, "r2", "scope2")
    await db.execute(
        "insert into kms_root_key_version (private_id, root_key_id, key) values"
        " ('a', 'r1', $1), ('b', 'r2', $1), ('c', 'r1', $1), ('d', 'r1', $1)",
        b"k",
    )
    rows = await db.fetch(
        "select private_id, version from kms_root_key_version order by private_id"
    )
    assert rows == [("a", 1), ("b", 1), ("c", 2), ("d", 3)]


@pytest.mark.asyncio
async def test_next_version_follows_renumbered_maximum(db: Db) -> None:
    await add_root_key(db, "r1", "scope1")
    await add_rkv(db, "a", "r1")
    await db.execute("update kms_root_key_version set version = 7 where private_id = 'a'")
    assert await add_rkv(db, "b", "r1") == 8


@pytest.mark.asyncio
@pytest.mark.parametrize("table", ["kms_root_key_version", "kms_data_key_version"])
async def test_version_update_to_null_or_non_positive_rejected(db: Db, table: str) -> None:
    await seed_keys(db)
    pid = "rkv1" if table == "kms_root_key_version" else "dkv1"
    with db.rejects("not.null constraint"):
        await db.execute(f"update {table} set version = null where private_id = $1", pid)
    for bad in (0, -3):
        with db.rejects("check constraint"):
            await db.execute(f"update {table} set version = $1 where private_id = $2", bad, pid)
    assert await db.fetchval(f"select version from {table} where private_id = $1", pid) == 1


@pytest.mark.asyncio
async def test_supplied_version_that_collides(db: Db) -> None:
    # The one place the dialects differ: PostgreSQL replaces the supplied
    # value before any constraint is checked; SQLite can only renumber after
    # the row is stored, so a supplied value that is invalid or already taken
    # is refused. The library never supplies one.
    await add_root_key(db, "r1", "scope1")
    await add_rkv(db, "a", "r1")
    if db.is_pg:
        assert await add_rkv(db, "b", "r1", version=1) == 2
        assert await add_rkv(db, "c", "r1", version=0) == 3
    else:
        with db.rejects("unique constraint"):
            await add_rkv(db, "b", "r1", version=1)
        with db.rejects("check constraint"):
            await add_rkv(db, "c", "r1", version=0)


# --------------------------------------------------------------------------
# Immutable and mutable columns
# --------------------------------------------------------------------------

# (table, row filter, column, new value as SQL)
IMMUTABLE = [
    ("kms_schema_version", "true", "create_time", OLD_TIME),
    ("kms_collection_version", "true", "create_time", OLD_TIME),
    ("kms_root_key", "private_id = 'r1'", "private_id", "'r9'"),
    ("kms_root_key", "private_id = 'r1'", "scope_id", "'scope9'"),
    ("kms_root_key", "private_id = 'r1'", "create_time", OLD_TIME),
    ("kms_root_key_version", "private_id = 'rkv1'", "private_id", "'rkv9'"),
    ("kms_root_key_version", "private_id = 'rkv1'", "root_key_id", "'r2'"),
    ("kms_root_key_version", "private_id = 'rkv1'", "create_time", OLD_TIME),
    ("kms_data_key", "private_id = 'd1'", "private_id", "'d9'"),
    ("kms_data_key", "private_id = 'd1'", "root_key_id", "'r2'"),
    ("kms_data_key", "private_id = 'd1'", "purpose", "'other'"),
    ("kms_data_key", "private_id = 'd1'", "create_time", OLD_TIME),
    ("kms_data_key_version", "private_id = 'dkv1'", "private_id", "'dkv9'"),
    ("kms_data_key_version", "private_id = 'dkv1'", "data_key_id", "'d2'"),
    ("kms_data_key_version", "private_id = 'dkv1'", "create_time", OLD_TIME),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("to_null", [False, True], ids=["value", "null"])
@pytest.mark.parametrize(
    ("table", "where", "column", "value"), IMMUTABLE, ids=[f"{t}.{c}" for t, _, c, _ in IMMUTABLE]
)
async def test_immutable_column_rejected(
    db: Db, table: str, where: str, column: str, value: str, to_null: bool
) -> None:
    await seed_keys(db)
    before = await db.fetch(f"select * from {table} where {where}")
    new_value = "null" if to_null else value
    with db.rejects(f"immutable column: {table}\\.{column}") as exc:
        await db.execute(f"update {table} set {column} = {new_value} where {where}")
    if db.is_pg:
        assert exc.value.sqlstate == "23601"
    assert await db.fetch(f"select * from {table} where {where}") == before


# (table, row filter, column, new value as SQL, value read back or None to skip)
MUTABLE = [
    ("kms_schema_version", "true", "version", "'v0.0.3'", "v0.0.3"),
    ("kms_schema_version", "true", "update_time", OLD_TIME, None),
    ("kms_collection_version", "true", "version", "2", 2),
    ("kms_collection_version", "true", "update_time", OLD_TIME, None),
    ("kms_root_key_version", "private_id = 'rkv1'", "version", "5", 5),
    ("kms_root_key_version", "private_id = 'rkv1'", "key", "$1", b"rewrapped"),
    ("kms_data_key_version", "private_id = 'dkv1'", "version", "5", 5),
    ("kms_data_key_version", "private_id = 'dkv1'", "key", "$1", b"rewrapped"),
    ("kms_data_key_version", "private_id = 'dkv1'", "root_key_version_id", "'rkv1b'", "rkv1b"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("table", "where", "column", "value", "expected"),
    MUTABLE,
    ids=[f"{t}.{c}" for t, _, c, _, _ in MUTABLE],
)
async def test_mutable_column_accepted(
    db: Db, table: str, where: str, column: str, value: str, expected: Any
) -> None:
    await seed_keys(db)
    await add_rkv(db, "rkv1b", "r1")
    args = [b"rewrapped"] if value == "$1" else []
    await db.execute(f"update {table} set {column} = {value} where {where}", *args)
    if expected is not None:
        assert await db.fetchval(f"select {column} from {table} where {where}") == expected


# --------------------------------------------------------------------------
# create_time and update_time
# --------------------------------------------------------------------------

CREATE_TIME_INSERTS = {
    "kms_schema_version": "insert into kms_schema_version (version, create_time)"
    " values ('v9', {t})",
    "kms_root_key": "insert into kms_root_key (private_id, scope_id, create_time)"
    " values ('x', 'scope9', {t})",
    "kms_root_key_version": "insert into kms_root_key_version (private_id, root_key_id, key,"
    " create_time) values ('x', 'r1', $1, {t})",
    "kms_data_key": "insert into kms_data_key (private_id, root_key_id, purpose, create_time)"
    " values ('x', 'r1', 'other', {t})",
    "kms_data_key_version": "insert into kms_data_key_version (private_id, data_key_id,"
    " root_key_version_id, key, create_time) values ('x', 'd1', 'rkv1', $1, {t})",
}


@pytest.mark.asyncio
@pytest.mark.parametrize("table", list(CREATE_TIME_INSERTS))
async def test_create_time_assigned_by_database(db: Db, table: str) -> None:
    await seed_keys(db)
    if table == "kms_schema_version":
        await db.execute("delete from kms_schema_version")
    sql = CREATE_TIME_INSERTS[table].format(t=OLD_TIME)
    args = [b"k"] if "$1" in sql else []
    if db.is_pg:
        # PostgreSQL overwrites the supplied value
        await db.execute(sql, *args)
        row_filter = "true" if table == "kms_schema_version" else "private_id = 'x'"
        assert await db.fetchval(
            f"select create_time > '2001-01-01' from {table} where {row_filter}"
        )
    else:
        # SQLite cannot rewrite NEW, so it refuses anything but the default
        with db.rejects("kms: create_time is assigned by the database"):
            await db.execute(sql, *args)
        assert await db.fetchval(f"select count(*) from {table}") == (
            0 if table == "kms_schema_version" else 2
        )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("table", "insert", "bump"),
    [
        (
            "kms_collection_version",
            f"insert into kms_collection_version (version, create_time, update_time)"
            f" values (1, {OLD_TIME}, {OLD_TIME})",
            "update kms_collection_version set version = version + 1",
        ),
        (
            # create_time cannot be back-dated here, only update_time
            "kms_schema_version",
            f"insert into kms_schema_version (version, update_time) values ('v0.0.2', {OLD_TIME})",
            "update kms_schema_version set version = 'v0.0.3'",
        ),
    ],
)
async def test_update_time_set_when_row_changes(db: Db, table: str, insert: str, bump: str) -> None:
    await db.execute(f"delete from {table}")
    await db.execute(insert)
    created = await db.fetchval(f"select create_time from {table}")

    await db.execute(f"update {table} set version = version")  # no change
    assert await db.fetchval(f"select update_time < '2001-01-01' from {table}")

    await db.execute(bump)
    assert await db.fetchval(f"select update_time > '2001-01-01' from {table}")
    assert await db.fetchval(f"select create_time from {table}") == created
    if not db.is_pg:
        # UTC, the same clock as current_timestamp, not localtime
        assert await db.fetchval(
            f"select abs(julianday(update_time) - julianday('now')) * 86400 < 60 from {table}"
        )


# --------------------------------------------------------------------------
# Cascades and references from application tables
# --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_delete_root_key_cascades(db: Db) -> None:
    await seed_keys(db)
    await db.execute("delete from kms_root_key where private_id = 'r1'")
    assert await ids(db, "kms_root_key") == ["r2"]
    assert await ids(db, "kms_root_key_version") == ["rkv2"]
    assert await ids(db, "kms_data_key") == ["d2"]
    assert await ids(db, "kms_data_key_version") == ["dkv2"]


@pytest.mark.asyncio
async def test_delete_root_key_version_cascades_to_its_data_key_versions(db: Db) -> None:
    await seed_keys(db)
    await add_rkv(db, "rkv1b", "r1")
    await add_dkv(db, "dkv1b", "d1", "rkv1b")
    await db.execute("delete from kms_root_key_version where private_id = 'rkv1'")
    assert await ids(db, "kms_root_key_version") == ["rkv1b", "rkv2"]
    assert await ids(db, "kms_data_key") == ["d1", "d2"]
    assert await ids(db, "kms_data_key_version") == ["dkv1b", "dkv2"]


@pytest.mark.asyncio
async def test_delete_data_key_cascades(db: Db) -> None:
    await seed_keys(db)
    await db.execute("delete from kms_data_key where private_id = 'd1'")
    assert await ids(db, "kms_data_key_version") == ["dkv2"]
    assert await ids(db, "kms_root_key_version") == ["rkv1", "rkv2"]


@pytest.mark.asyncio
async def test_application_reference_blocks_delete(db: Db) -> None:
    await seed_keys(db)
    await db.execute(
        "create table app_secret ("
        " id text primary key,"
        " key_version_id text not null"
        "  references kms_data_key_version (private_id) on delete restrict)"
    )
    await db.execute("insert into app_secret (id, key_version_id) values ('s1', 'dkv1')")
    for stmt in (
        "delete from kms_data_key_version where private_id = 'dkv1'",
        "delete from kms_root_key_version where private_id = 'rkv1'",
        "delete from kms_data_key where private_id = 'd1'",
        "delete from kms_root_key where private_id = 'r1'",
    ):
        with db.rejects("foreign key constraint"):
            await db.execute(stmt)
    assert await ids(db, "kms_data_key_version") == ["dkv1", "dkv2"]

    await db.execute("delete from app_secret")
    await db.execute("delete from kms_root_key where private_id = 'r1'")
    assert await ids(db, "kms_data_key_version") == ["dkv2"]


# --------------------------------------------------------------------------
# Catalog: names, indexes, comments
# --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_every_object_name_has_prefix(db: Db) -> None:
    if db.is_pg:
        names = await db.fetch(
            """
            select relname from pg_class where relnamespace = current_schema()::regnamespace
            union all
            select proname from pg_proc where pronamespace = current_schema()::regnamespace
            union all
            select conname from pg_constraint where connamespace = current_schema()::regnamespace
            union all
            select t.tgname from pg_trigger t join pg_class c on c.oid = t.tgrelid
             where c.relnamespace = current_schema()::regnamespace and not t.tgisinternal
            """
        )
    else:
        names = await db.fetch(
            "select name from sqlite_master"
            " where name not like 'sqlite\\_autoindex\\_%' escape '\\'"
        )
    assert names
    assert [n for (n,) in names if not n.startswith("kms_")] == []


@pytest.mark.asyncio
async def test_index_on_data_key_version_root_key_version_id(db: Db) -> None:
    if db.is_pg:
        indexes = await db.fetch(
            "select indexname, indexdef from pg_indexes"
            " where schemaname = current_schema() and tablename = 'kms_data_key_version'"
        )
        defs = dict(indexes)
        name = "kms_data_key_version_root_key_version_id_idx"
        assert "(root_key_version_id)" in defs[name]
    else:
        columns = await db.fetch(
            "select name from pragma_index_info('kms_data_key_version_root_key_version_id_idx')"
        )
        assert columns == [("root_key_version_id",)]


@pytest.mark.asyncio
async def test_pg_table_comments(pg_db: Db) -> None:
    await pg_db.apply(core_sql("postgres"))
    comments = dict(
        await pg_db.fetch(
            "select c.relname, obj_description(c.oid, 'pg_class') from pg_class c"
            " where c.relnamespace = current_schema()::regnamespace and c.relkind = 'r'"
        )
    )
    assert set(comments) == set(ALL_TABLES)
    expected_words = {
        "kms_schema_version": "schema",
        "kms_collection_version": "version",
        "kms_root_key": "root key",
        "kms_root_key_version": "versions of each root key",
        "kms_data_key": "data key",
        "kms_data_key_version": "versions of each data key",
    }
    for table, word in expected_words.items():
        comment = comments[table]
        assert comment and word in comment, (table, comment)
        assert comment.count(". ") == 0 and comment.endswith("."), "one sentence"


# --------------------------------------------------------------------------
# Re-targeting and schemas
# --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_two_prefixes_in_one_database(empty_db: Db) -> None:
    db = empty_db
    await apply_all(db, "kms_")
    await apply_all(db, "acme_")

    for p in ("kms_", "acme_"):
        assert await db.fetch(f"select version from {p}schema_version") == [("v0.0.2",)]
        assert await db.fetch(f"select version from {p}collection_version") == [(1,)]

    # the same ids in both sets of tables, numbered independently
    await add_root_key(db, "r1", "global", p="kms_")
    await add_root_key(db, "r1", "global", p="acme_")
    assert await add_rkv(db, "a", "r1", p="kms_") == 1
    assert await add_rkv(db, "b", "r1", p="kms_") == 2
    assert await add_rkv(db, "a", "r1", p="acme_") == 1
    assert await add_rkv(db, "c", "r1", p="kms_", version=10) == 3
    assert await add_rkv(db, "b", "r1", p="acme_") == 2

    with db.rejects(r"immutable column: acme_root_key\.scope_id"):
        await db.execute("update acme_root_key set scope_id = 'other'")
    with db.rejects("acme_not_empty_key"):
        await add_rkv(db, "z", "r1", key=b"", p="acme_")

    await db.execute("delete from acme_root_key")
    assert await db.fetchval("select count(*) from acme_root_key_version") == 0
    assert await db.fetchval("select count(*) from kms_root_key_version") == 3


@pytest.mark.asyncio
@pytest.mark.parametrize("files", ["core", "all"])
async def test_pg_tables_in_schema_not_on_search_path(pg_db: Db, files: str) -> None:
    db = pg_db
    if files == "all":
        await apply_all(db)
    else:
        await db.apply(core_sql("postgres"))
    await db.execute("set search_path to public")
    with pytest.raises(asyncpg.UndefinedTableError):
        await db.execute("select 1 from kms_root_key")

    s = f'"{db.schema}"'
    await db.execute(f"insert into {s}.kms_root_key (private_id, scope_id) values ('r1', 'global')")
    for pid, supplied in (("a", None), ("b", 10), ("c", None)):
        await db.execute(
            f"insert into {s}.kms_root_key_version (private_id, root_key_id, version, key)"
            " values ($1, 'r1', $2, $3)",
            pid,
            supplied,
            b"k",
        )
    await db.execute(
        f"insert into {s}.kms_data_key (private_id, root_key_id, purpose) values ('d1', 'r1', 'p')"
    )
    await db.execute(
        f"insert into {s}.kms_data_key_version (private_id, data_key_id, root_key_version_id, key)"
        " values ('x', 'd1', 'c', $1)",
        b"k",
    )
    rows = await db.fetch(f"select private_id, version from {s}.kms_root_key_version order by 1")
    assert rows == [("a", 1), ("b", 2), ("c", 3)]
    assert await db.fetchval(f"select version from {s}.kms_data_key_version") == 1

    with pytest.raises(asyncpg.PostgresError, match=r"immutable column: kms_root_key\.scope_id"):
        await db.execute(f"update {s}.kms_root_key set scope_id = 'other'")
    await db.execute(f"update {s}.kms_collection_version set version = 2")
    assert await db.fetchval(f"select version from {s}.kms_collection_version") == 2


# --------------------------------------------------------------------------
# File 02 (PostgreSQL): version numbering with static SQL
# --------------------------------------------------------------------------


async def _numbering_source(db: Db) -> str:
    return str(
        await db.fetchval(
            "select prosrc from pg_proc where proname = 'kms_next_version'"
            " and pronamespace = $1::regnamespace",
            db.schema,
        )
    )


@pytest.mark.asyncio
async def test_pg_file_02_takes_over_numbering_of_existing_rows(pg_db: Db) -> None:
    db = pg_db
    await db.apply(core_sql("postgres"))
    assert "execute" in await _numbering_source(db)
    await add_root_key(db, "r1", "global")
    assert await add_rkv(db, "a", "r1") == 1
    assert await add_rkv(db, "b", "r1") == 2
    await add_data_key(db, "d1", "r1", "database")
    assert await add_dkv(db, "x", "d1", "b") == 1

    for text in later_sql("postgres"):
        await db.apply(text)
        await db.apply(text)  # the later files are safe to run again
    source = await _numbering_source(db)
    assert "execute" not in source and "from kms_root_key_version" in source
    config = await db.fetchval(
        "select proconfig from pg_proc where proname = 'kms_next_version'"
        " and pronamespace = $1::regnamespace",
        db.schema,
    )
    assert config == [f"search_path={db.schema}, pg_temp"]

    assert await add_rkv(db, "c", "r1", version=40) == 3
    assert await add_dkv(db, "y", "d1", "c") == 2
    # one statement, several rows: each sees the ones before it
    await db.execute(
        "insert into kms_data_key_version (private_id, data_key_id, root_key_version_id, key)"
        " values ('z1', 'd1', 'c', 'k'), ('z2', 'd1', 'c', 'k')"
    )
    rows = await db.fetch("select private_id, version from kms_data_key_version order by 2")
    assert rows == [("x", 1), ("y", 2), ("z1", 3), ("z2", 4)]


@pytest.mark.asyncio
async def test_pg_numbering_reads_only_its_own_schema(pg_db: Db) -> None:
    db = pg_db
    await apply_all(db)
    decoy = f"decoy_{secrets.token_hex(6)}"
    await db.execute(f'create schema "{decoy}"')
    try:
        # A table of the same name, earlier on the caller's search_path.
        await db.execute(
            f'create table "{decoy}".kms_root_key_version (root_key_id text, version int)'
        )
        await db.execute(f"insert into \"{decoy}\".kms_root_key_version values ('r1', 100)")
        await db.execute(f'set search_path to "{decoy}", "{db.schema}"')
        await add_root_key(db, "r1", "global")
        s = f'"{db.schema}"'
        await db.execute(
            f"insert into {s}.kms_root_key_version (private_id, root_key_id, key)"
            " values ('a', 'r1', 'k')"
        )
        assert await db.fetchval(f"select version from {s}.kms_root_key_version") == 1
    finally:
        await db.execute(f'set search_path to "{db.schema}"')
        await db.execute(f'drop schema "{decoy}" cascade')


@pytest.mark.asyncio
async def test_pg_numbering_function_refuses_other_tables(pg_db: Db) -> None:
    db = pg_db
    await apply_all(db)
    await db.execute("create table kms_other (private_id text, version int)")
    await db.execute(
        "create trigger kms_other_number before insert on kms_other"
        " for each row execute function kms_next_version()"
    )
    with pytest.raises(asyncpg.PostgresError, match="numbers kms_data_key_version"):
        await db.execute("insert into kms_other values ('a', null)")
