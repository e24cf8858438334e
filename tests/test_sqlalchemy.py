"""examples/sqlalchemy_session.py: keys that commit and roll back with SQLAlchemy transactions."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import urllib.parse
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy.exc
from conftest import TestDB
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import kms_async


def _load_example(name: str) -> ModuleType:
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # SQLAlchemy resolves Mapped[...] annotations through it
    spec.loader.exec_module(module)
    return module


example = _load_example("sqlalchemy_session")
Tenant = example.Tenant
Secret = example.Secret


class Abort(Exception):
    pass


def engine_args(db: TestDB) -> tuple[str, dict[str, Any]]:
    """A SQLAlchemy URL (and engine kwargs) for the same database as ``db.dsn``."""
    if db.dialect == "sqlite":
        return "sqlite+aiosqlite:///" + db.dsn[len("sqlite:///") :], {}
    parts = urllib.parse.urlsplit(db.dsn)
    url = urllib.parse.urlunsplit(parts._replace(scheme="postgresql+asyncpg", query=""))
    # asyncpg takes search_path as a server setting, not as a connect() keyword.
    return url, {"connect_args": {"server_settings": {"search_path": db.schema}}}


@pytest.fixture
async def engine(db: TestDB) -> AsyncIterator[AsyncEngine]:
    url, kwargs = engine_args(db)
    engine = example.create_engine(url, **kwargs)
    async with engine.begin() as conn:
        await conn.run_sync(example.Base.metadata.create_all, tables=example.APP_TABLES)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _key_count(db: TestDB, tenant_id: str) -> int:
    return int(
        await db.fetchval("select count(*) from kms_root_key where scope_id = $1", tenant_id)
    )


async def test_tenant_and_keys_commit_together(
    db: TestDB, engine: AsyncEngine, kms: kms_async.KMS
) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await example.create_tenant(session, kms, "acme", "Acme")
    assert await db.fetch("select id, name from tenant") == [("acme", "Acme")]
    assert await _key_count(db, "acme") == 1

    async with AsyncSession(engine) as session, session.begin():
        stored = await example.store_secret(session, kms, "acme", "token", b"s3cr3t")
        version_id = stored.key_version_id
    async with AsyncSession(engine) as session:
        assert await example.read_secret(session, kms, "acme", "token") == b"s3cr3t"
        assert await example.read_secret(session, kms, "acme", "missing") is None
    assert version_id == (await kms.list_keys("acme"))[1].versions[0].id


async def test_tenant_and_keys_roll_back_together(
    db: TestDB, engine: AsyncEngine, kms: kms_async.KMS
) -> None:
    with pytest.raises(Abort):
        async with AsyncSession(engine) as session, session.begin():
            await example.create_tenant(session, kms, "acme")
            raise Abort
    async with AsyncSession(engine) as session:
        await example.create_tenant(session, kms, "beta")
        await session.rollback()

    assert await db.fetch("select id from tenant") == []
    assert await db.fetchval("select count(*) from kms_root_key") == 0
    with pytest.raises(kms_async.KeyNotFoundError):
        await kms.encrypt("acme", "database", b"x")
    # Nothing was left behind: the same tenant can be created again.
    async with AsyncSession(engine) as session, session.begin():
        await example.create_tenant(session, kms, "acme")
    assert await _key_count(db, "acme") == 1


async def test_refused_key_creation_leaves_the_session_usable(
    db: TestDB, engine: AsyncEngine, kms: kms_async.KMS
) -> None:
    await kms.create_keys("acme")
    async with AsyncSession(engine) as session, session.begin():
        session.add(Tenant(id="beta", name="Beta"))
        await session.flush()
        with pytest.raises(kms_async.KeyExistsError):
            await kms.create_keys("acme", conn=await example.kms_connection(session))
        # Only the key statements rolled back (to a savepoint); beta stays.
        session.add(Tenant(id="gamma"))
        await kms.create_keys("gamma", conn=await example.kms_connection(session))
    assert await db.fetch("select id from tenant order by id") == [("beta",), ("gamma",)]
    assert await db.fetch("select scope_id from kms_root_key order by scope_id") == [
        ("acme",),
        ("gamma",),
    ]


async def test_keys_before_any_statement_of_the_transaction(
    db: TestDB, engine: AsyncEngine, kms: kms_async.KMS
) -> None:
    # SQLAlchemy begins lazily; kms_connection makes sure the driver is in the transaction.
    with pytest.raises(Abort):
        async with AsyncSession(engine) as session, session.begin():
            await kms.create_keys("acme", conn=await example.kms_connection(session))
            raise Abort
    assert await db.fetchval("select count(*) from kms_root_key") == 0

    async with AsyncSession(engine) as session, session.begin():
        await kms.create_keys("acme", conn=await example.kms_connection(session))
        session.add(Tenant(id="acme"))
    assert await _key_count(db, "acme") == 1
    assert await db.fetchval("select count(*) from tenant") == 1


async def test_core_async_connection(db: TestDB, engine: AsyncEngine, kms: kms_async.KMS) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(Tenant.__table__).values(id="acme", name="Acme"))
        await kms.create_keys("acme", conn=await example.kms_connection(conn))
    with pytest.raises(Abort):
        async with engine.begin() as conn:
            await conn.execute(insert(Tenant.__table__).values(id="beta"))
            await kms.create_keys("beta", conn=await example.kms_connection(conn))
            raise Abort
    async with engine.connect() as conn:
        assert (await conn.execute(select(Tenant.__table__.c.id))).scalars().all() == ["acme"]
    assert await db.fetch("select scope_id from kms_root_key") == [("acme",)]


async def test_foreign_keys_hold_on_the_engines_connections(
    db: TestDB, engine: AsyncEngine, kms: kms_async.KMS
) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await example.create_tenant(session, kms, "acme")
    async with AsyncSession(engine) as session, session.begin():
        old = await example.store_secret(session, kms, "acme", "token", b"v1")
        old_version = old.key_version_id
    await kms.rotate_keys("acme")
    assert await kms.list_data_key_version_referencers() == ["secret"]
    with pytest.raises(kms_async.KeyInUseError):
        await kms.revoke_key_version(old_version, scope_id="acme")

    # SQLite enforces foreign keys only where the pragma is on: create_engine turns it on.
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        async with AsyncSession(engine) as session, session.begin():
            session.add(
                Secret(
                    id="bogus",
                    tenant_id="acme",
                    name="bogus",
                    key_version_id="kdkv_0000000000",
                    ciphertext=b"",
                )
            )

    # Re-encrypt under the newest version, then the old one can go.
    async with AsyncSession(engine) as session, session.begin():
        await example.store_secret(session, kms, "acme", "token", b"v1")
    await kms.revoke_key_version(old_version, scope_id="acme")
    async with AsyncSession(engine) as session:
        assert await example.read_secret(session, kms, "acme", "token") == b"v1"


async def test_sqlite_default_transaction_mode(
    tmp_path: pathlib.Path, root_wrapper: kms_async.AeadWrapper
) -> None:
    """Without create_engine's recipe: the driver is in a transaction only after a write."""
    dsn = f"sqlite:///{tmp_path}/legacy.db"
    await kms_async.migrate(dsn)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/legacy.db")
    kms = await kms_async.KMS.open(
        dsn, purposes=["database"], root_wrapper=root_wrapper, max_staleness=None
    )
    try:
        async with engine.begin() as conn:
            await conn.run_sync(example.Base.metadata.create_all, tables=[Tenant.__table__])
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(select(Tenant))
            driver = await example.kms_connection(session)
            assert not driver.in_transaction  # sqlite3 has not begun: only a read ran
            with pytest.raises(kms_async.InvalidParameterError, match="no open transaction"):
                await kms.create_keys("acme", conn=driver)
        with pytest.raises(Abort):
            async with AsyncSession(engine) as session, session.begin():
                await example.create_tenant(session, kms, "acme")  # an INSERT first: joins
                raise Abort
        with pytest.raises(kms_async.KeyNotFoundError):
            await kms.list_keys("acme")
    finally:
        await kms.aclose()
        await engine.dispose()
