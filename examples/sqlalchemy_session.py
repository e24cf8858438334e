"""Keys that commit or roll back with a SQLAlchemy 2 ``AsyncSession``.

The app writes its rows through SQLAlchemy; ``create_keys(conn=...)`` joins
the same database transaction through the driver connection underneath the
session (an asyncpg or aiosqlite connection), so a tenant and its keys are
committed together or not at all.

Two details make that work:

* SQLAlchemy begins the database transaction lazily. With asyncpg the
  driver's transaction starts at the first statement, so
  :func:`kms_connection` runs one if none has run yet.
* With SQLite the ``sqlite3`` driver (under aiosqlite) by default begins a
  transaction only before INSERT/UPDATE/DELETE, so a session that has only
  read is not in a transaction and ``create_keys`` refuses the connection
  ("conn has no open transaction"). :func:`create_engine` applies
  SQLAlchemy's documented recipe instead: the driver stops beginning on its
  own and SQLAlchemy emits ``BEGIN IMMEDIATE`` when a session's transaction
  starts. It also turns on ``pragma foreign_keys``, which SQLite leaves off.

Run it::

    export DATABASE_URL=sqlite+aiosqlite:///sa-example.db   # or postgresql+asyncpg://user@host/db
    python sqlalchemy_session.py
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg
from sqlalchemy import Column, ForeignKey, LargeBinary, Table, Text, UniqueConstraint, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import kms_async

PURPOSE = "database"


class Base(DeclarativeBase):
    pass


# The KMS owns this table (kms_async.migrate creates it). It is declared only
# so that foreign keys to it resolve; never create or drop it with metadata.
kms_data_key_version = Table(
    "kms_data_key_version", Base.metadata, Column("private_id", Text, primary_key=True)
)


class Tenant(Base):
    __tablename__ = "tenant"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str | None] = mapped_column(Text)


class Secret(Base):
    __tablename__ = "secret"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(Text)
    # restrict: a version that still protects rows cannot be revoked
    key_version_id: Mapped[str] = mapped_column(
        ForeignKey("kms_data_key_version.private_id", ondelete="RESTRICT")
    )
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)


#: The app's tables, for ``metadata.create_all(tables=APP_TABLES)``.
APP_TABLES = [Base.metadata.tables["tenant"], Base.metadata.tables["secret"]]


def create_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """An async engine whose transactions the KMS can join."""
    engine = create_async_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
            # The driver stops beginning transactions on its own (see on_begin).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("pragma foreign_keys = on")  # per connection, off by default
            cursor.execute("pragma busy_timeout = 5000")  # the KMS writes from its own
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def on_begin(conn: Any) -> None:
            # immediate: take the write lock up front; a deferred transaction that
            # reads and then writes after the KMS committed fails as "locked".
            conn.exec_driver_sql("begin immediate")

    return engine


def kms_dsn(url: str | URL) -> str:
    """The DSN for ``KMS.open``/``migrate`` naming the engine's database."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite:///{parsed.database}"
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


async def kms_connection(connection: AsyncSession | AsyncConnection) -> Any:
    """The driver connection under ``connection``'s transaction, for ``conn=``.

    Raises:
        InvalidParameterError (from the KMS, later): SQLite without the
            :func:`create_engine` recipe and nothing written yet.
    """
    conn = await connection.connection() if isinstance(connection, AsyncSession) else connection
    driver = (await conn.get_raw_connection()).driver_connection
    if isinstance(driver, asyncpg.Connection) and not driver.is_in_transaction():
        # SQLAlchemy's asyncpg adapter begins at the first statement.
        await conn.execute(text("select 1"))
    return driver


async def create_tenant(
    session: AsyncSession, kms: kms_async.KMS, tenant_id: str, name: str | None = None
) -> Tenant:
    """Add the tenant and create its keys, both in the session's transaction.

    The keys become usable (``encrypt``) once that transaction commits: the
    KMS reads keys through its own connections.
    """
    tenant = Tenant(id=tenant_id, name=name)
    session.add(tenant)
    await session.flush()  # the INSERT runs now, inside the transaction
    await kms.create_keys(tenant_id, conn=await kms_connection(session))
    return tenant


def _aad(tenant_id: str, name: str) -> bytes:
    return f"{tenant_id}:{name}".encode()


async def store_secret(
    session: AsyncSession, kms: kms_async.KMS, tenant_id: str, name: str, value: bytes
) -> Secret:
    ciphertext = await kms.encrypt(tenant_id, PURPOSE, value, aad=_aad(tenant_id, name))
    secret = Secret(
        id=f"{tenant_id}/{name}",
        tenant_id=tenant_id,
        name=name,
        key_version_id=kms_async.BlobInfo.from_bytes(ciphertext).key_id,
        ciphertext=ciphertext,
    )
    return await session.merge(secret)


async def read_secret(
    session: AsyncSession, kms: kms_async.KMS, tenant_id: str, name: str
) -> bytes | None:
    secret = await session.get(Secret, f"{tenant_id}/{name}")
    if secret is None:
        return None
    return await kms.decrypt(tenant_id, PURPOSE, secret.ciphertext, aad=_aad(tenant_id, name))


async def main() -> None:
    url = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///sa-example.db")
    engine = create_engine(url)
    dsn = kms_dsn(url)
    await kms_async.migrate(dsn)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all, tables=APP_TABLES)
    # A random root key keeps the example self-contained; see docs/how-to/root-keys.
    root = kms_async.AeadWrapper(os.urandom(32))
    try:
        async with await kms_async.KMS.open(dsn, purposes=[PURPOSE], root_wrapper=root) as kms:
            tenant_id = f"tenant-{os.urandom(4).hex()}"
            async with AsyncSession(engine) as session, session.begin():
                await create_tenant(session, kms, tenant_id, "Acme")
            # The KMS reads keys through its own connections: new keys are usable
            # once the transaction that created them has committed.
            async with AsyncSession(engine) as session, session.begin():
                await store_secret(session, kms, tenant_id, "api-token", b"s3cr3t")
            async with AsyncSession(engine) as session:
                print("committed:", await read_secret(session, kms, tenant_id, "api-token"))

            class Abort(Exception):
                pass

            try:
                async with AsyncSession(engine) as session, session.begin():
                    await create_tenant(session, kms, "rolled-back")
                    raise Abort
            except Abort:
                pass
            async with AsyncSession(engine) as session:
                print("rolled back, tenant row:", await session.get(Tenant, "rolled-back"))
            try:
                await kms.encrypt("rolled-back", PURPOSE, b"x")
            except kms_async.KeyNotFoundError:
                print("rolled back, keys: none")
    finally:
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
