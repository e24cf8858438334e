"""A FastAPI service that keeps per-tenant secrets encrypted with kms_async.

Each tenant is a KMS scope. Creating a tenant inserts its row and creates its
keys in one transaction; a secret is stored as ciphertext beside the id of the
data key version that made it, so that version cannot be revoked while rows
still need it.

Run it (from this directory; ``pip install uvicorn`` first)::

    export DATABASE_URL=sqlite:///secrets.db      # or postgresql://user@host/dbname
    export KMS_ROOT_KEY=$(openssl rand -base64 32)     # keep it: it unwraps every key
    uvicorn --factory fastapi_app:app_from_env    # or: python fastapi_app.py

Database access:

* PostgreSQL: the app opens one asyncpg pool and the KMS shares it
  (``KMS.open(pool)``), so ``create_keys(conn=conn)`` runs on the very
  connection that inserted the tenant.
* SQLite: the app keeps one aiosqlite connection of its own, guarded by a lock
  so that requests never interleave statements inside each other's
  transactions, and gives the KMS the DSN so it opens its own writer and
  reader (what docs/how-to/sharing-a-pool.md recommends for a busy service:
  a shared SQLite connection makes key writes of other tasks fail while a
  transaction is open on it). ``create_keys(conn=conn)`` still joins the app's transaction
  on the app's connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import aiosqlite
import asyncpg
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

import kms_async

logger = logging.getLogger("fastapi_app")

PURPOSE = "database"

# A real service creates these tables with its migration tool (see
# examples/alembic); creating them at startup keeps the example self-contained.
APP_TABLES = [
    "create table if not exists tenant (id text primary key, name text)",
    "create table if not exists secret ("
    " id text primary key,"
    " tenant_id text not null references tenant (id) on delete cascade,"
    " name text not null,"
    " key_version_id text not null"
    "  references kms_data_key_version (private_id) on delete restrict,"
    " ciphertext bytea not null,"
    " unique (tenant_id, name))",
]
# Deleting a tenant deletes its keys (crypto-shredding). PostgreSQL: a foreign
# key from kms_root_key.scope_id that cascades.
POSTGRES_SCOPE_FK = (
    "alter table kms_root_key add constraint kms_root_key_scope_fkey"
    " foreign key (scope_id) references tenant (id) on delete cascade"
)
# SQLite cannot add a foreign key to an existing table; a trigger does the same.
SQLITE_SCOPE_TRIGGER = (
    "create trigger if not exists tenant_delete_keys after delete on tenant"
    " begin delete from kms_root_key where scope_id = old.id; end"
)

_PLACEHOLDER = re.compile(r"\$(\d+)")


def _sqlite(sql: str, args: tuple[Any, ...]) -> tuple[str, dict[str, Any]]:
    """$1, $2 ... as SQLite's named :p1, :p2 ..., bound from a dict (numbered ?1
    placeholders warn on Python 3.12.0 to 3.12.3)."""
    return _PLACEHOLDER.sub(r":p\1", sql), {f"p{i}": a for i, a in enumerate(args, 1)}


def root_wrapper(root_key: bytes) -> kms_async.AeadWrapper:
    """The root of trust; its key id (written into every wrapped root key) is
    KMS_ROOT_KEY_ID if set, else the key's fingerprint, as for the command line."""
    return kms_async.AeadWrapper(root_key, key_id=os.environ.get("KMS_ROOT_KEY_ID") or None)


class Tx:
    """The app's driver connection inside a transaction; ``raw`` is what ``conn=`` takes."""

    def __init__(self, raw: Any, dialect: str) -> None:
        self.raw = raw
        self.dialect = dialect

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        """One row or None; statements use $1, $2 ... on both databases."""
        if self.dialect == "postgres":
            return await self.raw.fetchrow(sql, *args)
        rows = await self.raw.execute_fetchall(*_sqlite(sql, args))
        return rows[0] if rows else None

    async def execute(self, sql: str, *args: Any) -> None:
        if self.dialect == "postgres":
            await self.raw.execute(sql, *args)
        else:
            await (await self.raw.execute(*_sqlite(sql, args))).close()


class AppDatabase:
    """The app's own database access: an asyncpg pool, or one locked aiosqlite connection."""

    def __init__(self, url: str, pool: Any = None, conn: Any = None) -> None:
        self.url = url
        self.dialect = "postgres" if pool is not None else "sqlite"
        self._pool = pool
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str) -> AsyncIterator[AppDatabase]:
        if url.startswith(("postgresql://", "postgres://")):
            async with asyncpg.create_pool(url) as pool:
                yield cls(url, pool=pool)
            return
        if not url.startswith("sqlite:///"):
            raise ValueError("DATABASE_URL must be postgresql://... or sqlite:///path")
        # Autocommit mode: transactions are begun explicitly, as the KMS expects.
        conn = await aiosqlite.connect(url[len("sqlite:///") :], isolation_level=None)
        try:
            await conn.execute("pragma foreign_keys = on")  # off by default, per connection
            await conn.execute("pragma busy_timeout = 5000")  # the KMS writes from its own
            yield cls(url, conn=conn)
        finally:
            await conn.close()

    @property
    def kms_target(self) -> Any:
        """What KMS.open and migrate get: the shared pool, or the DSN (see the module doc)."""
        return self._pool if self.dialect == "postgres" else self.url

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """A transaction that commits if the block succeeds and rolls back otherwise."""
        if self.dialect == "postgres":
            async with self._pool.acquire() as conn, conn.transaction():
                yield Tx(conn, "postgres")
            return
        async with self._lock:
            # immediate: take the write lock now, so a later write cannot fail as busy.
            await self._conn.execute("begin immediate")
            try:
                yield Tx(self._conn, "sqlite")
            except BaseException:
                await self._conn.rollback()
                raise
            await self._conn.commit()

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        if self.dialect == "postgres":
            return await Tx(self._pool, "postgres").fetchrow(sql, *args)
        async with self._lock:  # not inside another request's open transaction
            return await Tx(self._conn, "sqlite").fetchrow(sql, *args)

    async def create_app_tables(self) -> None:
        async with self.transaction() as tx:
            if self.dialect == "postgres":
                # Several workers may start at once; one of them creates the tables.
                await tx.execute("select pg_advisory_xact_lock(hashtext('fastapi_app_schema'))")
            for statement in APP_TABLES:
                await tx.execute(statement)
            if self.dialect == "sqlite":
                await tx.execute(SQLITE_SCOPE_TRIGGER)
            elif not await tx.fetchrow(
                "select 1 from pg_constraint where conname = 'kms_root_key_scope_fkey'"
                " and conrelid = 'kms_root_key'::regclass"
            ):
                await tx.execute(POSTGRES_SCOPE_FK)


# -- HTTP models -------------------------------------------------------------


class TenantIn(BaseModel):
    id: str = Field(min_length=1, max_length=200)
    name: str = ""


class SecretIn(BaseModel):
    value: str


class RotateIn(BaseModel):
    rewrap: bool = False


def key_listing(keys: list[kms_async.Key]) -> list[dict[str, Any]]:
    """Key ids and versions as JSON; there is no key material in Key or KeyVersion."""
    return [
        {
            "id": key.id,
            "type": key.type,
            "purpose": key.purpose,
            "versions": [
                {"id": v.id, "version": v.version, "create_time": v.create_time.isoformat()}
                for v in key.versions
            ],
        }
        for key in keys
    ]


def secret_aad(tenant_id: str, name: str) -> bytes:
    # Binds the ciphertext to its row: copied to another tenant or name, it won't decrypt.
    return f"{tenant_id}:{name}".encode()


# First match wins. A stored ciphertext that does not decrypt is the server's
# problem, not the client's, even when it names an unknown version
# (UnknownKeyVersionError is also a KeyNotFoundError). Anything unlisted is a 500.
ERROR_STATUS: list[tuple[type[kms_async.KMSError], int]] = [
    (kms_async.DecryptionError, 500),
    (kms_async.InvalidParameterError, 400),
    (kms_async.KeyNotFoundError, 404),
    (kms_async.KeyExistsError, 409),
    (kms_async.KeyInUseError, 409),
    (kms_async.WrapperError, 502),  # the root key service failed
    (kms_async.TransientStorageError, 503),
    (kms_async.ClosedError, 503),  # shutting down
]


def error_status(exc: kms_async.KMSError) -> int:
    return next((status for cls, status in ERROR_STATUS if isinstance(exc, cls)), 500)


async def _require_tenant(db: AppDatabase, tenant_id: str) -> None:
    if await db.fetchrow("select 1 from tenant where id = $1", tenant_id) is None:
        raise HTTPException(404, f"no tenant {tenant_id!r}")


# -- the app -----------------------------------------------------------------


def get_kms(request: Request) -> kms_async.KMS:
    return request.app.state.kms  # type: ignore[no-any-return]


def get_db(request: Request) -> AppDatabase:
    return request.app.state.db  # type: ignore[no-any-return]


KMSDep = Annotated[kms_async.KMS, Depends(get_kms)]
DBDep = Annotated[AppDatabase, Depends(get_db)]


def create_app(database_url: str, root_key: bytes) -> FastAPI:
    """The service over ``database_url`` (postgresql://... or sqlite:///path)."""
    wrapper = root_wrapper(root_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AppDatabase.connect(database_url) as db:
            await kms_async.migrate(db.kms_target)
            await db.create_app_tables()
            async with await kms_async.KMS.open(
                db.kms_target, purposes=[PURPOSE], root_wrapper=wrapper
            ) as kms:
                app.state.db = db
                app.state.kms = kms
                yield
        # Leaving the blocks closes the KMS first, then the pool it borrowed.

    app = FastAPI(title="kms_async example", lifespan=lifespan)

    @app.exception_handler(kms_async.KMSError)
    async def kms_error(request: Request, exc: kms_async.KMSError) -> JSONResponse:
        status = error_status(exc)
        if status < 500:
            # Messages name ids and the fix, never key material.
            return JSONResponse({"detail": str(exc)}, status_code=status)
        logger.error("key operation failed: %s", exc, exc_info=exc)
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"detail": "key service error"}, status_code=status, headers=headers)

    @app.post("/tenants", status_code=201)
    async def create_tenant(tenant: TenantIn, db: DBDep, kms: KMSDep) -> dict[str, str]:
        # One transaction: if the keys cannot be made, the tenant row goes too.
        async with db.transaction() as tx:
            row = await tx.fetchrow(
                "insert into tenant (id, name) values ($1, $2)"
                " on conflict (id) do nothing returning id",
                tenant.id,
                tenant.name,
            )
            if row is None:
                raise HTTPException(409, f"tenant {tenant.id!r} exists")
            await kms.create_keys(tenant.id, conn=tx.raw)
        return {"id": tenant.id, "name": tenant.name}

    @app.delete("/tenants/{tenant_id}", status_code=204)
    async def delete_tenant(tenant_id: str, db: DBDep, kms: KMSDep) -> Response:
        async with db.transaction() as tx:
            # The foreign key (PostgreSQL) or trigger (SQLite) deletes the keys.
            if (
                await tx.fetchrow("delete from tenant where id = $1 returning id", tenant_id)
                is None
            ):
                raise HTTPException(404, f"no tenant {tenant_id!r}")
            # The signal other KMS instances watch.
            await tx.execute("update kms_collection_version set version = version + 1")
        await kms.refresh()  # this instance forgets the keys at once
        return Response(status_code=204)

    @app.put("/tenants/{tenant_id}/secrets/{name}")
    async def put_secret(
        tenant_id: str, name: str, secret: SecretIn, db: DBDep, kms: KMSDep
    ) -> dict[str, str]:
        await _require_tenant(db, tenant_id)
        ciphertext = await kms.encrypt(
            tenant_id, PURPOSE, secret.value.encode(), aad=secret_aad(tenant_id, name)
        )
        version_id = kms_async.BlobInfo.from_bytes(ciphertext).key_id
        async with db.transaction() as tx:
            await tx.execute(
                "insert into secret (id, tenant_id, name, key_version_id, ciphertext)"
                " values ($1, $2, $3, $4, $5) on conflict (tenant_id, name) do update"
                " set key_version_id = excluded.key_version_id, ciphertext = excluded.ciphertext",
                uuid.uuid4().hex,
                tenant_id,
                name,
                version_id,
                ciphertext,
            )
        return {"tenant": tenant_id, "name": name, "key_version_id": version_id}

    @app.get("/tenants/{tenant_id}/secrets/{name}")
    async def get_secret(tenant_id: str, name: str, db: DBDep, kms: KMSDep) -> dict[str, str]:
        row = await db.fetchrow(
            "select ciphertext, key_version_id from secret where tenant_id = $1 and name = $2",
            tenant_id,
            name,
        )
        if row is None:
            raise HTTPException(404, f"no secret {name!r} for tenant {tenant_id!r}")
        value = await kms.decrypt(tenant_id, PURPOSE, row[0], aad=secret_aad(tenant_id, name))
        return {
            "tenant": tenant_id,
            "name": name,
            "value": value.decode(),
            "key_version_id": row[1],
        }

    @app.post("/tenants/{tenant_id}/rotate")
    async def rotate(
        tenant_id: str, db: DBDep, kms: KMSDep, body: RotateIn | None = None
    ) -> list[dict[str, Any]]:
        await _require_tenant(db, tenant_id)
        await kms.rotate_keys(tenant_id, rewrap=body.rewrap if body else False)
        return key_listing(await kms.list_keys(tenant_id))

    @app.get("/tenants/{tenant_id}/keys")
    async def list_keys(tenant_id: str, db: DBDep, kms: KMSDep) -> list[dict[str, Any]]:
        await _require_tenant(db, tenant_id)
        return key_listing(await kms.list_keys(tenant_id))

    return app


def root_key_from_env() -> bytes:
    try:
        key = base64.b64decode(os.environ["KMS_ROOT_KEY"], validate=True)
    except KeyError:
        raise SystemExit("set KMS_ROOT_KEY to a base64-encoded 32-byte key") from None
    except binascii.Error:
        raise SystemExit("KMS_ROOT_KEY is not valid base64") from None
    if len(key) != 32:
        raise SystemExit(f"KMS_ROOT_KEY must decode to 32 bytes, not {len(key)}")
    return key


def app_from_env() -> FastAPI:
    """``uvicorn --factory fastapi_app:app_from_env``: DATABASE_URL and KMS_ROOT_KEY."""
    return create_app(os.environ.get("DATABASE_URL", "sqlite:///secrets.db"), root_key_from_env())


if __name__ == "__main__":
    import uvicorn  # type: ignore[import-not-found, unused-ignore]  # pip install uvicorn

    uvicorn.run(app_from_env(), host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
