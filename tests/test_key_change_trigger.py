"""Other writers' key changes reach cached instances (schema file 05 on PostgreSQL).

Writes the Go package makes, and the README's SQL for deleting a tenant,
are done here as plain SQL. On PostgreSQL the triggers of file 05 log them
with the scopes they changed and notify: a listening instance that polls
only every half hour sees them (the test waits for the condition; its time
limit only stops a hang). On SQLite, which has no such trigger, an instance
finds them by its check (``refresh``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import TestDB, sqlite_args, sqlite_sql
from test_coherence import poll
from test_go_compat import go_seal

from kms_async import KMS, AeadWrapper, BlobInfo, KeyNotFoundError

OpenKMS = Callable[..., Awaitable[KMS]]

#: A hang guard, not a timing assertion: polling alone would take 30 minutes.
HANG = 30.0


async def _in_one_transaction(db: TestDB, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
    conn = await db.connect()
    try:
        if db.dialect == "postgres":
            async with conn.transaction():
                for sql, args in statements:
                    await conn.execute(sql, *args)
        else:
            await conn.execute("begin immediate")
            for sql, args in statements:
                await conn.execute(sqlite_sql(sql), sqlite_args(args))
            await conn.execute("commit")
    finally:
        await conn.close()


async def _rotate_the_go_way(db: TestDB, root: AeadWrapper, scope_id: str) -> str:
    """RotateKeys as the Go package does it: the version bump first, then a new
    root key version and a new version of each data key; returns the new
    data key version id of the scope's "database" key."""
    root_key_id = await db.fetchval(
        "select private_id from kms_root_key where scope_id = $1", scope_id
    )
    data_keys = await db.fetch(
        "select private_id, purpose from kms_data_key where root_key_id = $1", root_key_id
    )
    suffix = os.urandom(5).hex()[:10]
    root_version_id, root_version_key = f"krkv_go{suffix[:8]}", os.urandom(32)
    statements: list[tuple[str, tuple[Any, ...]]] = [
        ("update kms_collection_version set version = version + 1", ()),
        (
            "insert into kms_root_key_version (private_id, root_key_id, key) values ($1, $2, $3)",
            (
                root_version_id,
                root_key_id,
                go_seal(root_version_key, root.key_bytes(), root.key_id),
            ),
        ),
    ]
    new_ids = {}
    for data_key_id, purpose in data_keys:
        new_ids[purpose] = f"kdkv_{purpose[:2]}{suffix[:8]}"
        statements.append(
            (
                "insert into kms_data_key_version"
                " (private_id, data_key_id, root_key_version_id, key) values ($1, $2, $3, $4)",
                (
                    new_ids[purpose],
                    data_key_id,
                    root_version_id,
                    go_seal(os.urandom(32), root_version_key, root_version_id),
                ),
            )
        )
    await _in_one_transaction(db, statements)
    return new_ids["database"]


async def _key_id(kms: KMS, scope_id: str) -> str:
    """The version the instance encrypts with (from its cache, when cached)."""
    return BlobInfo.from_bytes(await kms.encrypt(scope_id, "database", b"x")).key_id


async def _sees(kms: KMS, db: TestDB, check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``check()`` holds: by notification on PostgreSQL, by a check on SQLite."""
    if db.dialect == "sqlite":
        await kms.refresh()
        assert await check()
        return
    await poll(check, limit=HANG)


async def _listener(db: TestDB) -> tuple[Any, list[dict[str, Any]]]:
    """A raw LISTEN on the channel kms_async uses; the payloads arrive in the list."""
    conn = await db.connect()
    oid = await conn.fetchval("select 'kms_collection_version'::regclass::oid")
    received: list[dict[str, Any]] = []
    await conn.add_listener(
        f"kms_key_change_{oid}", lambda *args: received.append(json.loads(args[3]))
    )
    return conn, received


async def _log(db: TestDB) -> dict[int, list[str] | None]:
    rows = await db.fetch("select version, scopes from kms_key_change")
    return {v: None if s is None else json.loads(s) for v, s in rows}


async def test_a_go_style_rotation_reaches_an_instance(
    kms: KMS, db: TestDB, open_kms: OpenKMS, root_wrapper: AeadWrapper
) -> None:
    await kms.create_keys_many(["org", "other"])
    async with await open_kms(max_staleness=3600, notifications=True) as watcher:
        before = await _key_id(watcher, "org")
        await watcher.encrypt("other", "database", b"x")
        untouched = watcher._entries[("other", "database")]
        version = await db.fetchval("select version from kms_collection_version")

        new_id = await _rotate_the_go_way(db, root_wrapper, "org")

        async def rotated() -> bool:
            return await _key_id(watcher, "org") == new_id

        await _sees(watcher, db, rotated)
        assert before != new_id
        # Only the rotated scope was reloaded.
        assert watcher._entries[("other", "database")] is untouched
        ciphertext = await watcher.encrypt("org", "database", b"secret")
        assert await kms.decrypt("org", "database", ciphertext) == b"secret"
    if db.dialect == "postgres":
        assert (await _log(db))[version + 1] == ["org"]


async def test_the_readme_tenant_deletion_reaches_an_instance(
    kms: KMS, db: TestDB, open_kms: OpenKMS
) -> None:
    await db.execute("create table tenant (id text primary key)")
    await db.execute("insert into tenant (id) values ('tenant-1'), ('tenant-2')")
    if db.dialect == "postgres":
        await db.execute(
            "alter table kms_root_key add constraint kms_root_key_scope_fkey"
            " foreign key (scope_id) references tenant (id) on delete cascade"
        )
        deletion = [
            ("delete from tenant where id = 'tenant-1'", ()),
            ("update kms_collection_version set version = version + 1", ()),
        ]
    else:
        deletion = [
            ("delete from tenant where id = 'tenant-1'", ()),
            ("delete from kms_root_key where scope_id = 'tenant-1'", ()),
            ("update kms_collection_version set version = version + 1", ()),
        ]
    await kms.create_keys_many(["tenant-1", "tenant-2"])
    async with await open_kms(max_staleness=3600, notifications=True) as watcher:
        await watcher.encrypt("tenant-1", "database", b"x")
        await watcher.encrypt("tenant-2", "database", b"x")
        untouched = watcher._entries[("tenant-2", "database")]
        version = await db.fetchval("select version from kms_collection_version")

        await _in_one_transaction(db, deletion)

        async def forgotten() -> bool:
            return ("tenant-1", "database") not in watcher._entries

        await _sees(watcher, db, forgotten)
        with pytest.raises(KeyNotFoundError):
            await watcher.encrypt("tenant-1", "database", b"x")
        assert watcher._entries[("tenant-2", "database")] is untouched
    if db.dialect == "postgres":
        assert (await _log(db))[version + 1] == ["tenant-1"]


async def test_every_bump_is_logged_once_and_announced(
    kms: KMS, db: TestDB, root_wrapper: AeadWrapper
) -> None:
    """kms_async's writes log themselves (the triggers skip them); another
    writer's is logged by the triggers; a bare bump is logged as "all"."""
    if db.dialect != "postgres":
        pytest.skip("PostgreSQL only: SQLite has no triggers for other writers")
    await kms.create_keys("org")
    conn, received = await _listener(db)
    try:
        start = await db.fetchval("select version from kms_collection_version")
        await kms.rotate_keys("org", rewrap=True)
        await _rotate_the_go_way(db, root_wrapper, "org")
        await db.execute("update kms_collection_version set version = version + 1")
        versions = await kms.list_keys("org")
        await kms.revoke_key_version(versions[1].versions[0].id)

        async def all_received() -> bool:
            return len(received) == 4

        await poll(all_received, limit=HANG)
    finally:
        await conn.close()
    expected = {start + 1: ["org"], start + 2: ["org"], start + 3: None, start + 4: ["org"]}
    log = await _log(db)
    assert {v: s for v, s in log.items() if v > start} == expected
    assert received == [{"v": v, "s": s} for v, s in expected.items()]


async def test_a_write_of_many_scopes_is_logged_as_all(kms: KMS, db: TestDB) -> None:
    if db.dialect != "postgres":
        pytest.skip("PostgreSQL only: SQLite has no triggers for other writers")
    scopes = [f"s-{i:04d}" for i in range(1001)]
    await kms.create_keys_many(scopes, ["database"])
    version = await db.fetchval("select version from kms_collection_version")
    await _in_one_transaction(
        db,
        [
            ("update kms_collection_version set version = version + 1", ()),
            ("delete from kms_root_key where scope_id like 's-%'", ()),
        ],
    )
    assert (await _log(db))[version + 1] is None


class _RollBack(Exception):
    pass


async def test_a_rolled_back_bump_logs_nothing_and_the_mark_ends_with_it(db: TestDB) -> None:
    """The mark kms_async's bump sets is local to its transaction: the next
    writer on the same connection is logged by the triggers."""
    if db.dialect != "postgres":
        pytest.skip("PostgreSQL only: SQLite has no triggers for other writers")
    conn = await db.connect()
    try:
        with pytest.raises(_RollBack):
            async with conn.transaction():
                await conn.execute("update kms_collection_version set version = version + 1")
                raise _RollBack
        async with conn.transaction():
            await conn.execute("select set_config('kms_key_change.logged', 'on', true)")
        await conn.execute("update kms_collection_version set version = version + 1")
    finally:
        await conn.close()
    assert list((await _log(db)).items()) == [(2, None)]
