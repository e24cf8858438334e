"""A tiny connection budget under many tasks: no deadlock, no starvation.

The library must never hold a database connection while it waits on
something else (a root key service, another task). With one connection and
a cold load parked inside the root wrapper, other database work must still
get through; with two connections, 500 tasks mixing hot and cold work must
all finish.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import aiosqlite
import asyncpg
from conftest import PURPOSES, GatedWrapper, TestDB

import kms_async
from kms_async import KMS, AeadWrapper

# A guard against a hang, not a timing assertion: the work takes well under a second.
DEADLOCK_GUARD = 60


async def small_db(db: TestDB, size: int) -> Any:
    """The caller-owned pool (PostgreSQL) or single connection (SQLite) to pass as ``db``."""
    if db.dialect == "postgres":
        return await asyncpg.create_pool(db.dsn, min_size=1, max_size=size)
    conn = await aiosqlite.connect(db.dsn[len("sqlite:///") :], isolation_level=None)
    return conn


async def test_no_connection_is_held_while_the_root_wrapper_answers(
    db: TestDB, root_wrapper: AeadWrapper
) -> None:
    async with await KMS.open(db.dsn, purposes=PURPOSES, root_wrapper=root_wrapper) as setup:
        await setup.create_keys_many(["cold", "other"])
    handle = await small_db(db, 1)
    # Only the cold load waits at the wrapper; the rotation below proves its
    # possession of the root key by unwrapping, and must not wait behind it.
    parked = GatedWrapper(root_wrapper, first_only=True)
    try:
        async with await KMS.open(
            handle,
            purposes=PURPOSES,
            root_wrapper=parked,
            max_staleness=None,
            check_root_wrapper=False,
        ) as kms:
            load = asyncio.ensure_future(kms.encrypt("cold", "database", b"x"))
            await asyncio.wait_for(parked.entered.wait(), DEADLOCK_GUARD)
            # The only connection must be free while the load waits on the wrapper.
            keys = await asyncio.wait_for(kms.list_keys("other"), DEADLOCK_GUARD)
            assert [k.purpose for k in keys] == ["rootKey", *PURPOSES]
            await asyncio.wait_for(kms.rotate_keys("other"), DEADLOCK_GUARD)
            parked.gate.set()
            ciphertext = await asyncio.wait_for(load, DEADLOCK_GUARD)
            assert await kms.decrypt("cold", "database", ciphertext) == b"x"
    finally:
        parked.gate.set()
        await handle.close()


async def test_five_hundred_tasks_on_two_connections_all_finish(
    db: TestDB, root_wrapper: AeadWrapper
) -> None:
    scopes = [f"tenant-{i}" for i in range(50)]
    async with await KMS.open(db.dsn, purposes=PURPOSES, root_wrapper=root_wrapper) as setup:
        await setup.create_keys_many(scopes)
    handle = await small_db(db, 2)
    try:
        async with await KMS.open(
            handle, purposes=PURPOSES, root_wrapper=root_wrapper, max_staleness=0.2
        ) as kms:
            hot = scopes[:10]
            for scope_id in hot:
                await kms.encrypt(scope_id, "database", b"warm")
            done: list[str] = []

            async def task(n: int) -> None:
                scope_id = scopes[n % len(scopes)]  # most are cold on first use
                purpose = PURPOSES[n % 2]
                data = secrets.token_bytes(32)
                kind = n % 10
                if kind == 0:
                    await kms.rotate_keys(scope_id, rewrap=n % 20 == 0)
                elif kind == 1:
                    await kms.list_keys(scope_id)
                elif kind == 2:
                    await kms.reconcile_keys([scope_id, f"new-{n}"])
                ciphertext = await kms.encrypt(scope_id, purpose, data, aad=str(n).encode())
                assert await kms.decrypt(scope_id, purpose, ciphertext, aad=str(n).encode()) == data
                done.append(scope_id)

            await asyncio.wait_for(asyncio.gather(*(task(n) for n in range(500))), DEADLOCK_GUARD)
            assert len(done) == 500
    finally:
        await handle.close()


async def test_caller_pool_survives_kms_close(db: TestDB, root_wrapper: AeadWrapper) -> None:
    handle = await small_db(db, 2)
    try:
        kms = await kms_async.KMS.open(handle, purposes=PURPOSES, root_wrapper=root_wrapper)
        await kms.create_keys("s")
        await kms.aclose()
        if db.dialect == "postgres":
            assert await handle.fetchval("select count(*) from kms_root_key") == 1
        else:
            rows = await handle.execute_fetchall("select count(*) from kms_root_key")
            assert next(iter(rows))[0] == 1
    finally:
        await handle.close()
