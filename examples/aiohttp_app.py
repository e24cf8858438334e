"""An aiohttp service that keeps per-tenant secrets encrypted with kms_async.

The same service as ``fastapi_app.py``: each tenant is a KMS scope, created
with its keys in one transaction; secrets are stored as ciphertext beside the
id of the data key version that made them.

Run it (from this directory)::

    export DATABASE_URL=sqlite:///secrets.db      # or postgresql://user@host/dbname
    export KMS_ROOT_KEY=$(openssl rand -base64 32)     # keep it: it unwraps every key
    python -m aiohttp.web -H 127.0.0.1 -P 8080 aiohttp_app:init_func   # or: python aiohttp_app.py

A cleanup context opens the app's database access and one KMS at startup and
closes both at shutdown. PostgreSQL: one asyncpg pool, shared with the KMS.
SQLite: one aiosqlite connection for the app (behind a lock) and a DSN for the
KMS, which opens its own connections; ``fastapi_app.py`` explains why.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiosqlite
import asyncpg
from aiohttp import web

import kms_async

logger = logging.getLogger("aiohttp_app")

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
# Deleting a tenant deletes its keys: a cascading foreign key on PostgreSQL, a
# trigger on SQLite (which cannot add a foreign key to an existing table).
POSTGRES_SCOPE_FK = (
    "alter table kms_root_key add constraint kms_root_key_scope_fkey"
    " foreign key (scope_id) references tenant (id) on delete cascade"
)
SQLITE_SCOPE_TRIGGER = (
    "create trigger if not exists tenant_delete_keys after delete on tenant"
    " begin delete from kms_root_key where scope_id = old.id; end"
)

_PLACEHOLDER = re.compile(r"\$(\d+)")


def _sqlite(sql: str, args: tuple[Any, ...]) -> tuple[str, dict[str, Any]]:
    """$1, $2 ... as SQLite's named :p1, :p2 ..., bound from a dict (numbered ?1
    placeholders warn on Python 3.12.0 to 3.12.3)."""
    return _PLACEHOLDER.sub(r":p\1", sql), {f"p{i}": a for i, a in enumerate(args, 1)}


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
        """What KMS.open and migrate get: the shared pool, or the DSN."""
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
                await tx.execute("select pg_advisory_xact_lock(hashtext('aiohttp_app_schema'))")
            for statement in APP_TABLES:
                await tx.execute(statement)
            if self.dialect == "sqlite":
                await tx.execute(SQLITE_SCOPE_TRIGGER)
            elif not await tx.fetchrow(
                "select 1 from pg_constraint where conname = 'kms_root_key_scope_fkey'"
                " and conrelid = 'kms_root_key'::regclass"
            ):
                await tx.execute(POSTGRES_SCOPE_FK)


KMS_KEY = web.AppKey("kms", kms_async.KMS)
DB_KEY = web.AppKey("db", AppDatabase)


def root_wrapper(root_key: bytes) -> kms_async.AeadWrapper:
    """The root of trust; its key id (written into every wrapped root key) is
    KMS_ROOT_KEY_ID if set, else the key's fingerprint, as for the command line."""
    return kms_async.AeadWrapper(root_key, key_id=os.environ.get("KMS_ROOT_KEY_ID") or None)


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


def http_error(cls: type[web.HTTPException], detail: str) -> web.HTTPException:
    """An aiohttp HTTP error with a JSON body like the middleware's."""
    return cls(text=json.dumps({"detail": detail}), content_type="application/json")


@web.middleware
async def kms_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn KMSError into a JSON response with a fitting status."""
    try:
        return await handler(request)
    except kms_async.KMSError as exc:
        status = error_status(exc)
        if status < 500:
            # Messages name ids and the fix, never key material.
            return web.json_response({"detail": str(exc)}, status=status)
        logger.error("key operation failed: %s", exc, exc_info=exc)
        headers = {"Retry-After": "1"} if status == 503 else None
        return web.json_response({"detail": "key service error"}, status=status, headers=headers)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise http_error(web.HTTPBadRequest, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise http_error(web.HTTPBadRequest, "the body must be a JSON object")
    return body


async def _require_tenant(db: AppDatabase, tenant_id: str) -> None:
    if await db.fetchrow("select 1 from tenant where id = $1", tenant_id) is None:
        raise http_error(web.HTTPNotFound, f"no tenant {tenant_id!r}")


# -- handlers ----------------------------------------------------------------

routes = web.RouteTableDef()


@routes.post("/tenants")
async def create_tenant(request: web.Request) -> web.Response:
    body = await _json_body(request)
    tenant_id, name = body.get("id"), body.get("name", "")
    if not isinstance(tenant_id, str) or not tenant_id or not isinstance(name, str):
        raise http_error(web.HTTPUnprocessableEntity, 'expected {"id": str, "name": str}')
    db, kms = request.app[DB_KEY], request.app[KMS_KEY]
    # One transaction: if the keys cannot be made, the tenant row goes too.
    async with db.transaction() as tx:
        row = await tx.fetchrow(
            "insert into tenant (id, name) values ($1, $2)"
            " on conflict (id) do nothing returning id",
            tenant_id,
            name,
        )
        if row is None:
            raise http_error(web.HTTPConflict, f"tenant {tenant_id!r} exists")
        await kms.create_keys(tenant_id, conn=tx.raw)
    return web.json_response({"id": tenant_id, "name": name}, status=201)


@routes.delete("/tenants/{tenant}")
async def delete_tenant(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant"]
    async with request.app[DB_KEY].transaction() as tx:
        # The foreign key (PostgreSQL) or trigger (SQLite) deletes the keys.
        if await tx.fetchrow("delete from tenant where id = $1 returning id", tenant_id) is None:
            raise http_error(web.HTTPNotFound, f"no tenant {tenant_id!r}")
        # The signal other KMS instances watch.
        await tx.execute("update kms_collection_version set version = version + 1")
    await request.app[KMS_KEY].refresh()  # this instance forgets the keys at once
    return web.Response(status=204)


@routes.put("/tenants/{tenant}/secrets/{name}")
async def put_secret(request: web.Request) -> web.Response:
    tenant_id, name = request.match_info["tenant"], request.match_info["name"]
    value = (await _json_body(request)).get("value")
    if not isinstance(value, str):
        raise http_error(web.HTTPUnprocessableEntity, 'expected {"value": str}')
    db, kms = request.app[DB_KEY], request.app[KMS_KEY]
    await _require_tenant(db, tenant_id)
    ciphertext = await kms.encrypt(
        tenant_id, PURPOSE, value.encode(), aad=secret_aad(tenant_id, name)
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
    return web.json_response({"tenant": tenant_id, "name": name, "key_version_id": version_id})


@routes.get("/tenants/{tenant}/secrets/{name}")
async def get_secret(request: web.Request) -> web.Response:
    tenant_id, name = request.match_info["tenant"], request.match_info["name"]
    row = await request.app[DB_KEY].fetchrow(
        "select ciphertext, key_version_id from secret where tenant_id = $1 and name = $2",
        tenant_id,
        name,
    )
    if row is None:
        raise http_error(web.HTTPNotFound, f"no secret {name!r} for tenant {tenant_id!r}")
    value = await request.app[KMS_KEY].decrypt(
        tenant_id, PURPOSE, row[0], aad=secret_aad(tenant_id, name)
    )
    return web.json_response(
        {"tenant": tenant_id, "name": name, "value": value.decode(), "key_version_id": row[1]}
    )


@routes.post("/tenants/{tenant}/rotate")
async def rotate(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant"]
    rewrap = (await _json_body(request)).get("rewrap", False)
    if not isinstance(rewrap, bool):
        raise http_error(web.HTTPUnprocessableEntity, 'expected {"rewrap": bool}')
    kms = request.app[KMS_KEY]
    await _require_tenant(request.app[DB_KEY], tenant_id)
    await kms.rotate_keys(tenant_id, rewrap=rewrap)
    return web.json_response(key_listing(await kms.list_keys(tenant_id)))


@routes.get("/tenants/{tenant}/keys")
async def list_keys(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant"]
    await _require_tenant(request.app[DB_KEY], tenant_id)
    return web.json_response(key_listing(await request.app[KMS_KEY].list_keys(tenant_id)))


# -- the app -----------------------------------------------------------------


def create_app(database_url: str, root_key: bytes) -> web.Application:
    """The service over ``database_url`` (postgresql://... or sqlite:///path)."""
    wrapper = root_wrapper(root_key)

    async def kms_context(app: web.Application) -> AsyncIterator[None]:
        async with AppDatabase.connect(database_url) as db:
            await kms_async.migrate(db.kms_target)
            await db.create_app_tables()
            async with await kms_async.KMS.open(
                db.kms_target, purposes=[PURPOSE], root_wrapper=wrapper
            ) as kms:
                app[DB_KEY] = db
                app[KMS_KEY] = kms
                yield
        # Leaving the blocks closes the KMS first, then the pool it borrowed.

    app = web.Application(middlewares=[kms_errors])
    app.cleanup_ctx.append(kms_context)
    app.add_routes(routes)
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


def init_func(argv: list[str] | None = None) -> web.Application:
    """``python -m aiohttp.web aiohttp_app:init_func``: DATABASE_URL and KMS_ROOT_KEY."""
    # python -m aiohttp.web logs everything at DEBUG, and aiosqlite then logs
    # every statement with its parameters (ciphertexts, wrapped keys).
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    return create_app(os.environ.get("DATABASE_URL", "sqlite:///secrets.db"), root_key_from_env())


if __name__ == "__main__":
    web.run_app(init_func(), host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
