"""The ``demo`` command: one tour of the key lifecycle against a throwaway database.

It plays an application that stores per-tenant secrets in its own table,
each row encrypted under the tenant's data key and pointing at the key
version with a restrict foreign key, and walks through create, encrypt,
rotate, the refusals that protect data, re-encryption and revocation.

The database is rebuilt on every run: a SQLite file is deleted and created
again; on PostgreSQL the demo works in its own schema, ``kms_demo``, which it
drops and creates again. Nothing it prints is key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import aiosqlite
import asyncpg

from ._blob import BlobInfo
from ._errors import InvalidParameterError, KeyInUseError, StorageError, UnknownKeyVersionError
from ._kms import KMS
from ._migrations import migrate
from ._sql import sqlite_path
from ._wrappers import AeadWrapper

__all__ = ["DEFAULT_DB", "POSTGRES_SCHEMA", "redact", "run_demo"]

#: Where the demo keeps its data when no ``--db`` is given.
DEFAULT_DB = "sqlite:///kms-demo.db"
#: The PostgreSQL schema the demo drops and recreates.
POSTGRES_SCHEMA = "kms_demo"

TENANTS = ("acme", "globex", "initech")
ROWS_PER_TENANT = 2
PURPOSE = "database"

_APP_TABLE = (
    "create table demo_secret ("
    " id text primary key,"
    " tenant text not null,"
    " key_version_id text not null"
    "  references kms_data_key_version(private_id) on delete restrict,"
    " ciphertext bytea not null)"
)


def redact(dsn: str) -> str:
    """``dsn`` with any password replaced, for printing."""
    parts = urllib.parse.urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _is_postgres(dsn: str) -> bool:
    return dsn.startswith(("postgresql://", "postgres://"))


def _with_search_path(dsn: str, schema: str) -> str:
    # asyncpg passes unknown query parameters on as server settings.
    parts = urllib.parse.urlsplit(dsn)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _reset_sqlite(path: str) -> str:
    """Delete the demo's SQLite file, refusing if it holds someone else's tables.

    Returns the file's absolute path.
    """
    if os.path.exists(path):
        try:
            with contextlib.closing(sqlite3.connect(path)) as conn:
                names = [r[0] for r in conn.execute("select name from sqlite_master")]
        except sqlite3.DatabaseError:
            raise InvalidParameterError(
                f"refusing to delete {path}: it is not a SQLite database; "
                "pass --db with a throwaway database"
            ) from None
        foreign = [n for n in names if not n.startswith(("kms_", "demo_secret", "sqlite_"))]
        if foreign:
            raise InvalidParameterError(
                f"refusing to delete {path}: it holds objects the demo did not create "
                f"({', '.join(sorted(foreign)[:5])}); pass --db with a throwaway database"
            )
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)
    return os.path.abspath(path)


class _AppDB:
    """The demo application's own connection, whichever the driver."""

    def __init__(self, conn: Any, dialect: str) -> None:
        self.conn = conn
        self.dialect = dialect

    @classmethod
    async def connect(cls, dsn: str) -> _AppDB:
        if _is_postgres(dsn):
            return cls(await asyncpg.connect(dsn), "postgres")
        conn = await aiosqlite.connect(sqlite_path(dsn), isolation_level=None)
        try:
            await conn.execute("pragma foreign_keys = on")
            await conn.execute("pragma busy_timeout = 5000")
        except BaseException:
            await conn.close()
            raise
        return cls(conn, "sqlite")

    def _sql(self, sql: str) -> str:
        if self.dialect == "sqlite":
            for n in range(9, 0, -1):
                sql = sql.replace(f"${n}", "?")
        return sql

    async def execute(self, sql: str, *args: Any) -> None:
        if self.dialect == "postgres":
            await self.conn.execute(sql, *args)
        else:
            await self.conn.execute(self._sql(sql), args)

    async def fetch(self, sql: str, *args: Any) -> Sequence[Sequence[Any]]:
        if self.dialect == "postgres":
            return list(await self.conn.fetch(sql, *args))
        return list(await self.conn.execute_fetchall(self._sql(sql), args))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        if self.dialect == "postgres":
            async with self.conn.transaction():
                yield
            return
        await self.conn.execute("begin immediate")
        try:
            yield
        except BaseException:
            await asyncio.shield(self.conn.rollback())
            raise
        await self.conn.commit()

    async def aclose(self) -> None:
        await self.conn.close()


@contextlib.contextmanager
def _driver_errors(dsn: str) -> Iterator[None]:
    """Report the demo's own driver failures the way the library reports its own."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, sqlite3.Error) as exc:
        raise StorageError(f"the demo's query on {redact(dsn)} failed: {exc}") from exc


async def _prepare(dsn: str, out: Callable[[str], None]) -> str:
    """Empty the demo's database; return the DSN the demo then uses."""
    if _is_postgres(dsn):
        try:
            admin = await asyncpg.connect(dsn)
            try:
                await admin.execute(f"drop schema if exists {POSTGRES_SCHEMA} cascade")
                await admin.execute(f"create schema {POSTGRES_SCHEMA}")
            finally:
                await admin.close()
        except (OSError, asyncpg.PostgresError) as exc:
            raise StorageError(
                f"cannot prepare schema {POSTGRES_SCHEMA} in {redact(dsn)}: {exc}"
            ) from exc
        out(f"   in schema {POSTGRES_SCHEMA}, dropped and created again for this run")
        return _with_search_path(dsn, POSTGRES_SCHEMA)
    path = sqlite_path(dsn)
    if path == ":memory:" or path.startswith("file:"):
        raise InvalidParameterError(
            "the demo needs a database file that two connections can share; "
            "pass --db sqlite:///some-file.db"
        )
    where = await asyncio.to_thread(_reset_sqlite, path)
    out(f"   in {where}, deleted and created again for this run")
    return dsn


async def run_demo(dsn: str = DEFAULT_DB, *, out: Callable[[str], None] = print) -> None:
    """Walk through the key lifecycle on a rebuilt database, printing each step.

    Raises:
        KMSError: a step failed (the message says which and why).
    """
    out(f"kms_async demo on {redact(dsn)}")
    dsn = await _prepare(dsn, out)

    applied = await migrate(dsn)
    out(f"1. migrated the schema: applied {', '.join(applied) or 'nothing (already current)'}")

    with _driver_errors(dsn):
        await _run(dsn, out)
    out("done: every step behaved as expected")


async def _run(dsn: str, out: Callable[[str], None]) -> None:
    app = await _AppDB.connect(dsn)
    try:
        await app.execute(_APP_TABLE)
        out("2. created table demo_secret; key_version_id references")
        out("   kms_data_key_version(private_id) on delete restrict")

        # A real deployment never makes its root key here: it loads it from a
        # key service (cloud KMS, Vault, HSM) or from the environment.
        root_wrapper = AeadWrapper(os.urandom(32), key_id="demo-root")
        # One process: no other instance can still be encrypting under a
        # version this one superseded, so it may be revoked at once.
        async with await KMS.open(
            dsn, purposes=["database", "oidc"], root_wrapper=root_wrapper, revoke_grace=0
        ) as kms:
            out(f"3. opened the KMS ({kms.dialect}) with purposes {', '.join(kms.purposes)}")
            out("   root wrapper: AES-256-GCM over 32 random bytes made for this run;")
            out("   a real deployment loads the root key from a key service or the environment")
            await _tour(kms, app, out)
    finally:
        await app.aclose()


async def _store(kms: KMS, app: _AppDB, row_id: str, tenant: str, text: str) -> str:
    """Encrypt ``text`` for ``tenant``, bound to ``row_id``; return the key version id."""
    ciphertext = await kms.encrypt(tenant, PURPOSE, text.encode(), aad=row_id.encode())
    version_id = BlobInfo.from_bytes(ciphertext).key_id
    await app.execute(
        "insert into demo_secret (id, tenant, key_version_id, ciphertext) values ($1, $2, $3, $4)",
        row_id,
        tenant,
        version_id,
        ciphertext,
    )
    return version_id


async def _tour(kms: KMS, app: _AppDB, out: Callable[[str], None]) -> None:
    for tenant in TENANTS:
        await kms.create_keys(tenant)
    out(f"4. created a root key and 'database' + 'oidc' data keys for {', '.join(TENANTS)}")

    out(f"5. encrypted {ROWS_PER_TENANT} rows per tenant, AAD bound to the row id:")
    for tenant in TENANTS:
        for n in range(1, ROWS_PER_TENANT + 1):
            row_id = f"{tenant}-{n}"
            version_id = await _store(kms, app, row_id, tenant, f"{tenant} secret #{n}")
            out(f"   {row_id:<10} key version {version_id}")

    tenant, other = TENANTS[0], TENANTS[1]
    (old_version,) = {
        r[0]
        for r in await app.fetch("select key_version_id from demo_secret where tenant = $1", tenant)
    }
    await kms.rotate_keys(tenant, rewrap=True)
    out(f"6. rotated {tenant}'s keys with rewrap=True (new versions; old ones re-wrapped)")
    new_row = f"{tenant}-{ROWS_PER_TENANT + 1}"
    new_version = await _store(kms, app, new_row, tenant, f"{tenant} secret #{ROWS_PER_TENANT + 1}")
    out(f"7. encrypted row {new_row} under the new key version {new_version}")

    rows = await app.fetch(
        "select id, tenant, key_version_id, ciphertext from demo_secret order by id"
    )
    out("8. read back and decrypted every row:")
    for row_id, owner, version_id, ciphertext in rows:
        text = await kms.decrypt(owner, PURPOSE, bytes(ciphertext), aad=row_id.encode())
        out(f"   {row_id:<10} {version_id}  {text.decode()!r}")

    try:
        await kms.revoke_key_version(old_version)
    except KeyInUseError as exc:
        out(f"9. revoking {old_version} is refused while rows still use it:")
        out(f"   KeyInUseError: {exc}")
    else:
        raise RuntimeError(f"kms_async bug: revoking the in-use version {old_version} succeeded")

    stolen_id, stolen = next((r[0], bytes(r[3])) for r in rows if r[1] == tenant)
    try:
        await kms.decrypt(other, PURPOSE, stolen, aad=stolen_id.encode())
    except UnknownKeyVersionError as exc:
        out(f"10. decrypting {tenant}'s row {stolen_id} with {other}'s keys is refused:")
        out(f"    UnknownKeyVersionError: {exc}")
    else:
        raise RuntimeError("kms_async bug: a cross-tenant decrypt succeeded")

    async with app.transaction():
        stale = await app.fetch(
            "select id, ciphertext from demo_secret where tenant = $1 and key_version_id <> $2",
            tenant,
            new_version,
        )
        for row_id, ciphertext in stale:
            aad = row_id.encode()
            text = await kms.decrypt(tenant, PURPOSE, bytes(ciphertext), aad=aad)
            fresh = await kms.encrypt(tenant, PURPOSE, text, aad=aad)
            await app.execute(
                "update demo_secret set ciphertext = $1, key_version_id = $2 where id = $3",
                fresh,
                BlobInfo.from_bytes(fresh).key_id,
                row_id,
            )
    out(f"11. re-encrypted {len(stale)} old rows of {tenant} under {new_version}, one transaction")

    await kms.revoke_key_version(old_version, scope_id=tenant)
    out(f"12. revoked {old_version}: no row uses it any more")

    root_versions = (await kms.list_keys(tenant))[0].versions
    await kms.revoke_key_version(root_versions[0].id, scope_id=tenant)
    out(f"13. revoked root key version {root_versions[0].id}: the rewrap left it wrapping nothing")

    out(f"14. list_keys({tenant!r}):")
    for key in await kms.list_keys(tenant):
        versions = ", ".join(f"v{v.version} {v.id}" for v in key.versions)
        out(f"    {key.purpose:<8} {key.type} {key.id}: {versions}")
    tables = await kms.list_data_key_version_referencers()
    out(f"15. tables referencing kms_data_key_version: {', '.join(tables)}")
