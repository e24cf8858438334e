"""Encryptions counted per data key version, summed over instances (schema file 07).

Counts reach the usage table on aclose(), on flush_usage() and from the
background flush; a flush that fails keeps them, an evicted pair keeps them,
and counts of a revoked version are dropped without failing the flush.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import TestDB

from kms_async import KMS, BlobInfo, SchemaVersionError

OpenKMS = Callable[..., Awaitable[KMS]]

#: Counting on, but no flush before aclose() or flush_usage() within a test.
NO_PERIODIC_FLUSH = 3600.0


async def counts(db: TestDB) -> dict[str, int]:
    rows = await db.fetch("select key_version_id, encryptions from kms_key_version_usage")
    return {str(r[0]): int(r[1]) for r in rows}


async def poll(check: Callable[[], Awaitable[bool]], *, limit: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await check():
        assert loop.time() < deadline, "the condition never held"
        await asyncio.sleep(0.02)


def key_id(ciphertext: bytes) -> str:
    return BlobInfo.from_bytes(ciphertext).key_id


async def test_several_instances_sum_their_counts_in_one_table(
    db: TestDB, open_kms: OpenKMS
) -> None:
    first = await open_kms(usage_flush_interval=NO_PERIODIC_FLUSH)
    await first.create_keys_many(["a", "b"])
    others = [await open_kms(usage_flush_interval=NO_PERIODIC_FLUSH) for _ in range(2)]
    instances = [first, *others]
    expected: dict[str, int] = {}
    for n, kms in enumerate(instances, 1):
        for scope in ("a", "b"):
            for _ in range(n * 3):
                version = key_id(await kms.encrypt(scope, "database", b"x"))
                expected[version] = expected.get(version, 0) + 1
            sealed = await kms.encrypt_many(scope, "oidc", [b"y"] * (n * 5))
            version = key_id(sealed[0])
            expected[version] = expected.get(version, 0) + len(sealed)
    assert await counts(db) == {}  # nothing flushed before aclose
    await asyncio.gather(*(kms.aclose() for kms in instances))
    assert await counts(db) == expected
    assert sum(expected.values()) == (3 + 6 + 9) * 2 + (5 + 10 + 15) * 2


async def test_the_background_flush_adds_counts_while_open(db: TestDB, open_kms: OpenKMS) -> None:
    kms = await open_kms(usage_flush_interval=0.05)
    try:
        await kms.create_keys("org")
        version = key_id(await kms.encrypt("org", "database", b"x"))
        await kms.encrypt("org", "database", b"x")

        async def flushed() -> bool:
            return (await counts(db)).get(version) == 2

        await poll(flushed)
    finally:
        await kms.aclose()
    assert (await counts(db))[version] == 2  # aclose added nothing twice


async def test_a_failed_flush_keeps_its_counts_for_the_next(db: TestDB, open_kms: OpenKMS) -> None:
    kms = await open_kms(usage_flush_interval=NO_PERIODIC_FLUSH)
    try:
        await kms.create_keys("org")
        version = key_id(await kms.encrypt("org", "database", b"x"))
        await db.execute("alter table kms_key_version_usage rename to kms_usage_away")
        with pytest.raises(SchemaVersionError):
            await kms.flush_usage()
        await kms.encrypt("org", "database", b"x")
        await db.execute("alter table kms_usage_away rename to kms_key_version_usage")
        await kms.flush_usage()
        assert await counts(db) == {version: 2}
        await kms.flush_usage()  # nothing pending: nothing added again
        assert await counts(db) == {version: 2}
    finally:
        await kms.aclose()
    assert await counts(db) == {version: 2}


async def test_an_evicted_pair_keeps_its_counts(db: TestDB, open_kms: OpenKMS) -> None:
    kms = await open_kms(usage_flush_interval=NO_PERIODIC_FLUSH, cache_size=1)
    try:
        await kms.create_keys_many(["a", "b", "c"])
        a = key_id(await kms.encrypt("a", "database", b"x"))
        await kms.encrypt("a", "database", b"x")
        # Each of these evicts the pair before it (one entry fits).
        b = key_id(await kms.encrypt("b", "database", b"x"))
        c = key_id(await kms.encrypt("c", "database", b"x"))
        a_again = key_id(await kms.encrypt("a", "database", b"x"))
        assert a_again == a
        assert len(kms._cache) == 1
        await kms.flush_usage()
        assert await counts(db) == {a: 3, b: 1, c: 1}
    finally:
        await kms.aclose()


async def test_a_rotation_counts_each_version_apart(db: TestDB, open_kms: OpenKMS) -> None:
    kms = await open_kms(usage_flush_interval=NO_PERIODIC_FLUSH)
    other = await open_kms(usage_flush_interval=NO_PERIODIC_FLUSH)
    try:
        await kms.create_keys("org")
        old = key_id(await kms.encrypt("org", "database", b"x"))
        await other.rotate_keys("org")
        await kms.refresh()
        new = key_id(await kms.encrypt("org", "database", b"x"))
        await kms.encrypt("org", "database", b"x")
        assert new != old
    finally:
        await kms.aclose()
        await other.aclose()
    assert await counts(db) == {old: 1, new: 2}


async def test_counts_of_a_revoked_version_are_dropped_without_failing(
    db: TestDB, open_kms: OpenKMS
) -> None:
    kms = await open_kms(usage_flush_interval=NO_PERIODIC_FLUSH)
    other = await open_kms(usage_flush_interval=None)
    try:
        await kms.create_keys("org")
        old = key_id(await kms.encrypt("org", "database", b"x"))
        await kms.flush_usage()
        await kms.encrypt("org", "database", b"x")  # pending when the version goes
        await other.rotate_keys("org")
        await other.revoke_key_version(old)
        assert old not in await counts(db)  # revoking deletes its row
        await kms.flush_usage()  # the version is gone: its count is dropped
        assert old not in await counts(db)
        await kms.refresh()
        new = key_id(await kms.encrypt("org", "database", b"x"))
        await kms.flush_usage()
        assert await counts(db) == {new: 1}
    finally:
        await kms.aclose()
        await other.aclose()


async def test_counting_is_off_without_an_interval(db: TestDB, open_kms: OpenKMS) -> None:
    kms = await open_kms(usage_flush_interval=None)
    await kms.create_keys("org")
    await kms.encrypt("org", "database", b"x")
    await kms.aclose()
    assert await counts(db) == {}


async def test_without_the_usage_table_counting_is_off_with_one_log_line(
    db: TestDB, open_kms: OpenKMS, caplog: pytest.LogCaptureFixture
) -> None:
    await db.execute("drop table kms_key_version_usage")
    with caplog.at_level(logging.WARNING, logger="kms_async"):
        kms = await open_kms()
    try:
        lines = [r for r in caplog.records if "not counted" in r.getMessage()]
        assert len(lines) == 1
        assert "07_kms_key_version_usage" in lines[0].getMessage()
        await kms.create_keys("org")
        await kms.encrypt("org", "database", b"x")
        await kms.flush_usage()  # does nothing
        rows = await kms.census("org")
        assert rows and all(r.encryptions is None for r in rows)
    finally:
        await kms.aclose()


async def test_usage_flush_interval_is_checked(db: TestDB, open_kms: OpenKMS) -> None:
    from kms_async import InvalidParameterError

    bad: list[Any] = [0, -1.0, "5", float("nan")]
    for value in bad:
        with pytest.raises(InvalidParameterError, match="usage_flush_interval"):
            await open_kms(usage_flush_interval=value)


async def test_a_flush_is_not_a_key_change(db: TestDB, open_kms: OpenKMS) -> None:
    kms = await open_kms(usage_flush_interval=NO_PERIODIC_FLUSH)
    try:
        await kms.create_keys("org")
        await kms.encrypt("org", "database", b"x")
        before = await db.fetchval("select version from kms_collection_version")
        await kms.flush_usage()
        assert await db.fetchval("select version from kms_collection_version") == before
        assert sum((await counts(db)).values()) == 1
    finally:
        await kms.aclose()


async def test_a_large_payload_encrypted_in_a_thread_is_counted(
    db: TestDB, open_kms: OpenKMS
) -> None:
    kms = await open_kms(usage_flush_interval=NO_PERIODIC_FLUSH, offload_threshold=1024)
    try:
        await kms.create_keys("org")
        version = key_id(await kms.encrypt("org", "database", b"x" * 4096))
        await kms.encrypt_many("org", "database", [b"y" * 600, b"z" * 600])
    finally:
        await kms.aclose()
    assert await counts(db) == {version: 3}


async def test_counts_never_go_through_the_applications_sqlite_connection(
    db: TestDB, root_wrapper: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Given the application's SQLite connection, the KMS adds counts through a
    connection of its own: the application may be inside a transaction of its
    own between two statements, and a background write must not join it."""
    if db.dialect != "sqlite":
        pytest.skip("a PostgreSQL KMS takes a pool connection of its own for every write")
    import aiosqlite

    app = await db.connect()
    try:
        kms = await KMS.open(
            app,
            purposes=["database"],
            root_wrapper=root_wrapper,
            max_staleness=None,
            usage_flush_interval=NO_PERIODIC_FLUSH,
        )
        async with kms:
            await kms.create_keys("acme")
            version = key_id(await kms.encrypt("acme", "database", b"one"))
            await app.execute("create table note (id integer primary key)")
            await app.execute("begin")  # the application's transaction, open
            await kms.encrypt("acme", "database", b"two")
            await kms.flush_usage()
            assert app.in_transaction  # left alone: neither committed nor joined
            await app.execute("insert into note (id) values (1)")
            await app.execute("rollback")
            assert await counts(db) == {version: 2}
            assert await db.fetch("select id from note") == []
    finally:
        await app.close()

    # In memory there is no second connection: counting is off, and says so.
    memory = await aiosqlite.connect(":memory:", isolation_level=None)
    try:
        import kms_async

        await kms_async.migrate(memory)
        caplog.set_level(logging.WARNING, logger="kms_async")
        async with await KMS.open(
            memory, purposes=["database"], root_wrapper=root_wrapper, max_staleness=None
        ) as kms:
            await kms.create_keys("acme")
            await kms.encrypt("acme", "database", b"x")
        assert "not counted" in caplog.text
        assert "in-memory" in caplog.text
        async with memory.execute("select count(*) from kms_key_version_usage") as cursor:
            assert await cursor.fetchone() == (0,)
    finally:
        await memory.close()
