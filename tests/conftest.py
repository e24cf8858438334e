"""Fixtures shared by the suite: every storage test runs on SQLite and PostgreSQL.

PostgreSQL comes from ``KMS_TEST_POSTGRES_DSN``. Each test gets a fresh schema
on that server (dropped afterwards) and a DSN whose ``search_path`` points at
it, so tests never see each other's tables. Without the variable the
postgres cases skip locally; under CI (``CI`` set) they fail instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Callable
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
    flight for as long as the test wants. With ``fail`` it then raises.
    """

    def __init__(self, inner: kms_async.AeadWrapper, *, fail: bool = False) -> None:
        super().__init__(inner)
        self.fail = fail
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def decrypt(self, blob: kms_async.BlobInfo, *, aad: bytes | None = None) -> bytes:
        self.entered.set()
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("the root key service is down")
        return await super().decrypt(blob, aad=aad)


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
                await conn.execute(sql.replace("$", "?"), args)
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = await self.connect()
        try:
            if self.dialect == "postgres":
                return [tuple(r) for r in await conn.fetch(sql, *args)]
            return [tuple(r) for r in await conn.execute_fetchall(sql.replace("$", "?"), args)]
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


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[TestDB]:
    """A migrated, empty database: SQLite in a temp file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        test_db = TestDB("sqlite", f"sqlite:///{tmp_path}/kms.db")
        await kms_async.migrate(test_db.dsn)
        yield test_db
        return
    if not POSTGRES_DSN:
        if os.environ.get("CI"):
            pytest.fail("KMS_TEST_POSTGRES_DSN is not set; CI must run the PostgreSQL cases")
        pytest.skip("set KMS_TEST_POSTGRES_DSN=postgresql://... to run the PostgreSQL cases")
    schema = "t_" + secrets.token_hex(6)
    admin = await asyncpg.connect(POSTGRES_DSN)
    try:
        await admin.execute(f"create schema {schema}")
        test_db = TestDB("postgres", _with_search_path(POSTGRES_DSN, schema), schema)
        await kms_async.migrate(test_db.dsn)
        yield test_db
    finally:
        await admin.execute(f"drop schema if exists {schema} cascade")
        await admin.close()


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
        return await kms_async.KMS.open(db.dsn, **kwargs)

    return opener
