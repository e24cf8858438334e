"""Key bindings and the key state record against a database writer without the keys.

Each case tampers with the tables directly (as a writer holding no root key
could) and checks that a KMS refuses what was changed with a clear
KeyIntegrityError (or KeyRollbackError) while the rest keeps working.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kms_async import KMS, BlobInfo, KeyIntegrityError, KeyRollbackError

OpenKMS = Callable[..., Awaitable[KMS]]


async def bump(db: Any) -> None:
    await db.execute("update kms_collection_version set version = version + 1")


def key_id(ciphertext: bytes) -> str:
    return BlobInfo.from_bytes(ciphertext).key_id


async def state_row(db: Any, scope: str) -> tuple[Any, ...]:
    (row,) = await db.fetch(
        "select serial, root_key_version_id, body, mac from kms_key_state where scope_id = $1",
        scope,
    )
    return tuple(row)


async def put_state(db: Any, scope: str, row: tuple[Any, ...]) -> None:
    await db.execute(
        "update kms_key_state set serial = $2, root_key_version_id = $3, body = $4, mac = $5"
        " where scope_id = $1",
        scope,
        *row,
    )
    await bump(db)


async def test_swapped_bindings_refuse_both_versions(kms: KMS, db: Any, open_kms: OpenKMS) -> None:
    await kms.create_keys("A")
    first = await kms.encrypt("A", "database", b"one")
    await kms.rotate_keys("A")
    second = await kms.encrypt("A", "database", b"two")
    a, b = key_id(first), key_id(second)
    rows = dict(
        await db.fetch(
            "select key_version_id, binding from kms_key_version_binding"
            " where key_version_id in ($1, $2)",
            a,
            b,
        )
    )
    update = "update kms_key_version_binding set binding = $1 where key_version_id = $2"
    await db.execute(update, rows[b], a)
    await db.execute(update, rows[a], b)
    await bump(db)
    async with await open_kms() as fresh:
        for ciphertext in (first, second):
            with pytest.raises(KeyIntegrityError, match="does not match its binding"):
                await fresh.decrypt("A", "database", ciphertext)
        # The other purpose is untouched.
        oidc = await fresh.encrypt("A", "oidc", b"o")
        assert await fresh.decrypt("A", "oidc", oidc) == b"o"


async def test_a_binding_copied_from_another_scope_does_not_match(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    await kms.create_keys_many(["A", "B"])
    in_b = await kms.encrypt("B", "database", b"b")
    a_version = key_id(await kms.encrypt("A", "database", b"a"))
    binding = await db.fetchval(
        "select binding from kms_key_version_binding where key_version_id = $1", a_version
    )
    await db.execute(
        "update kms_key_version_binding set binding = $1 where key_version_id = $2",
        binding,
        key_id(in_b),
    )
    await bump(db)
    async with await open_kms() as fresh:
        with pytest.raises(KeyIntegrityError, match="does not match its binding"):
            await fresh.decrypt("B", "database", in_b)


async def test_a_deleted_state_record_is_noticed(kms: KMS, db: Any, open_kms: OpenKMS) -> None:
    await kms.create_keys("A")
    secret = await kms.encrypt("A", "database", b"x")
    async with await open_kms() as witness:
        assert await witness.decrypt("A", "database", secret) == b"x"
        await db.execute("delete from kms_key_state where scope_id = 'A'")
        await bump(db)
        # An instance that saw the record calls it a rollback (on its next
        # cold load: tampering is not announced in the change log) ...
        with pytest.raises(KeyRollbackError, match="is gone"):
            await witness.encrypt("A", "oidc", b"x")
    async with await open_kms() as fresh:
        # ... and one that never did still sees bound versions without one.
        with pytest.raises(KeyIntegrityError, match="no key state record"):
            await fresh.decrypt("A", "database", secret)
        # The operator's way back, for key tables known to be right.
        await fresh.bind_keys(["A"])
        assert await fresh.decrypt("A", "database", secret) == b"x"


async def test_a_rolled_back_state_record_is_refused(kms: KMS, db: Any, open_kms: OpenKMS) -> None:
    """An older genuine record put back: the revocation it lacks must not come back."""
    await kms.create_keys("A")
    old = await kms.encrypt("A", "database", b"old")
    before = await state_row(db, "A")
    async with await open_kms() as witness:
        await kms.rotate_keys("A")
        await kms.revoke_key_version(key_id(old))
        await witness.refresh()
        await witness.encrypt("A", "database", b"sees the newer state")
        await put_state(db, "A", before)
        with pytest.raises(KeyRollbackError, match="older than serial"):
            await witness.encrypt("A", "oidc", b"x")
    async with await open_kms() as fresh:
        # Never saw the newer record, but the keys are newer than the old one.
        with pytest.raises(KeyRollbackError, match="rolled back"):
            await fresh.encrypt("A", "database", b"x")
    # A raised serial does not verify (the column is informational; the sealed body counts).
    body = bytes(before[2]).replace(b'"serial":1', b'"serial":11')
    assert body != bytes(before[2])
    forged = (11, before[1], body, before[3])
    await put_state(db, "A", forged)
    async with await open_kms() as fresh:
        with pytest.raises(KeyIntegrityError, match="does not verify"):
            await fresh.encrypt("A", "database", b"x")


async def test_a_renumbered_version_is_refused_and_never_encrypts(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    """A superseded version deleted and inserted again: the database numbers it newest."""
    await kms.create_keys("A")
    old = await kms.encrypt("A", "database", b"old")
    await kms.rotate_keys("A")
    newest = key_id(await kms.encrypt("A", "database", b"new"))
    (row,) = await db.fetch(
        "select data_key_id, root_key_version_id, key from kms_data_key_version"
        " where private_id = $1",
        key_id(old),
    )
    await db.execute("delete from kms_data_key_version where private_id = $1", key_id(old))
    await db.execute(
        "insert into kms_data_key_version (private_id, data_key_id, root_key_version_id, key)"
        " values ($1, $2, $3, $4)",
        key_id(old),
        row[0],
        row[1],
        bytes(row[2]),
    )
    await bump(db)
    async with await open_kms() as fresh:
        assert key_id(await fresh.encrypt("A", "database", b"x")) == newest
        with pytest.raises(KeyIntegrityError, match="does not match its binding"):
            await fresh.decrypt("A", "database", old)


async def test_a_deleted_newest_version_is_noticed(kms: KMS, db: Any, open_kms: OpenKMS) -> None:
    await kms.create_keys("A")
    await kms.rotate_keys("A")
    newest = key_id(await kms.encrypt("A", "database", b"new"))
    await db.execute("delete from kms_data_key_version where private_id = $1", newest)
    await bump(db)
    async with await open_kms() as fresh:
        with pytest.raises(KeyRollbackError, match="is missing or renumbered"):
            await fresh.encrypt("A", "database", b"x")


@pytest.mark.parametrize("integrity", ["bind", "strict"])
async def test_untouched_keys_work_in_both_modes(
    kms: KMS, open_kms: OpenKMS, integrity: str
) -> None:
    await kms.create_keys_many(["A", "B"])
    await kms.reconcile_keys(["C"])
    await kms.rotate_keys("A", rewrap=True)
    await kms.rewrap_keys("B")
    async with await open_kms(integrity=integrity) as fresh:
        for scope in ("A", "B", "C"):
            ciphertext = await fresh.encrypt(scope, "database", b"x")
            assert await fresh.decrypt(scope, "database", ciphertext) == b"x"
        versions = [v for k in await fresh.list_keys("A") for v in k.versions]
        assert all(v.bound for v in versions)


async def test_a_copy_of_a_revoked_key_under_a_new_id_is_refused(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    """An old key put back as a "new" (unbound, so Go-looking) version: its fingerprint
    names the revoked original."""
    await kms.create_keys("A")
    old = await kms.encrypt("A", "database", b"old")
    await kms.rotate_keys("A")
    current = key_id(await kms.encrypt("A", "database", b"new"))
    (row,) = await db.fetch(
        "select data_key_id, root_key_version_id, key from kms_data_key_version"
        " where private_id = $1",
        key_id(old),
    )
    await kms.revoke_key_version(key_id(old))
    await db.execute(
        "insert into kms_data_key_version (private_id, data_key_id, root_key_version_id, key)"
        " values ($1, $2, $3, $4)",
        "kdkv_Copied0001",
        row[0],
        row[1],
        bytes(row[2]),
    )
    await bump(db)
    async with await open_kms() as fresh:
        assert key_id(await fresh.encrypt("A", "database", b"x")) == current
        keys = await fresh.list_keys("A")
        assert [v.bound for k in keys for v in k.versions if v.id == "kdkv_Copied0001"] == [False]
        copied = BlobInfo(BlobInfo.from_bytes(old).ciphertext, "kdkv_Copied0001").to_bytes()
        with pytest.raises(KeyIntegrityError, match="holds the same key"):
            await fresh.decrypt("A", "database", copied)
