"""Fixtures shared by the suite: every storage test runs on SQLite and PostgreSQL.

PostgreSQL comes from ``KMS_TEST_POSTGRES_DSN``. Each test gets a fresh schema
on that server (dropped afterwards) and a DSN whose ``search_path`` points at
it, so tests never see each other's tables. Without the variable the
postgres cases skip locally; under CI (``CI`` set) they fail instead.

The schema is migrated once per session and cloned per test: SQLite copies
a migrated file; PostgreSQL runs the schema files ``kms_async.migrate``
applied to the session's template, all in one transaction and one round
trip, and the first clone is compared object by object with the template.
A thread makes the next clones and drops used ones while tests run.
(Measured on PostgreSQL 15 with two cores: migrate() 50 ms a schema, the
one-transaction clone 27 ms and its drop 11 ms, ``create database ...
template`` 55-100 ms plus 25-75 ms to drop, ``strategy file_copy`` slower
still.)
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import pathlib
import re
import secrets
import shutil
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import aiosqlite
import asyncpg
import pytest

import kms_async

POSTGRES_DSN = os.environ.get("KMS_TEST_POSTGRES_DSN")
PURPOSES = ["database", "oidc"]


class CountingWrapper:
    """A root wrapper that counts its decrypt calls (the expensive, remote ones)."""

    def __init__(self, inner: kms_async.AeadWrapper) -> None:
        self.inner = inner
        self.decrypts = 0

    @property
    def key_id(self) -> str:
        return self.inner.key_id

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> kms_async.BlobInfo:
        return await self.inner.encrypt(plaintext, aad=aad)

    async def decrypt(self, blob: kms_async.BlobInfo, *, aad: bytes | None = None) -> bytes:
        self.decrypts += 1
        return await self.inner.decrypt(blob, aad=aad)


class GatedWrapper(CountingWrapper):
    """A root wrapper whose decrypt waits until the test opens the gate.

    It stands for a slow root key service: a cold load that needs it stays in
    flight for as long as the test wants. With ``fail`` it then raises. With
    ``first_only`` only the first call waits: later ones (a rotation proving
    possession of the root key, say) go through while it is parked.
    """

    def __init__(
        self, inner: kms_async.AeadWrapper, *, fail: bool = False, first_only: bool = False
    ) -> None:
        super().__init__(inner)
        self.fail = fail
        self.first_only = first_only
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def decrypt(self, blob: kms_async.BlobInfo, *, aad: bytes | None = None) -> bytes:
        if self.first_only and self.entered.is_set():
            return await super().decrypt(blob, aad=aad)
        self.entered.set()
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("the root key service is down")
        return await super().decrypt(blob, aad=aad)


_PLACEHOLDER = re.compile(r"\$(\d+)")


def sqlite_sql(sql: str) -> str:
    """A statement written with ``$n`` as sqlite3 takes it: ``:pn``, bound by :func:`sqlite_args`.

    (sqlite3's ``?n`` would do, but Python 3.12.0-3.12.3 warn whenever ``?n``
    is bound from a sequence: CPython gh-117995.)
    """
    return _PLACEHOLDER.sub(r":p\1", sql)


def sqlite_args(args: Sequence[Any]) -> dict[str, Any]:
    """The arguments of a :func:`sqlite_sql` statement: ``args[0]`` binds ``:p1``."""
    return {f"p{n}": value for n, value in enumerate(args, 1)}


def _with_search_path(dsn: str, schema: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query)
    query.append(("search_path", schema))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@dataclasses.dataclass
class TestDB:
    """One empty database of either dialect, migrated with the kms schema."""

    __test__ = False

    dialect: str
    dsn: str
    schema: str | None = None

    async def connect(self) -> Any:
        """A raw driver connection to the same database (the caller closes it)."""
        if self.dialect == "postgres":
            return await asyncpg.connect(self.dsn)
        conn = await aiosqlite.connect(self.dsn[len("sqlite:///") :], isolation_level=None)
        await conn.execute("pragma foreign_keys = on")
        await conn.execute("pragma busy_timeout = 5000")
        return conn

    async def execute(self, sql: str, *args: Any) -> None:
        """Run one statement on a fresh connection ($n placeholders work on both)."""
        conn = await self.connect()
        try:
            if self.dialect == "postgres":
                await conn.execute(sql, *args)
            else:
                await conn.execute(sqlite_sql(sql), sqlite_args(args))
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = await self.connect()
        try:
            if self.dialect == "postgres":
                return [tuple(r) for r in await conn.fetch(sql, *args)]
            rows = await conn.execute_fetchall(sqlite_sql(sql), sqlite_args(args))
            return [tuple(r) for r in rows]
        finally:
            await conn.close()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    async def add_app_table(self, name: str = "app_secret") -> None:
        """An application table referencing data key versions with a restrict FK."""
        await self.execute(
            f"create table {name} ("
            " id text primary key,"
            " scope_id text not null,"
            " key_version_id text not null"
            "  references kms_data_key_version(private_id) on delete restrict on update cascade,"
            " ciphertext bytea not null)"
        )


#: For tests of argument checks that refuse before any storage is touched:
#: both dialects would run the same Python, so they run on SQLite only. Tests
#: of how either database stores or refuses a value stay on both.
input_validation = pytest.mark.parametrize("db", ["sqlite"], indirect=True)


async def root_versions(db: TestDB) -> dict[str, list[int]]:
    """Each scope's root key version numbers, ascending."""
    found: dict[str, list[int]] = {}
    for scope, version in await db.fetch(
        "select r.scope_id, v.version from kms_root_key r"
        " join kms_root_key_version v on v.root_key_id = r.private_id"
    ):
        found.setdefault(str(scope), []).append(int(version))
    return {key: sorted(v) for key, v in found.items()}


async def data_versions(db: TestDB) -> dict[tuple[str, str], list[int]]:
    """Each (scope, purpose)'s data key version numbers, ascending."""
    found: dict[tuple[str, str], list[int]] = {}
    for scope, purpose, version in await db.fetch(
        "select r.scope_id, k.purpose, v.version from kms_root_key r"
        " join kms_data_key k on k.root_key_id = r.private_id"
        " join kms_data_key_version v on v.data_key_id = k.private_id"
    ):
        found.setdefault((str(scope), str(purpose)), []).append(int(version))
    return {key: sorted(v) for key, v in found.items()}


class _Templates:
    """The session's migrated templates, made on first use."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self._sqlite: pathlib.Path | None = None
        self._postgres: _PgSchemas | None = None

    async def sqlite_file(self) -> pathlib.Path:
        if self._sqlite is None:
            path = self.directory / "template.db"
            await kms_async.migrate(f"sqlite:///{path}")
            # A plain file copy is a whole database only once every
            # connection is closed and the WAL is checkpointed away.
            leftovers = sorted(p.name for p in self.directory.glob("template.db-*"))
            assert not leftovers, f"the SQLite template left {leftovers} behind"
            self._sqlite = path
        return self._sqlite

    async def postgres_schema(self) -> str:
        """A new schema holding what ``kms_async.migrate`` makes; hand it to ``postgres_done``."""
        if self._postgres is not None:
            return self._postgres.take()
        assert POSTGRES_DSN is not None
        template, schema = "tpl_" + secrets.token_hex(6), "t_" + secrets.token_hex(6)
        admin = await asyncpg.connect(POSTGRES_DSN)
        try:
            await admin.execute(f"create schema {template}")
            applied = await kms_async.migrate(_with_search_path(POSTGRES_DSN, template))
            await admin.execute(_pg_clone_script(schema, applied))
            expected = await _pg_objects(admin, template)
            got = await _pg_objects(admin, schema)
            if got != expected:
                await admin.execute(f"drop schema {schema} cascade")
                raise AssertionError(
                    "the per-test PostgreSQL clone differs from what kms_async.migrate made; "
                    "update _pg_clone_script in tests/conftest.py"
                )
        finally:
            await admin.execute(f"drop schema if exists {template} cascade")
            await admin.close()
        self._postgres = _PgSchemas(POSTGRES_DSN, applied)
        return schema

    def postgres_done(self, schema: str) -> None:
        assert self._postgres is not None
        self._postgres.drop_later(schema)

    def close(self) -> None:
        if self._postgres is not None:
            self._postgres.close()


class _PgSchemas:
    """Makes the per-test PostgreSQL schemas ahead of time, and drops used ones, on a thread.

    Making a schema (about 27 ms of server work) and dropping it (about 11 ms)
    need not hold up a test: while one test runs, this thread readies the
    next schemas and drops the previous one, over a connection of its own
    (psycopg2, as the thread has no event loop).
    """

    AHEAD = 2

    def __init__(self, dsn: str, applied: list[str]) -> None:
        import psycopg2

        self._conn = psycopg2.connect(dsn)
        self._conn.autocommit = True
        with self._conn.cursor() as cursor:
            # A schema a test left locked (an unclosed connection in a
            # transaction) fails the next test that waits for a schema,
            # naming it, instead of stalling the suite.
            cursor.execute("set lock_timeout = '20s'")
        self._applied = applied
        self._ready: collections.deque[str] = collections.deque()
        self._used: collections.deque[str] = collections.deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="test-schemas", daemon=True)
        self._thread.start()

    def take(self) -> str:
        with self._changed:
            while True:
                if self._failure is not None:
                    raise RuntimeError("making or dropping a test schema failed") from (
                        self._failure
                    )
                if self._ready:
                    self._changed.notify_all()
                    return self._ready.popleft()
                self._changed.wait()

    def drop_later(self, schema: str) -> None:
        with self._changed:
            self._used.append(schema)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join()
        try:
            for schema in (*self._ready, *self._used):
                self._execute(f"drop schema if exists {schema} cascade")
        finally:
            self._conn.close()

    def _execute(self, sql: str) -> None:
        with self._conn.cursor() as cursor:
            cursor.execute(sql)

    def _next_job(self) -> tuple[str, str] | None:
        with self._changed:
            while True:
                if self._stopping or self._failure is not None:
                    return None
                # A test may be waiting for a schema: make one before dropping.
                if self._ready and self._used:
                    schema = self._used.popleft()
                    return schema, f"drop schema if exists {schema} cascade"
                if len(self._ready) < self.AHEAD:
                    schema = "t_" + secrets.token_hex(6)
                    return schema, _pg_clone_script(schema, self._applied)
                self._changed.wait()

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            schema, sql = job
            try:
                self._execute(sql)
            except BaseException as exc:
                with self._changed:
                    self._failure = exc
                    self._changed.notify_all()
                return
            if sql.startswith("begin"):
                with self._changed:
                    self._ready.append(schema)
                    self._changed.notify_all()


def _pg_clone_script(schema: str, applied: list[str]) -> str:
    """The schema files ``migrate`` applied, and its record of them, as one transaction."""
    sql = {m.name: m.sql for m in kms_async.migrations("postgres")}
    # The tracking table as kms_async.migrate creates it (_pg_objects checks).
    statements = [
        "begin",
        f"create schema {schema}",
        f"set local search_path to {schema}",
        "create table kms_migration ("
        " name text primary key,"
        " applied_at timestamp not null default current_timestamp)",
    ]
    for name in applied:
        quoted = name.replace("'", "''")
        statements += [sql[name], f"insert into kms_migration (name) values ('{quoted}')"]
    statements.append("commit")
    return "\n;\n".join(statements)


_PG_OBJECTS = """
select 'column', table_name || '.' || column_name || ' ' || data_type || ' '
       || is_nullable || ' ' || coalesce(column_default, '')
  from information_schema.columns where table_schema = $1
union all
select 'constraint', c.relname || ' ' || k.conname || ' ' || pg_get_constraintdef(k.oid)
  from pg_constraint k join pg_class c on c.oid = k.conrelid
  join pg_namespace n on n.oid = c.relnamespace where n.nspname = $1
union all
select 'index', indexdef from pg_indexes where schemaname = $1
union all
select 'trigger', pg_get_triggerdef(t.oid) from pg_trigger t
  join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
 where n.nspname = $1 and not t.tgisinternal
union all
select 'function', pg_get_functiondef(p.oid) from pg_proc p
  join pg_namespace n on n.oid = p.pronamespace where n.nspname = $1
union all
select 'comment', c.relname || ' ' || coalesce(obj_description(c.oid, 'pg_class'), '')
  from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = $1
"""


async def _pg_objects(admin: Any, schema: str) -> list[str]:
    """Every object of ``schema`` as text with the schema's name taken out, and its rows."""
    rows = [f"{kind} {text}" for kind, text in await admin.fetch(_PG_OBJECTS, schema)]
    tables = await admin.fetch("select tablename from pg_tables where schemaname = $1", schema)
    for (table,) in tables:
        count = await admin.fetchval(f'select count(*) from {schema}."{table}"')
        rows.append(f"rows {table} {count}")
    rows += [
        f"version {v}"
        for (v,) in await admin.fetch(f"select version from {schema}.kms_schema_version")
    ]
    rows += [
        f"applied {name}"
        for (name,) in await admin.fetch(f"select name from {schema}.kms_migration order by 1")
    ]
    return sorted(row.replace(schema, "<schema>") for row in rows)


@pytest.fixture(scope="session")
def _templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Templates]:
    templates = _Templates(tmp_path_factory.mktemp("template"))
    try:
        yield templates
    finally:
        templates.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def db(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, _templates: _Templates
) -> AsyncIterator[TestDB]:
    """A migrated, empty database: SQLite in a temp file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        path = tmp_path / "kms.db"
        shutil.copyfile(await _templates.sqlite_file(), path)
        yield TestDB("sqlite", f"sqlite:///{path}")
        return
    if not POSTGRES_DSN:
        if os.environ.get("CI"):
            pytest.fail("KMS_TEST_POSTGRES_DSN is not set; CI must run the PostgreSQL cases")
        pytest.skip("set KMS_TEST_POSTGRES_DSN=postgresql://... to run the PostgreSQL cases")
    schema = await _templates.postgres_schema()
    try:
        yield TestDB("postgres", _with_search_path(POSTGRES_DSN, schema), schema)
    finally:
        _templates.postgres_done(schema)


@pytest.fixture
def root_wrapper() -> kms_async.AeadWrapper:
    return kms_async.AeadWrapper(secrets.token_bytes(32), key_id="root-1")


@pytest.fixture
async def kms(db: TestDB, root_wrapper: kms_async.AeadWrapper) -> AsyncIterator[kms_async.KMS]:
    """A KMS over ``db`` with purposes database and oidc; no background refresh, and
    versions revocable as soon as they are superseded (a single instance)."""
    instance = await kms_async.KMS.open(
        db.dsn, purposes=PURPOSES, root_wrapper=root_wrapper, max_staleness=None, revoke_grace=0
    )
    async with instance:
        yield instance


@pytest.fixture
def open_kms(db: TestDB, root_wrapper: kms_async.AeadWrapper) -> Callable[..., Any]:
    """Open more KMS instances over ``db`` (closed by the caller)."""

    async def opener(**kwargs: Any) -> kms_async.KMS:
        kwargs.setdefault("purposes", PURPOSES)
        kwargs.setdefault("root_wrapper", root_wrapper)
        kwargs.setdefault("max_staleness", None)
        kwargs.setdefault("revoke_grace", 0)
        # Many tests park or count the root wrapper's calls; the open-time
        # check (up to three calls) has tests of its own.
        kwargs.setdefault("check_root_wrapper", False)
        return await kms_async.KMS.open(db.dsn, **kwargs)

    return opener
