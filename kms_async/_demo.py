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

import os
import urllib.parse
from collections.abc import Callable

from ._blob import BlobInfo
from ._errors import KeyInUseError, UnknownKeyVersionError
from ._kms import KMS
from ._migrations import migrate
from ._reencrypt import EncryptedColumn
from ._sql._demo import DemoRow, DemoStore, reset_demo_database
from ._wrappers import AeadWrapper

__all__ = ["DEFAULT_DB", "POSTGRES_SCHEMA", "redact", "run_demo"]

#: Where the demo keeps its data when no ``--db`` is given.
DEFAULT_DB = "sqlite:///kms-demo.db"
#: The PostgreSQL schema the demo drops and recreates.
POSTGRES_SCHEMA = "kms_demo"

TENANTS = ("acme", "globex", "initech")
ROWS_PER_TENANT = 2
PURPOSE = "database"

#: How re-encryption finds the demo's rows, their tenant and their AAD.
_COLUMNS = [
    EncryptedColumn(
        table=DemoStore.table,
        ciphertext_column="ciphertext",
        key_version_column="key_version_id",
        scope="tenant",
        purpose=PURPOSE,
        aad="{id}",
    )
]


def redact(dsn: str) -> str:
    """``dsn`` with any password replaced, for printing."""
    parts = urllib.parse.urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


async def run_demo(dsn: str = DEFAULT_DB, *, out: Callable[[str], None] = print) -> None:
    """Walk through the key lifecycle on a rebuilt database, printing each step.

    Raises:
        KMSError: a step failed (the message says which and why).
    """
    out(f"kms_async demo on {redact(dsn)}")
    dsn, where = await reset_demo_database(dsn, schema=POSTGRES_SCHEMA)
    out(f"   {where}")

    applied = await migrate(dsn)
    out(f"1. migrated the schema: applied {', '.join(applied) or 'nothing (already current)'}")

    app = await DemoStore.open(dsn)
    try:
        await app.create_table()
        out(f"2. created table {DemoStore.table}; key_version_id references")
        out("   kms_data_key_version(private_id) on delete restrict")

        # A real deployment never makes its root key here: it loads it from a
        # key service (cloud KMS, Vault, HSM) or from the environment, e.g.
        # with kms_async.open_root_wrapper().
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
    out("done: every step behaved as expected")


async def _store(kms: KMS, app: DemoStore, row_id: str, tenant: str, text: str) -> str:
    """Encrypt ``text`` for ``tenant``, bound to ``row_id``; return the key version id."""
    ciphertext = await kms.encrypt(tenant, PURPOSE, text.encode(), aad=row_id.encode())
    version_id = BlobInfo.from_bytes(ciphertext).key_id
    await app.insert(DemoRow(row_id, tenant, version_id, ciphertext))
    return version_id


async def _tour(kms: KMS, app: DemoStore, out: Callable[[str], None]) -> None:
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
    (old_version,) = {row.key_version_id for row in await app.rows() if row.tenant == tenant}
    await kms.rotate_keys(tenant, rewrap=True)
    out(f"6. rotated {tenant}'s keys with rewrap=True (new versions; old ones re-wrapped)")
    new_row = f"{tenant}-{ROWS_PER_TENANT + 1}"
    new_version = await _store(kms, app, new_row, tenant, f"{tenant} secret #{ROWS_PER_TENANT + 1}")
    out(f"7. encrypted row {new_row} under the new key version {new_version}")

    rows = await app.rows()
    out("8. read back and decrypted every row:")
    for row in rows:
        text = await kms.decrypt(row.tenant, PURPOSE, row.ciphertext, aad=row.id.encode())
        out(f"   {row.id:<10} {row.key_version_id}  {text.decode()!r}")

    try:
        await kms.revoke_key_version(old_version)
    except KeyInUseError as exc:
        out(f"9. revoking {old_version} is refused while rows still use it:")
        out(f"   KeyInUseError: {exc}")
    else:
        raise RuntimeError(f"kms_async bug: revoking the in-use version {old_version} succeeded")

    stolen = next(row for row in rows if row.tenant == tenant)
    try:
        await kms.decrypt(other, PURPOSE, stolen.ciphertext, aad=stolen.id.encode())
    except UnknownKeyVersionError as exc:
        out(f"10. decrypting {tenant}'s row {stolen.id} with {other}'s keys is refused:")
        out(f"    UnknownKeyVersionError: {exc}")
    else:
        raise RuntimeError("kms_async bug: a cross-tenant decrypt succeeded")

    report = await kms.reencrypt_key_version(old_version, _COLUMNS)
    out(
        f"11. reencrypt_key_version() moved {report.rows_reencrypted} old rows of {tenant} "
        f"to {new_version}"
    )

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
    scopes = [
        f"{s.id} (root key v{s.newest_root_version.version})" async for s in kms.iter_scopes()
    ]
    out(f"16. scopes with keys: {', '.join(scopes)}")
