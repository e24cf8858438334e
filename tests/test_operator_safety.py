"""Safe to operate (issue 11): the open-time root check, versions nobody here
can unwrap, and reversible retirement (suspend, resume, then revoke).

Every case runs on SQLite and PostgreSQL, against rows written the way
another writer would (the Go package, a restored backup, raw SQL).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import TestDB
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_async import (
    KMS,
    AeadWrapper,
    DecryptionError,
    InvalidParameterError,
    KeyInUseError,
    KeyNotFoundError,
    KeySuspendedError,
    KeyUnusableError,
    SchemaVersionError,
    WrapperError,
)
from kms_async._wrappers import wrap_key

OpenKMS = Callable[..., Awaitable[KMS]]


@pytest.fixture
def wrong_root(root_wrapper: AeadWrapper) -> AeadWrapper:
    """Another key under the same key id: what a mistyped KMS_ROOT_KEY gives."""
    return AeadWrapper(secrets.token_bytes(32), key_id=root_wrapper.key_id)


def versions(keys: list[Any], purpose: str) -> list[Any]:
    return list(next(k for k in keys if k.purpose == purpose).versions)


async def rotate_by_sql(db: TestDB, scope_id: str, root: AeadWrapper) -> tuple[str, str]:
    """Rotate the scope's root key and 'database' data key the way another
    writer would, wrapping under ``root``; returns the new version ids."""
    root_key = await db.fetchval(
        "select private_id from kms_root_key where scope_id = $1", scope_id
    )
    data_key = await db.fetchval(
        "select private_id from kms_data_key where root_key_id = $1 and purpose = 'database'",
        root_key,
    )
    root_version, data_version = (
        f"krkv_{secrets.token_hex(5)}",
        f"kdkv_{secrets.token_hex(5)}",
    )
    root_secret = os.urandom(32)
    blob = await root.encrypt(root_secret)
    await db.execute(
        "insert into kms_root_key_version (private_id, root_key_id, key) values ($1, $2, $3)",
        root_version,
        root_key,
        blob.to_bytes(),
    )
    await db.execute(
        "insert into kms_data_key_version (private_id, data_key_id, root_key_version_id, key)"
        " values ($1, $2, $3, $4)",
        data_version,
        data_key,
        root_version,
        wrap_key(AESGCM(root_secret), root_version, os.urandom(32)),
    )
    await db.execute("update kms_collection_version set version = version + 1")
    return root_version, data_version


# -- the open-time check ---------------------------------------------------------------


async def test_open_refuses_a_wrong_root_key(
    db: TestDB, kms: KMS, wrong_root: AeadWrapper, root_wrapper: AeadWrapper
) -> None:
    await kms.create_keys_many(["acme", "globex"])
    with pytest.raises(WrapperError, match="check_root_wrapper=False"):
        await KMS.open(db.dsn, purposes=["database"], root_wrapper=wrong_root)
    # Off on request (an empty database, a wrapper that charges per call):
    # writes still prove the wrapper and refuse.
    async with await KMS.open(
        db.dsn, purposes=["database"], root_wrapper=wrong_root, check_root_wrapper=False
    ) as unchecked:
        with pytest.raises(WrapperError):
            await unchecked.rotate_keys("acme")
    async with await KMS.open(db.dsn, purposes=["database"], root_wrapper=root_wrapper) as right:
        assert await right.decrypt(
            "acme", "database", await right.encrypt("acme", "database", b"x")
        )


async def test_open_accepts_any_root_key_on_an_empty_database(db: TestDB) -> None:
    wrapper = AeadWrapper(secrets.token_bytes(32), key_id="first")
    async with await KMS.open(db.dsn, purposes=["database"], root_wrapper=wrapper) as kms:
        await kms.create_keys("acme")


async def test_open_passes_with_one_bad_version_among_good_ones(
    db: TestDB, kms: KMS, wrong_root: AeadWrapper, root_wrapper: AeadWrapper
) -> None:
    await kms.create_keys("acme")
    await rotate_by_sql(db, "acme", wrong_root)
    # Whichever rows the check tries, one unwraps: the right key opens.
    async with await KMS.open(db.dsn, purposes=["database"], root_wrapper=root_wrapper):
        pass


# -- degrade, don't fail whole ----------------------------------------------------------


async def test_a_version_nobody_here_can_unwrap_leaves_the_others_working(
    db: TestDB, kms: KMS, open_kms: OpenKMS, wrong_root: AeadWrapper
) -> None:
    await kms.create_keys("acme")
    old = await kms.encrypt("acme", "database", b"before")
    bad_root, bad_data = await rotate_by_sql(db, "acme", wrong_root)

    async with await open_kms() as fresh:
        # The older version still decrypts, for an instance started afterwards.
        assert await fresh.decrypt("acme", "database", old) == b"before"
        with pytest.raises(KeyUnusableError, match="replace_unusable=True") as info:
            await fresh.encrypt("acme", "database", b"new")
        assert info.value.key_version_id == bad_data
        assert not info.value.retryable
        with pytest.raises(KeyUnusableError):
            await fresh.get_wrapper("acme", "database")
        keys = await fresh.list_keys("acme")
        unusable = {v.id for k in keys for v in k.versions if v.unusable}
        assert unusable == {bad_root, bad_data}
        assert all(
            v.unusable is None for v in (await fresh.list_keys("acme", verify=False))[0].versions
        )
        # A plain rotation must prove the newest root version, which it cannot;
        # the error names the way out, since an older version unwraps.
        with pytest.raises(KeyUnusableError, match="replace_unusable=True") as refused:
            await fresh.rotate_keys("acme")
        assert refused.value.remedy is not None
        assert refused.value.remedy.action == "replace_unusable"
        with pytest.raises(InvalidParameterError):
            await fresh.rotate_keys("acme", replace_unusable=True, rewrap=True)

        # The recovery: rotate past the unusable versions, then revoke them.
        await fresh.rotate_keys("acme", replace_unusable=True)
        made = await fresh.encrypt("acme", "database", b"after")
        await fresh.revoke_key_version(bad_data)
        await fresh.revoke_key_version(bad_root)
        keys = await fresh.list_keys("acme")
        assert not [v for k in keys for v in k.versions if v.unusable]

    async with await open_kms() as later:
        assert await later.decrypt("acme", "database", old) == b"before"
        assert await later.decrypt("acme", "database", made) == b"after"
        await later.rotate_keys("acme", rewrap=True)
        assert await later.decrypt("acme", "database", made) == b"after"


async def test_replace_unusable_refuses_a_root_key_that_unwraps_nothing(
    db: TestDB, kms: KMS, open_kms: OpenKMS, wrong_root: AeadWrapper
) -> None:
    await kms.create_keys("acme")
    await rotate_by_sql(db, "acme", AeadWrapper(secrets.token_bytes(32), key_id="root-1"))
    rows = await db.fetch("select private_id from kms_root_key_version order by 1")
    async with await open_kms(root_wrapper=wrong_root) as wrong:
        with pytest.raises(KeyUnusableError, match="wrong root key"):
            await wrong.rotate_keys("acme", replace_unusable=True)
    assert await db.fetch("select private_id from kms_root_key_version order by 1") == rows


async def test_a_ciphertext_under_an_unusable_version_is_refused_as_a_decryption_error(
    db: TestDB, kms: KMS, open_kms: OpenKMS, wrong_root: AeadWrapper
) -> None:
    await kms.create_keys("acme")
    await rotate_by_sql(db, "acme", wrong_root)
    async with await open_kms(root_wrapper=wrong_root) as wrong:
        # The instance holding the other key can use the version it wrote...
        theirs = await wrong.encrypt("acme", "database", b"theirs")
    async with await open_kms() as fresh:
        # ...and nobody else can: a clear error, not silence or garbage.
        with pytest.raises(DecryptionError) as info:
            await fresh.decrypt("acme", "database", theirs)
        assert isinstance(info.value, KeyUnusableError)


# -- suspend, resume, revoke ------------------------------------------------------------


async def test_suspend_refuses_decryption_everywhere_until_resumed(
    db: TestDB, kms: KMS, open_kms: OpenKMS
) -> None:
    await kms.create_keys("acme")
    old = await kms.encrypt("acme", "database", b"old")
    await kms.rotate_keys("acme")
    new = await kms.encrypt("acme", "database", b"new")
    old_id = versions(await kms.list_keys("acme"), "database")[0].id

    async with await open_kms() as other:
        assert await other.decrypt("acme", "database", old) == b"old"  # cached before
        await kms.suspend_key_version(old_id)
        await kms.suspend_key_version(old_id)  # again: nothing changes
        with pytest.raises(KeySuspendedError, match="resume_key_version") as info:
            await kms.decrypt("acme", "database", old)
        assert info.value.key_version_id == old_id
        await other.refresh()  # what the background check does within max_staleness
        with pytest.raises(KeySuspendedError):
            await other.decrypt("acme", "database", old)
        assert await other.decrypt("acme", "database", new) == b"new"
        listed = versions(await other.list_keys("acme"), "database")
        assert [v.suspended for v in listed] == [True, False]
        async with await open_kms() as started_later:
            with pytest.raises(KeySuspendedError):
                await started_later.decrypt("acme", "database", old)
            with pytest.raises(KeySuspendedError):
                await started_later.get_wrapper("acme", "database", key_version_id=old_id)

        await other.resume_key_version(old_id)
        await other.resume_key_version(old_id)  # again: nothing changes
        assert await other.decrypt("acme", "database", old) == b"old"
        await kms.refresh()
        assert await kms.decrypt("acme", "database", old) == b"old"
        assert not any(v.suspended for v in versions(await kms.list_keys("acme"), "database"))


async def test_suspend_refuses_the_newest_version_root_versions_and_unknown_ids(
    kms: KMS,
) -> None:
    await kms.create_keys_many(["acme", "globex"])
    keys = await kms.list_keys("acme")
    with pytest.raises(KeyInUseError, match="rotate_keys"):
        await kms.suspend_key_version(versions(keys, "database")[-1].id)
    with pytest.raises(InvalidParameterError, match="root key version"):
        await kms.suspend_key_version(keys[0].versions[0].id)
    with pytest.raises(KeyNotFoundError):
        await kms.suspend_key_version("kdkv_NoSuchVer1")
    await kms.rotate_keys("acme")
    old_id = versions(await kms.list_keys("acme"), "database")[0].id
    with pytest.raises(KeyNotFoundError):
        await kms.suspend_key_version(old_id, scope_id="globex")
    with pytest.raises(InvalidParameterError):
        await kms.suspend_key_version(42)  # type: ignore[arg-type]


async def test_revoking_a_suspended_version_clears_its_suspension(db: TestDB, kms: KMS) -> None:
    await kms.create_keys("acme")
    await kms.rotate_keys("acme")
    old_id = versions(await kms.list_keys("acme"), "database")[0].id
    await kms.suspend_key_version(old_id)
    assert await db.fetchval("select count(*) from kms_key_version_suspension") == 1
    await kms.revoke_key_version(old_id)
    assert await db.fetchval("select count(*) from kms_key_version_suspension") == 0


async def test_a_suspension_that_fails_writes_nothing(db: TestDB, kms: KMS) -> None:
    await kms.create_keys("acme")
    await kms.rotate_keys("acme")
    old_id = versions(await kms.list_keys("acme"), "database")[0].id
    before = await db.fetchval("select version from kms_collection_version")
    with pytest.raises(KeyNotFoundError):
        await kms.suspend_key_version(old_id, scope_id="globex")
    assert await db.fetchval("select version from kms_collection_version") == before
    assert await db.fetchval("select count(*) from kms_key_version_suspension") == 0


async def test_suspension_needs_its_table(db: TestDB, kms: KMS, open_kms: OpenKMS) -> None:
    await kms.create_keys("acme")
    await kms.rotate_keys("acme")
    old = versions(await kms.list_keys("acme"), "database")[0].id
    await db.execute("drop table kms_key_version_suspension")
    async with await open_kms() as without:
        with pytest.raises(SchemaVersionError, match="migrate"):
            await without.suspend_key_version(old)
        # Everything else works as before.
        assert not any(v.suspended for v in versions(await without.list_keys("acme"), "database"))
        made = await without.encrypt("acme", "database", b"x")
        assert await without.decrypt("acme", "database", made) == b"x"
        await without.revoke_key_version(old)
