"""Several KMS instances on one database, and writes inside the caller's transaction.

Instance A writes; instance B (another process, in production) must see the
change within its staleness bound, or at once after ``refresh()``. Waits are
bounded polling loops, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from kms_async import KMS, BlobInfo, KeyNotFoundError, UnknownKeyVersionError

PURPOSES = ("database", "oidc")

OpenKMS = Callable[..., Awaitable[KMS]]


def key_id(ciphertext: bytes) -> str:
    return BlobInfo.from_bytes(ciphertext).key_id


async def versions(kms: KMS, scope_id: str, purpose: str) -> list[str]:
    """Version ids of the scope's ``purpose`` key, oldest first, from the database."""
    for key in await kms.list_keys(scope_id):
        if key.purpose == purpose:
            return [v.id for v in key.versions]
    raise AssertionError(f"scope {scope_id!r} has no {purpose!r} key")


async def poll(check: Callable[[], Awaitable[bool]], *, limit: float = 5.0) -> None:
    """Await ``check()`` until it returns True; fail after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await check():
        assert loop.time() < deadline, "the change never became visible"
        await asyncio.sleep(0.02)


@pytest.fixture
async def other(open_kms: OpenKMS) -> AsyncIterator[KMS]:
    """Instance B, with its background check off: it sees changes on refresh()."""
    instance = await open_kms()
    async with instance:
        yield instance


# -- another instance's writes reach the cache -------------------------------------


async def test_a_rotation_reaches_another_instance_within_its_staleness_bound(
    kms: KMS, open_kms: OpenKMS
) -> None:
    await kms.create_keys("org")
    b = await open_kms(max_staleness=0.2)
    try:
        first = await b.encrypt("org", "database", b"before")
        assert key_id(first) == (await versions(kms, "org", "database"))[-1]
        await kms.rotate_keys("org")
        newest = (await versions(kms, "org", "database"))[-1]

        async def uses_newest() -> bool:
            return key_id(await b.encrypt("org", "database", b"x")) == newest

        await poll(uses_newest)
        assert await b.decrypt("org", "database", first) == b"before"
    finally:
        await b.aclose()


async def test_refresh_makes_a_rotation_visible_at_once(kms: KMS, other: KMS) -> None:
    await kms.create_keys("org")
    old = key_id(await other.encrypt("org", "database", b"x"))
    await kms.rotate_keys("org")
    newest = (await versions(kms, "org", "database"))[-1]
    # Without a background check B keeps serving its cache ...
    assert key_id(await other.encrypt("org", "database", b"x")) == old
    await other.refresh()
    # ... until it is asked to look.
    for purpose in PURPOSES:
        made = await other.encrypt("org", purpose, b"x")
        assert key_id(made) == (await versions(kms, "org", purpose))[-1]
    assert key_id(await other.encrypt("org", "database", b"x")) == newest


async def test_a_revoked_version_leaves_another_instance_after_refresh(
    kms: KMS, other: KMS
) -> None:
    await kms.create_keys("org")
    old_data = await kms.encrypt("org", "database", b"old")
    await kms.rotate_keys("org")
    new_data = await kms.encrypt("org", "database", b"new")
    # B caches both versions.
    assert await other.decrypt("org", "database", old_data) == b"old"
    assert await other.decrypt("org", "database", new_data) == b"new"

    await kms.revoke_key_version(key_id(old_data))
    await other.refresh()
    with pytest.raises(UnknownKeyVersionError):
        await other.decrypt("org", "database", old_data)
    assert await other.decrypt("org", "database", new_data) == b"new"
    assert key_id(await other.encrypt("org", "database", b"x")) == key_id(new_data)


async def test_a_scope_deleted_by_the_application_leaves_another_instance_after_refresh(
    db: Any, kms: KMS, other: KMS
) -> None:
    await kms.create_keys("doomed")
    await kms.create_keys("kept")
    made = await other.encrypt("doomed", "database", b"secret")
    kept = await other.encrypt("kept", "database", b"kept")
    # What the application's cascading foreign key does, plus the bump that
    # tells every instance something changed.
    await db.execute("delete from kms_root_key where scope_id = $1", "doomed")
    await db.execute("update kms_collection_version set version = version + 1")

    await other.refresh()
    with pytest.raises(KeyNotFoundError):
        await other.encrypt("doomed", "database", b"x")
    with pytest.raises(KeyNotFoundError):
        await other.decrypt("doomed", "database", made)
    assert await other.decrypt("kept", "database", kept) == b"kept"


# -- the caller's transaction (conn=) ---------------------------------------------


class CallerTransaction:
    """The application's own connection and transaction, on either driver."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.conn: Any = None
        self._tx: Any = None

    async def begin(self) -> Any:
        self.conn = await self.db.connect()
        if self.db.dialect == "postgres":
            self._tx = self.conn.transaction()
            await self._tx.start()
        else:
            await self.conn.execute("begin immediate")
        return self.conn

    async def commit(self) -> None:
        if self.db.dialect == "postgres":
            await self._tx.commit()
        else:
            await self.conn.execute("commit")

    async def rollback(self) -> None:
        if self.db.dialect == "postgres":
            await self._tx.rollback()
        else:
            await self.conn.execute("rollback")

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


@pytest.fixture
async def caller(db: Any) -> AsyncIterator[CallerTransaction]:
    tx = CallerTransaction(db)
    try:
        yield tx
    finally:
        await tx.close()


async def test_create_keys_in_a_rolled_back_caller_transaction_leaves_no_keys(
    db: Any, kms: KMS, other: KMS, caller: CallerTransaction
) -> None:
    version = await db.fetchval("select version from kms_collection_version")
    conn = await caller.begin()
    await kms.create_keys("org", conn=conn)
    await caller.rollback()

    await other.refresh()
    for instance in (kms, other):
        with pytest.raises(KeyNotFoundError):
            await instance.encrypt("org", "database", b"x")
        with pytest.raises(KeyNotFoundError):
            await instance.list_keys("org")
    assert await db.fetchval("select count(*) from kms_root_key") == 0
    assert await db.fetchval("select version from kms_collection_version") == version


async def test_create_keys_in_a_committed_caller_transaction_is_seen_by_both_instances(
    kms: KMS, other: KMS, caller: CallerTransaction
) -> None:
    conn = await caller.begin()
    await kms.create_keys("org", conn=conn)
    # Until the caller commits, neither instance sees (or caches) the keys.
    for instance in (kms, other):
        with pytest.raises(KeyNotFoundError):
            await instance.encrypt("org", "database", b"x")
    await caller.commit()

    made = await kms.encrypt("org", "database", b"secret")  # A: at once
    assert key_id(made) == (await versions(kms, "org", "database"))[-1]
    await other.refresh()  # B: after its check
    assert await other.decrypt("org", "database", made) == b"secret"
    for purpose in PURPOSES:
        made = await other.encrypt("org", purpose, b"both")
        assert await kms.decrypt("org", purpose, made) == b"both"


async def test_rotate_keys_in_a_rolled_back_caller_transaction_changes_nothing(
    db: Any, kms: KMS, caller: CallerTransaction
) -> None:
    await kms.create_keys("org")
    before = {p: await versions(kms, "org", p) for p in PURPOSES}
    root_before = [v.id for v in (await kms.list_keys("org"))[0].versions]
    assert key_id(await kms.encrypt("org", "database", b"x")) == before["database"][-1]

    conn = await caller.begin()
    await kms.rotate_keys("org", conn=conn)
    await caller.rollback()

    assert [v.id for v in (await kms.list_keys("org"))[0].versions] == root_before
    for purpose in PURPOSES:
        assert await versions(kms, "org", purpose) == before[purpose]
        assert key_id(await kms.encrypt("org", purpose, b"x")) == before[purpose][-1]
    assert await db.fetchval("select count(*) from kms_root_key_version") == 1


async def test_rotate_keys_in_a_committed_caller_transaction_is_used_after_commit(
    kms: KMS, caller: CallerTransaction
) -> None:
    await kms.create_keys("org")
    old = key_id(await kms.encrypt("org", "database", b"x"))

    conn = await caller.begin()
    await kms.rotate_keys("org", conn=conn)
    await caller.commit()

    newest = (await versions(kms, "org", "database"))[-1]
    assert newest != old
    assert key_id(await kms.encrypt("org", "database", b"x")) == newest


async def test_a_read_during_the_caller_transaction_does_not_pin_the_old_keys(
    kms: KMS, caller: CallerTransaction
) -> None:
    """An encrypt between rotate_keys(conn=) and the commit sees (and may
    cache) the committed keys; after the commit, refresh() brings the new ones."""
    await kms.create_keys("org")
    old = key_id(await kms.encrypt("org", "database", b"x"))

    conn = await caller.begin()
    await kms.rotate_keys("org", conn=conn)
    assert key_id(await kms.encrypt("org", "database", b"x")) == old
    await caller.commit()

    await kms.refresh()
    newest = (await versions(kms, "org", "database"))[-1]
    assert key_id(await kms.encrypt("org", "database", b"x")) == newest
