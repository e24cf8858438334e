"""A wrong root key can never lock a tenant out (issue 11, item 1).

An instance whose root wrapper has the right key id but the wrong key must
not write anything wrapped under it: every write first proves that the root
wrapper unwraps what the database already holds. The database is left byte
for byte as it was, and correctly configured instances keep working.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import PURPOSES, TestDB

from kms_async import KMS, AeadWrapper, WrapperError

OpenKMS = Callable[..., Awaitable[KMS]]

TABLES = (
    "kms_root_key",
    "kms_root_key_version",
    "kms_data_key",
    "kms_data_key_version",
    "kms_collection_version",
    "kms_key_change",
)


async def snapshot(db: TestDB) -> dict[str, list[tuple[Any, ...]]]:
    return {table: sorted(map(repr, await db.fetch(f"select * from {table}"))) for table in TABLES}


@pytest.fixture
def wrong_root(root_wrapper: AeadWrapper) -> AeadWrapper:
    """Another key under the same key id: what a mistyped KMS_ROOT_KEY gives."""
    return AeadWrapper(secrets.token_bytes(32), key_id=root_wrapper.key_id)


async def still_usable(kms: KMS, scope_id: str) -> None:
    made = await kms.encrypt(scope_id, "database", b"still here")
    assert await kms.decrypt(scope_id, "database", made) == b"still here"
    await kms.rotate_keys(scope_id, rewrap=True)
    assert await kms.decrypt(scope_id, "database", made) == b"still here"


@pytest.mark.parametrize(
    "write",
    [
        lambda k: k.rotate_keys("acme"),
        lambda k: k.rotate_keys("acme", rewrap=True),
        lambda k: k.rewrap_keys("acme"),
        lambda k: k.rotate_keys_many(["acme", "globex"]),
        lambda k: k.create_keys("initech"),
        lambda k: k.reconcile_keys(["initech"]),
        lambda k: k.reconcile_keys(["acme"], ["billing"]),
    ],
    ids=[
        "rotate",
        "rotate-rewrap",
        "rewrap",
        "rotate-many",
        "create",
        "reconcile-new",
        "reconcile",
    ],
)
async def test_a_wrong_root_key_writes_nothing(
    db: TestDB,
    kms: KMS,
    open_kms: OpenKMS,
    wrong_root: AeadWrapper,
    write: Callable[[KMS], Awaitable[Any]],
) -> None:
    await kms.create_keys_many(["acme", "globex"])
    before = await snapshot(db)
    wrong = await open_kms(root_wrapper=wrong_root, purposes=[*PURPOSES, "billing"])
    async with wrong:
        with pytest.raises(WrapperError, match="cannot unwrap root key version krkv_"):
            await write(wrong)
    assert await snapshot(db) == before
    await still_usable(kms, "acme")


async def test_replacing_the_root_wrapper_of_a_live_kms_proves_the_new_one(
    db: TestDB, kms: KMS, wrong_root: AeadWrapper
) -> None:
    """Root keys the old wrapper unwrapped prove nothing about a new one."""
    await kms.create_keys("acme")
    await kms.rotate_keys("acme")  # its root keys are cached now
    before = await snapshot(db)
    kms.add_external_wrapper("rootKey", wrong_root)
    writes: list[Callable[[], Awaitable[Any]]] = [
        lambda: kms.rewrap_keys("acme"),
        lambda: kms.rotate_keys("acme"),
        lambda: kms.create_keys("globex"),
    ]
    for write in writes:
        with pytest.raises(WrapperError):
            await write()
    assert await snapshot(db) == before


async def test_the_right_root_key_under_another_key_id_is_accepted(
    kms: KMS, open_kms: OpenKMS, root_wrapper: AeadWrapper
) -> None:
    """Possession is of the key, whatever its id says (AES-GCM ignores it)."""
    await kms.create_keys("acme")
    renamed = AeadWrapper(root_wrapper.key_bytes(), key_id="renamed")
    async with await open_kms(root_wrapper=renamed) as other:
        await other.rotate_keys("acme")
        await other.create_keys("globex")
    await still_usable(kms, "globex")


async def test_the_first_scope_of_an_empty_database_needs_no_proof(
    kms: KMS, open_kms: OpenKMS
) -> None:
    any_key = AeadWrapper(secrets.token_bytes(32), key_id="first")
    async with await open_kms(root_wrapper=any_key) as first:
        await first.create_keys("acme")
        await still_usable(first, "acme")
